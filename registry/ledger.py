"""The ledger: every stage transition, kept as runs in MLflow so it lives with the server.

MLflow keeps no history of stages (mlflow#2169). Each transition Stageflow makes
is one run in the ``stageflow-ledger`` experiment, tagged with the model,
version, from/to stage, actor and reason, and carrying the gate report
(``gate_report.json`` and ``gate_report.md``). The run is opened before the
registry is touched and closed after: FINISHED means the transition happened; a
refusal or failure closes it as FAILED; a run left RUNNING marks a transition
that was interrupted. The next promoter to hold the model's lock (or
``stageflow status --repair``) settles it from what the registry shows: FINISHED when the
version did reach the stage, FAILED when it did not -- never "done" on faith.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from dataclasses import asdict, dataclass, field

from mlflow import MlflowClient
from mlflow.entities import RunStatus, RunTag

from stageflow import tracking

LEDGER_EXPERIMENT = "stageflow-ledger"
ACTOR_ENV = "STAGEFLOW_ACTOR"
PROMOTE, ROLLBACK, REPAIR = "promote", "rollback", "repair"
DONE, REFUSED, FAILED = "done", "refused", "failed"
PENDING, INTERRUPTED = "pending", "interrupted"
TAG = "stageflow."
REPORT_JSON, REPORT_MARKDOWN = "gate_report.json", "gate_report.md"


@dataclass
class Entry:
    """One transition as the ledger records it."""

    model: str
    version: str
    from_stage: str
    to_stage: str
    action: str
    actor: str
    reason: str
    outcome: str = DONE
    time: float = 0.0  # seconds since the epoch, when the transition began
    archived: list[str] = field(default_factory=list)
    run_id: str = ""
    detail: str = ""
    report: str = ""  # the gate report artifact, runs:/<ledger run>/gate_report.md
    evidence_run: str = ""  # the run that prompted it, e.g. the monitoring run of an auto-rollback

    def to_json(self) -> dict:
        record = asdict(self)
        record["time"] = _iso(self.time)
        return record


def actor() -> str:
    """Who is acting: ``STAGEFLOW_ACTOR`` if set, else ``user@host``."""
    if explicit := os.environ.get(ACTOR_ENV):
        return explicit
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def experiment_id(client: MlflowClient) -> str:
    """The ledger experiment's id, created on first use."""
    experiment = client.get_experiment_by_name(LEDGER_EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(LEDGER_EXPERIMENT, tags={"stageflow.kind": "ledger"})
    except Exception:  # created meanwhile by another promoter
        experiment = client.get_experiment_by_name(LEDGER_EXPERIMENT)
        if experiment is None:
            raise
        return experiment.experiment_id


def begin(client: MlflowClient, entry: Entry) -> Entry:
    """Open the ledger run for ``entry`` (status RUNNING) before the registry changes."""
    entry.time = time.time()
    entry.outcome = PENDING
    run = client.create_run(
        experiment_id(client),
        start_time=int(entry.time * 1000),
        run_name=f"{entry.model} v{entry.version} → {entry.to_stage}",
        tags=_tags(entry) | {f"{TAG}time_ns": str(time.time_ns())},
    )
    entry.run_id = run.info.run_id
    return entry


def finish(
    client: MlflowClient, entry: Entry, outcome: str, evidence: dict | None = None, detail=""
) -> Entry:
    """Close the ledger run: FINISHED for a transition that happened, FAILED otherwise."""
    entry.outcome = outcome
    entry.detail = detail
    client.log_batch(entry.run_id, tags=[RunTag(k, v) for k, v in _tags(entry).items()])
    if evidence is not None:
        client.log_dict(entry.run_id, evidence, REPORT_JSON)
    status = RunStatus.FINISHED if outcome == DONE else RunStatus.FAILED
    client.set_terminated(entry.run_id, status=RunStatus.to_string(status))
    return entry


def log_report(client: MlflowClient, entry: Entry, report: dict, markdown: str) -> Entry:
    """Attach the gate report (JSON and Markdown) to the entry's run."""
    client.log_dict(entry.run_id, report, REPORT_JSON)
    client.log_text(entry.run_id, markdown, REPORT_MARKDOWN)
    entry.report = f"runs:/{entry.run_id}/{REPORT_MARKDOWN}"
    client.set_tag(entry.run_id, f"{TAG}report", entry.report)
    return entry


def entries(client: MlflowClient, model: str, include_all: bool = False) -> list[Entry]:
    """The ledger of ``model``, oldest first: what happened (everything with ``include_all``)."""
    experiment = client.get_experiment_by_name(LEDGER_EXPERIMENT)
    if experiment is None:
        return []
    runs = []
    token = None
    while True:
        page = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{TAG}model` = {tracking.filter_value(model)}",
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    runs.sort(key=lambda r: (r.info.start_time, int(r.data.tags.get(f"{TAG}time_ns", 0))))
    result = []
    for run in runs:
        entry = _from_run(run)
        if include_all or entry.outcome == DONE:
            result.append(entry)
    return result


def production_lineage(history: list[Entry]) -> list[str]:
    """The stack of Production versions the ledger implies, current last.

    A promotion pushes its version; a rollback pops the current one (and, when it
    went to a version other than the one below, puts that version on top).
    Rolling back twice therefore walks further back instead of toggling.
    """
    stack: list[str] = []
    for entry in history:
        if entry.to_stage != "Production" or entry.outcome != DONE:
            continue
        if entry.action == ROLLBACK and stack:
            stack.pop()
        if entry.version in stack:
            stack.remove(entry.version)
        stack.append(entry.version)
    return stack


def _tags(entry: Entry) -> dict[str, str]:
    return {
        f"{TAG}kind": "transition",
        f"{TAG}model": entry.model,
        f"{TAG}version": str(entry.version),
        f"{TAG}from_stage": entry.from_stage,
        f"{TAG}to_stage": entry.to_stage,
        f"{TAG}action": entry.action,
        f"{TAG}actor": entry.actor,
        f"{TAG}reason": entry.reason[:4000],
        f"{TAG}outcome": entry.outcome,
        f"{TAG}archived": ",".join(entry.archived),
        f"{TAG}detail": entry.detail[:4000],
        f"{TAG}report": entry.report,
        f"{TAG}evidence_run": entry.evidence_run,
    }


def _from_run(run) -> Entry:
    tags = run.data.tags

    def tag(name: str) -> str:
        return tags.get(f"{TAG}{name}", "")

    outcome = tag("outcome")
    if run.info.status == "RUNNING":
        outcome = INTERRUPTED
    return Entry(
        model=tag("model"),
        version=tag("version"),
        from_stage=tag("from_stage"),
        to_stage=tag("to_stage"),
        action=tag("action"),
        actor=tag("actor"),
        reason=tag("reason"),
        outcome=outcome,
        time=run.info.start_time / 1000,
        archived=[v for v in tag("archived").split(",") if v],
        run_id=run.info.run_id,
        detail=tag("detail"),
        report=tag("report"),
        evidence_run=tag("evidence_run"),
    )


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
