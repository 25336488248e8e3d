"""``stageflow watch``: run the monitor every period and act on its alarms, per the policy.

Each tick (a "window") runs ``monitoring.monitor`` and decides, from its result
and the model's ``monitoring:`` policy, what to do:

- **auto-rollback** -- Production's live metric alarm (worse than its own test
  metric by more than the margin), or an SLO alarm in ``slo.windows``
  consecutive windows -> ``registry.rollback`` as actor ``stageflow-watch``,
  reason ``auto-rollback: <alarm and figures>``, the monitoring run kept in the
  ledger entry. The version rolled back from is tagged
  ``stageflow.watch.rolled_back`` and is never an automatic target again; after
  an automatic rollback none follows for ``rollback.cooldown``.
- **retrain** -- a drift alarm on Production (``retrain.on_drift``), or at least
  ``retrain.min_new_labels`` labelled rows in the window ->
  ``experiments.retrain.retrain``: the candidate goes to Staging through its gate
  (a ledger entry, done or refused), to Production only where
  ``auto_promote: true``. At most one automatic retrain per cool-down.

What to do is decided by :func:`decide`, a pure function of the monitor's
result and the registry's state, so it is tested without servers; ``dry_run``
decides and reports, and changes nothing.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from monitoring.window import parse_duration
from stageflow import tracking
from stageflow.errors import StageflowError, UsageError

logger = logging.getLogger(__name__)

ACTOR = "stageflow-watch"
ROLLBACK, RETRAIN = "rollback", "retrain"
ACTS = (ROLLBACK, RETRAIN)
MARK_TAG = "stageflow.watch.rolled_back"  # on the version an auto-rollback left
SLO_WINDOWS_TAG = "stageflow.watch.slo_windows"  # consecutive SLO-alarm windows, on Production
RETRAIN_TRIGGER_TAG = "stageflow.retrain.trigger"
LIVE_METRIC, SLO, DRIFT, PREDICTION_DRIFT = "live_metric", "slo", "drift", "prediction_drift"

# The `monitoring:` section's defaults (the monitoring contract); a policy overrides key by key.
DEFAULTS: dict = {
    "min_rows": 200,
    "drift": {"psi": 0.2, "p_value": 0.01},
    "prediction_drift": {"psi": 0.2},
    "live_metric": {"margin": 0.05, "confidence": 0.95, "resamples": 1000},
    "slo": {"refusal_rate": 0.05, "error_rate": 0.01, "p99_latency_ms": 1000, "windows": 3},
    "rollback": {"enabled": True, "cooldown": "1h"},
    "retrain": {"on_drift": True, "min_new_labels": 500},
    "auto_promote": False,
}


def seconds(duration: str, flag: str = "--every") -> float:
    """``"90s"``, ``"15m"``, ``"1h30m"``, ``"2d"`` → seconds: the policy's grammar, which the
    monitor's window reads too, so a period ``watch`` accepts is a window the monitor takes.

    Raises:
        UsageError: not a positive duration (the message names ``flag``).
    """
    return parse_duration(duration, flag).total_seconds()


def settings(policy) -> dict:
    """The policy's ``monitoring:`` section over :data:`DEFAULTS` (a plain dict).

    Reads a dict-valued policy (``policy.values["monitoring"]``) or a model with a
    ``monitoring`` attribute (pydantic, ``model_dump``); a policy without the
    section gets the defaults.
    """
    section = None
    values = getattr(policy, "values", None)
    if isinstance(values, dict):
        section = values.get("monitoring")
    if section is None:
        section = getattr(policy, "monitoring", None)
    if hasattr(section, "model_dump"):
        section = section.model_dump()
    merged = copy.deepcopy(DEFAULTS)
    for key, value in (section or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


@dataclass
class State:
    """What the registry says, as far as a decision needs it."""

    production: str | None
    rollback_target: str | None  # where registry.rollback would go (None: nowhere)
    marked: set[str] = field(default_factory=set)  # versions an auto-rollback left
    slo_windows: int = 0  # consecutive earlier windows with an SLO alarm on Production
    last_auto_rollback: float | None = None  # epoch seconds
    last_auto_retrain: float | None = None
    now: float = field(default_factory=time.time)


@dataclass
class Action:
    kind: str  # rollback | retrain
    trigger: str  # live_metric | slo | drift | prediction_drift | labels
    version: str  # the version acted on (rolled back from; retrained from)
    reason: str
    target: str = ""  # rollback: the version going back to Production
    skipped: str = ""  # why it is not taken (cool-down, marked target, ...); "" = take it
    done: bool = False
    detail: str = ""
    ledger_run_id: str = ""
    candidate: str = ""  # retrain: the new version

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class WatchReport:
    model: str
    since: str
    dry_run: bool
    production: str | None
    monitoring_run: str
    alarms: list[str]
    actions: list[Action]
    slo_windows: int = 0
    time: str = ""

    def to_json(self) -> dict:
        return {**asdict(self), "actions": [a.to_json() for a in self.actions]}


def _production_entry(result: dict, production: str | None) -> dict | None:
    for entry in result.get("versions", []):
        if entry.get("role") == "production" or (
            production is not None and str(entry.get("version")) == str(production)
        ):
            return entry
    return None


def _figures(detail: dict) -> str:
    figures = {k: v for k, v in detail.items() if k not in ("kind", "message")}
    return f" {json.dumps(figures, default=str, sort_keys=True)}" if figures else ""


def decide(result: dict, policy: dict, state: State, acts: Iterable[str] = ACTS) -> list[Action]:
    """What to do about one monitoring window (pure: no registry, no servers).

    Args:
        result: ``MonitorResult.to_json()``.
        policy: :func:`settings` of the model's policy.
        state: the registry's state (:func:`read_state`).
        acts: which kinds of action are allowed (``--act``).

    Returns:
        The actions, each either to be taken or ``skipped`` with the reason. A
        rollback and a retrain are never both taken in one window: the retrain
        waits for the next window, on the version then in Production.
    """
    acts = set(acts)
    production = _production_entry(result, state.production)
    if production is None or state.production is None:
        return []
    version = str(production.get("version", state.production))
    details = production.get("alarm_details") or []
    cooldown = seconds(policy["rollback"]["cooldown"], "rollback.cooldown")
    actions: list[Action] = []

    if ROLLBACK in acts and policy["rollback"]["enabled"]:
        live = [d for d in details if d.get("kind") == LIVE_METRIC]
        slo = [d for d in details if d.get("kind") == SLO]
        windows = state.slo_windows + 1 if slo else 0
        cause = None
        if live:
            cause = (LIVE_METRIC, live[0])
        elif slo and windows >= int(policy["slo"]["windows"]):
            cause = (SLO, slo[0])
        if cause is not None:
            trigger, detail = cause
            message = detail.get("message", trigger)
            if trigger == SLO:
                message += f" ({windows} consecutive windows)"
            action = Action(
                kind=ROLLBACK,
                trigger=trigger,
                version=version,
                target=state.rollback_target or "",
                reason=f"auto-rollback: {message}{_figures(detail)}",
            )
            if state.last_auto_rollback is not None and (
                state.now - state.last_auto_rollback < cooldown
            ):
                left = cooldown - (state.now - state.last_auto_rollback)
                action.skipped = (
                    f"cool-down: the last automatic rollback was {left:.0f}s too recent"
                )
            elif not state.rollback_target:
                action.skipped = "no earlier Production version to roll back to"
            elif state.rollback_target in state.marked:
                action.skipped = (
                    f"version {state.rollback_target} was rolled back from automatically "
                    "before; a person must choose (stageflow rollback --to V)"
                )
            actions.append(action)

    rolling_back = any(a.kind == ROLLBACK and not a.skipped for a in actions)
    if RETRAIN in acts:
        drift = [d for d in details if d.get("kind") in (DRIFT, PREDICTION_DRIFT)]
        labelled = sum(
            int((v.get("live_metrics") or {}).get("rows") or 0) for v in result.get("versions", [])
        )
        trigger = detail = None
        if drift and policy["retrain"]["on_drift"]:
            trigger, detail = drift[0].get("kind", DRIFT), drift[0].get("message", "drift")
        elif labelled >= int(policy["retrain"]["min_new_labels"]):
            trigger, detail = "labels", f"{labelled} labelled rows in the window"
        if trigger is not None:
            action = Action(
                kind=RETRAIN,
                trigger=trigger,
                version=version,
                reason=f"auto-retrain: {detail}",
            )
            if rolling_back:
                action.skipped = "a rollback comes first; the next window decides on retraining"
            elif state.last_auto_retrain is not None and (
                state.now - state.last_auto_retrain < cooldown
            ):
                action.skipped = "cool-down: an automatic retrain happened recently"
            actions.append(action)
    return actions


def read_state(client, model: str) -> State:
    """The registry's state :func:`decide` needs: Production, its rollback target, marks, times."""
    from registry import PRODUCTION, current_version, ledger  # noqa: PLC0415
    from registry.rollback import rollback_target  # noqa: PLC0415

    production = current_version(client, model, PRODUCTION)
    versions = client.search_model_versions(f"name = {tracking.filter_value(model)}")
    marked = {str(v.version) for v in versions if v.tags.get(MARK_TAG)}
    slo_windows = 0
    retrains = []
    for v in versions:
        if production is not None and str(v.version) == production:
            slo_windows = int(v.tags.get(SLO_WINDOWS_TAG, "0") or 0)
        trigger = v.tags.get(RETRAIN_TRIGGER_TAG)
        if trigger and trigger != "manual":
            retrains.append(v.creation_timestamp / 1000)
    target = None
    if production is not None:
        with contextlib.suppress(StageflowError):
            target = rollback_target(client, model)
    rollbacks = [
        e.time
        for e in ledger.entries(client, model)
        if e.action == ledger.ROLLBACK and e.actor == ACTOR
    ]
    return State(
        production=production,
        rollback_target=target,
        marked=marked,
        slo_windows=slo_windows,
        last_auto_rollback=max(rollbacks) if rollbacks else None,
        last_auto_retrain=max(retrains) if retrains else None,
    )


@contextlib.contextmanager
def acting_as(actor: str = ACTOR):
    """The registry's ledger names ``actor`` (``STAGEFLOW_ACTOR``) inside the block."""
    from registry import ledger  # noqa: PLC0415

    before = os.environ.get(ledger.ACTOR_ENV)
    os.environ[ledger.ACTOR_ENV] = actor
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ledger.ACTOR_ENV, None)
        else:
            os.environ[ledger.ACTOR_ENV] = before


def parse_acts(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"rollback,retrain"`` → ``("rollback", "retrain")``; unknown ones are a usage error."""
    given = [a.strip() for a in (text.split(",") if isinstance(text, str) else text) if a.strip()]
    unknown = sorted(set(given) - set(ACTS))
    if unknown:
        raise UsageError(f"--act: unknown action(s) {', '.join(unknown)}; choose from {ACTS}")
    return tuple(dict.fromkeys(given))


def watch_once(
    model: str,
    since: str = "1h",
    acts: Iterable[str] = ACTS,
    dry_run: bool = False,
    tracking_uri: str | None = None,
    monitor: Callable | None = None,
    retrain_data: str | None = None,
) -> WatchReport:
    """One window: run the monitor, decide, act (unless ``dry_run``), report.

    Args:
        since: the monitor's window.
        acts: the actions allowed (``rollback``, ``retrain``).
        dry_run: decide and report only; the registry, the ledger and the
            watch's own tags stay as they were.
        monitor: ``monitor(model, since=, tracking_uri=, policy=)`` returning a
            MonitorResult (default: ``monitoring.monitor``).
        retrain_data: labelled rows for a retrain to add instead of the inference
            log's (``retrain --data``): a feed outside Stageflow, or a test.

    Raises:
        UsageError: unknown model or action, bad duration.
    """
    from registry.policy import for_model  # noqa: PLC0415

    acts = parse_acts(acts)
    seconds(since, "--since")
    client = tracking.client(tracking_uri)
    policy = for_model(client, model)  # an unknown model is a UsageError here
    if monitor is None:
        import monitoring  # noqa: PLC0415

        monitor = monitoring.monitor
    result = monitor(model, since=since, tracking_uri=tracking_uri, policy=policy)
    result = result.to_json() if hasattr(result, "to_json") else result
    state = read_state(client, model)
    rules = settings(policy)
    actions = decide(result, rules, state, acts)
    production = _production_entry(result, state.production)
    run_id = (production or {}).get("run_id") or ""
    has_slo = bool(
        production and any(d.get("kind") == SLO for d in production.get("alarm_details") or [])
    )
    windows = state.slo_windows + 1 if has_slo else 0
    report = WatchReport(
        model=model,
        since=since,
        dry_run=dry_run,
        production=state.production,
        monitoring_run=run_id,
        alarms=list((production or {}).get("alarms") or []),
        actions=actions,
        slo_windows=windows,
        time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    if dry_run:
        return report
    if state.production is not None and windows != state.slo_windows:
        client.set_model_version_tag(model, state.production, SLO_WINDOWS_TAG, str(windows))
    for action in actions:
        if action.skipped:
            logger.info(
                "%s: not taking %s (%s): %s", model, action.kind, action.reason, action.skipped
            )
            continue
        with acting_as():
            _take(client, model, action, run_id, tracking_uri, retrain_data)
    return report


def _take(client, model: str, action: Action, run_id: str, tracking_uri, retrain_data) -> None:
    from registry import Refused, rollback  # noqa: PLC0415

    if action.kind == ROLLBACK:
        try:
            moved = rollback(
                model,
                to=action.target,
                reason=action.reason + (f" (monitoring run {run_id})" if run_id else ""),
                tracking_uri=tracking_uri,
                evidence_run=run_id,
            )
        except Refused as refused:
            action.detail = str(refused)
            action.ledger_run_id = refused.result.ledger_run_id
            logger.error("%s: auto-rollback refused: %s", model, refused)
            return
        action.done = moved.changed
        action.ledger_run_id = moved.ledger_run_id
        client.set_model_version_tag(model, action.version, MARK_TAG, action.reason[:4000])
        client.set_model_version_tag(model, action.version, SLO_WINDOWS_TAG, "0")
        logger.warning(
            "%s: rolled back from version %s to %s: %s",
            model,
            action.version,
            action.target,
            action.reason,
        )
        return
    from experiments.retrain import retrain  # noqa: PLC0415

    outcome = retrain(
        model,
        retrain_data,
        trigger=action.trigger,
        monitoring_run=run_id,
        tracking_uri=tracking_uri,
    )
    action.candidate = outcome.version
    action.done = True
    action.ledger_run_id = outcome.staging.get("ledger_run_id", "")
    action.detail = f"candidate version {outcome.version} " + (
        "in Staging" if not outcome.refused else f"refused: {outcome.staging.get('detail')}"
    )
    logger.warning("%s: %s", model, action.detail)


def watch(
    model: str,
    every: str = "1h",
    acts: Iterable[str] = ACTS,
    once: bool = False,
    dry_run: bool = False,
    since: str | None = None,
    tracking_uri: str | None = None,
    monitor: Callable | None = None,
    on_report: Callable[[WatchReport], None] | None = None,
    stop: threading.Event | None = None,
    retrain_data: str | None = None,
) -> list[WatchReport]:
    """Watch ``model``: one window every ``every`` (the monitor looks back ``since``,
    default ``every``) until ``stop`` is set or Ctrl-C; one window only with ``once``.

    A window that fails (the tracking server away, the monitor failing) is logged
    and the next one runs: the watch does not die on a transient fault.

    Returns:
        The reports of the windows run (``on_report`` sees each as it happens).
    """
    period = seconds(every)
    since = since or every
    acts = parse_acts(acts)
    stop = stop or threading.Event()
    reports = []
    while True:
        started = time.monotonic()
        try:
            report = watch_once(
                model, since, acts, dry_run, tracking_uri, monitor, retrain_data=retrain_data
            )
        except UsageError:
            raise
        except Exception as exc:  # one bad window must not end the watch
            if once:
                raise
            logger.error("%s: this window failed, the next runs in %s: %s", model, every, exc)
        else:
            reports.append(report)
            if on_report is not None:
                on_report(report)
        if once or stop.wait(max(0.0, period - (time.monotonic() - started))):
            return reports


def summary(report: WatchReport) -> str:
    """The human lines ``stageflow watch`` prints for one window."""
    head = (
        f"{report.time} {report.model}: Production version {report.production or '—'}, "
        f"{len(report.alarms)} alarm(s)" + (" [dry run]" if report.dry_run else "")
    )
    lines = [head] + [f"  alarm: {a}" for a in report.alarms]
    for a in report.actions:
        verb = "would" if report.dry_run and not a.skipped else ""
        what = (
            f"roll back version {a.version} → {a.target or '?'}"
            if a.kind == ROLLBACK
            else f"retrain version {a.version} ({a.trigger})"
        )
        if a.skipped:
            lines.append(f"  not taken: {what} — {a.skipped}")
        elif report.dry_run:
            lines.append(f"  {verb} {what}: {a.reason}")
        else:
            lines.append(
                f"  {what}: {'done' if a.done else 'not done'}"
                + (f" — {a.detail}" if a.detail else "")
                + (f" (ledger {a.ledger_run_id})" if a.ledger_run_id else "")
            )
    if not report.actions:
        lines.append("  nothing to do")
    return "\n".join(lines)
