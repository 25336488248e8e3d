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

Order and integrity come from the lock, not from clocks. Only the holder of the
model's lock (``registry._lock``) writes entries, and it numbers each one past the
last (``stageflow.seq``), so entries sort by that number, not by a promoter's
clock; each also records the server time of its lock lease. Entries are chained:
each holds the digest of the one before (``stageflow.prev``) and of itself
(``stageflow.digest``, over its tags), and the registered model carries the
*head* -- the last entry's number and digest, and which version the ledger last
put in each stage (what serving checks the registry against). :func:`verify`
finds a missing, altered or unexpected entry from that. Entries written before
the chain existed carry no number: they sort first, by time, and the chain
starts at the first numbered entry.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field

from mlflow import MlflowClient
from mlflow.entities import RunStatus, RunTag
from mlflow.exceptions import MlflowException

from stageflow import tracking

LEDGER_EXPERIMENT = "stageflow-ledger"
ACTOR_ENV = "STAGEFLOW_ACTOR"
PROMOTE, ROLLBACK, REPAIR = "promote", "rollback", "repair"
DONE, REFUSED, FAILED = "done", "refused", "failed"
PENDING, INTERRUPTED = "pending", "interrupted"
TAG = "stageflow."
REPORT_JSON, REPORT_MARKDOWN = "gate_report.json", "gate_report.md"
# On the registered model: the chain's head (last entry, its digest, what it placed where).
HEAD_TAG = "stageflow.ledger.head"
# The stages whose holder the head records (the ones with a mirror alias).
PLACED_STAGES = ("Staging", "Production")


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
    seq: int = 0  # its place in the chain (0: written before the chain existed)
    prev: str = ""  # the digest of the entry before it ("" for the first)
    digest: str = ""  # its own, over its tags, written when it closes
    lock_generation: int = 0  # the generation of the lock it was written under
    # As read back: its digest recomputed from the tags it has now, and its run's creation.
    recomputed: str = field(default="", repr=False, compare=False)
    time_ns: int = field(default=0, repr=False, compare=False)

    def to_json(self) -> dict:
        record = asdict(self)
        record["time"] = _iso(self.time)
        del record["recomputed"], record["time_ns"]
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


@dataclass(frozen=True)
class Head:
    """The chain's head, as the registered model carries it."""

    seq: int = 0
    digest: str = ""
    run_id: str = ""
    placed: dict = field(default_factory=dict)  # stage -> version (None: emptied)

    def to_tag(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def head(client: MlflowClient, model: str) -> Head | None:
    """The head the registered model carries; None before the first chained entry."""
    try:
        raw = client.get_registered_model(model).tags.get(HEAD_TAG)
    except MlflowException:
        return None
    return parse_head(raw)


def parse_head(raw: str | None) -> Head | None:
    if not raw:
        return None
    try:
        data = json.loads(raw)
        return Head(
            int(data["seq"]), str(data["digest"]), str(data["run_id"]), dict(data["placed"])
        )
    except (ValueError, KeyError, TypeError):
        return Head(seq=-1)  # unreadable: verify() says so


def begin(client: MlflowClient, entry: Entry, lease) -> Entry:
    """Open the ledger run for ``entry`` (status RUNNING) before the registry changes.

    ``lease`` (a held ``registry._lock.Lease``) is what entitles the caller to the next
    number: the entry is numbered one past the head, and the head names its predecessor.
    """
    entry.time = lease.server_time
    entry.lock_generation = lease.generation
    entry.outcome = PENDING
    last = head(client, entry.model) or _head_from_entries(client, entry.model)
    entry.seq, entry.prev = max(last.seq, 0) + 1, last.digest
    run = client.create_run(
        experiment_id(client),
        start_time=int(time.time() * 1000),
        run_name=f"{entry.model} v{entry.version} → {entry.to_stage}",
        tags=_tags(entry) | _chain_tags(entry) | {f"{TAG}time_ns": str(time.time_ns())},
    )
    entry.run_id = run.info.run_id
    return entry


def finish(
    client: MlflowClient, entry: Entry, outcome: str, evidence: dict | None = None, detail=""
) -> Entry:
    """Close the ledger run: FINISHED for a transition that happened, FAILED otherwise.

    A chained entry gets its digest, and becomes the head, before its run closes: a
    fault in between leaves it RUNNING (interrupted), which ``repair`` closes again.
    """
    entry.outcome = outcome
    entry.detail = detail
    tags = _tags(entry)
    if entry.seq:
        entry.digest = digest(entry.run_id, tags, entry.seq, entry.prev)
        tags |= _chain_tags(entry)
    client.log_batch(entry.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    if evidence is not None:
        client.log_dict(entry.run_id, evidence, REPORT_JSON)
    before = head(client, entry.model) if entry.seq else None
    if entry.seq and (before is None or before.seq <= entry.seq):
        placed = dict(before.placed) if before is not None else {}
        client.set_registered_model_tag(
            entry.model,
            HEAD_TAG,
            Head(entry.seq, entry.digest, entry.run_id, place(placed, entry)).to_tag(),
        )
    status = RunStatus.FINISHED if outcome == DONE else RunStatus.FAILED
    client.set_terminated(entry.run_id, status=RunStatus.to_string(status))
    return entry


def place(placed: dict, entry: Entry) -> dict:
    """Which version holds each stage after ``entry``, as far as the ledger knows.

    A done promotion or rollback into a stage puts its version there and takes it out
    of any other. Refusals, failures and repairs place nothing: a repair only makes the
    alias follow the stage, so it cannot make a version moved outside Stageflow gated.
    """
    placed = dict(placed)
    if entry.outcome != DONE or entry.action == REPAIR or entry.to_stage not in PLACED_STAGES:
        return placed
    for stage in PLACED_STAGES:
        if placed.get(stage) == entry.version and stage != entry.to_stage:
            placed[stage] = None
    placed[entry.to_stage] = entry.version or None
    return placed


def digest(run_id: str, tags: dict[str, str], seq: int, prev: str) -> str:
    """The digest of one entry: its run, its number, its predecessor's digest and its tags."""
    body = json.dumps({"run_id": run_id, "seq": seq, "prev": prev, "tags": tags}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


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
    result = sorted((_from_run(run) for run in runs), key=_order)
    return result if include_all else [e for e in result if e.outcome == DONE]


def _order(entry: Entry) -> tuple:
    """Chained entries by number, after the older unchained ones by their (client) time."""
    if entry.seq:
        return (1, entry.seq, 0.0, 0)
    return (0, 0, entry.time, entry.time_ns)


def verify(history: list[Entry], last: Head | None) -> tuple[list[str], str]:
    """Check the chain of ``history`` (every entry, oldest first) against the head.

    Returns:
        The problems, one line each (a missing, altered or duplicated entry; a head
        that does not match the last entry), and a note when older entries predate
        the chain ("" otherwise).
    """
    chained = [e for e in history if e.seq]
    legacy = len(history) - len(chained)
    note = ""
    if legacy and chained:
        note = (
            f"{_older(legacy)} the chain and cannot be checked; it starts at entry 1 "
            f"(ledger run {chained[0].run_id})"
        )
    elif legacy:
        note = f"{_older(legacy)} the chain and cannot be checked; it starts at the next transition"
    problems = []
    if last is not None and last.seq < 0:
        return [f"the ledger head (tag {HEAD_TAG}) is unreadable; it was edited by hand"], note
    expected, prev = 1, ""
    for entry in chained:
        where = f"entry {entry.seq} (ledger run {entry.run_id})"
        if entry.seq < expected:
            problems.append(f"{where} repeats a number of the ledger chain (two writers)")
            continue
        if entry.seq > expected:
            problems.append(_missing(expected, entry.seq - 1, f"before {where}"))
        elif entry.prev != prev:
            problems.append(f"{where} does not follow the entry before it: one of them was altered")
        if entry.digest and entry.digest != entry.recomputed:
            problems.append(f"{where} was altered after it was written (its digest does not match)")
        expected, prev = entry.seq + 1, entry.digest
    top = chained[-1] if chained else None
    if last is not None:
        if top is None or last.seq > top.seq:
            after = f"after entry {top.seq}" if top else "at the end"
            problems.append(_missing((top.seq + 1) if top else 1, last.seq, after))
        elif last.seq == top.seq and last.digest != top.digest and top.digest:
            problems.append(f"the last ledger entry ({top.seq}, run {top.run_id}) was altered")
    elif chained:
        problems.append(f"the ledger head (tag {HEAD_TAG} on the registered model) is missing")
    return problems, note


def _older(count: int) -> str:
    return "1 ledger entry predates" if count == 1 else f"{count} ledger entries predate"


def _missing(first: int, last: int, where: str) -> str:
    which = f"entry {first}" if first == last else f"entries {first}-{last}"
    return f"ledger {which} {where} is missing (its run was deleted); see `stageflow history`"


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
        f"{TAG}lock_generation": str(entry.lock_generation or ""),
        f"{TAG}server_time": f"{entry.time:.3f}" if entry.seq else "",
    }


def _chain_tags(entry: Entry) -> dict[str, str]:
    return {f"{TAG}seq": str(entry.seq), f"{TAG}prev": entry.prev, f"{TAG}digest": entry.digest}


def _head_from_entries(client: MlflowClient, model: str) -> Head:
    """Where the chain stands when the model carries no head: after its last numbered entry.

    Normally "nothing yet" (the first chained entry); a head tag removed by hand
    does not restart the numbering (``verify`` says the head went missing).
    """
    chained = [e for e in entries(client, model, include_all=True) if e.seq]
    if not chained:
        return Head()
    top = chained[-1]
    return Head(top.seq, top.digest, top.run_id)


def _from_run(run) -> Entry:
    tags = run.data.tags

    def tag(name: str) -> str:
        return tags.get(f"{TAG}{name}", "")

    outcome = tag("outcome")
    if run.info.status == "RUNNING":
        outcome = INTERRUPTED
    seq = int(tag("seq")) if tag("seq").isdigit() else 0
    try:
        server_time = float(tag("server_time"))
    except ValueError:
        server_time = run.info.start_time / 1000
    entry = Entry(
        model=tag("model"),
        version=tag("version"),
        from_stage=tag("from_stage"),
        to_stage=tag("to_stage"),
        action=tag("action"),
        actor=tag("actor"),
        reason=tag("reason"),
        outcome=outcome,
        time=server_time if seq else run.info.start_time / 1000,
        archived=[v for v in tag("archived").split(",") if v],
        run_id=run.info.run_id,
        detail=tag("detail"),
        report=tag("report"),
        evidence_run=tag("evidence_run"),
        seq=seq,
        prev=tag("prev"),
        digest=tag("digest"),
        lock_generation=int(tag("lock_generation") or 0) if tag("lock_generation").isdigit() else 0,
        time_ns=int(tags.get(f"{TAG}time_ns", "0") or 0),
    )
    if seq:  # the digest of the tags as stored now (verify compares it with the one written)
        stored = {key: tags.get(key, "") for key in _tags(entry)}
        entry.recomputed = digest(entry.run_id, stored, seq, entry.prev)
    return entry


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
