"""The inference log's writer: what a served version saw and answered, as Parquet segments.

Every request a replica answers becomes rows (one per input row) in the segment
schema of MONITORING_CONTRACT.md: time, model, version, source, request id, the
row's index, the client's own id, the guard's outcome and problem, the latency,
the prediction and the row as the contract checked it (``input.<column>``).

The request path only hands over references: the guard's checked numpy arrays
and the predictions go onto a bounded queue (~1 µs). A background thread turns
them into Arrow tables and writes a segment at least every ``flush_seconds``
and at shutdown; another uploads each segment to the tracking server's artifact
store (experiment ``stageflow-inference``, one run per model version, artifacts
under ``segments/``) so a monitor on another machine reads it. Nothing here
blocks or fails a request: a full queue, a slow or full disk, an unwritable
folder or an unreachable tracking server cost rows, which are counted and said
in the server's log, never an answer. Local segments are a bounded cache
(``retention``: size and age); the artifact store keeps what was uploaded.

Public: :class:`InferenceLog`, :class:`LogSettings`, :func:`parse_mode`,
:func:`parse_retention`, the schema constants, and (for the model server)
:func:`attach`.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import contextvars
import json
import logging
import os
import queue
import random
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving import _admission
from serving._mirror import STATS_PATH, Mirror
from serving.log_options import parse_mode, parse_retention
from stageflow import tracking

logger = logging.getLogger(__name__)

# -- the contract's names (MONITORING_CONTRACT.md) -----------------------------------------
EXPERIMENT = "stageflow-inference"
SEGMENTS_DIR = "segments"
TAG_MODEL, TAG_VERSION, TAG_KIND = "stageflow.model", "stageflow.version", "stageflow.kind"
KIND = "inference-log"
ONLINE, BATCH, SHADOW = "online", "batch", "shadow"
ACCEPTED, REFUSED, FLAGGED = "accepted", "refused", "flagged"
INPUT_PREFIX = "input."
SHADOW_OF = "shadow_of"  # on shadow rows: the Production version that answered the client
SEGMENT_TIME_FORMAT = "%Y%m%dT%H%M%S%fZ"
REQUEST_ID_HEADER = "X-Request-Id"
# The controller's own proof requests carry this header and are not logged.
PROBE_HEADER = "X-Stageflow-Probe"
MODES = ("off", "sample:FRACTION", "all")
INFERENCE_LOG = "inference_log"  # the model_config key (serving/guarded_model.py reads it)

FLUSH_SECONDS = 10.0
WAKE_SECONDS = 0.25
# Bounds on what waits for the writer: past either, new requests are dropped (and counted).
QUEUE_REQUESTS = 50_000
QUEUE_ROWS = 500_000
SEGMENT_ROWS = 200_000
DEFAULT_RETENTION = "1GB,7d"
DROP_WARNING_SECONDS = 10.0
UPLOAD_RETRY_SECONDS = 30.0
SHUTDOWN_SECONDS = 8.0

# -- settings -------------------------------------------------------------------------------


class LogSettings(BaseModel):
    """What to log and where: the ``inference_log`` entry of a replica's model_config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    version: str
    mode: str = "all"
    retention: str = DEFAULT_RETENTION
    id_column: str | None = None
    directory: str | None = None
    home: str | None = None
    tracking_uri: str | None = None
    source: str = ONLINE
    flush_seconds: float = FLUSH_SECONDS
    upload: bool = True
    # What each replica admits (serving/_admission.py): rows per request, requests at once.
    max_rows: int = Field(default=_admission.MAX_ROWS, ge=1)
    max_concurrency: int = Field(default=_admission.MAX_CONCURRENCY, ge=1)
    # `serve --shadow`: the controller's file naming the warm Staging replicas to mirror
    # answered requests to (serving/_mirror.py); None: no mirroring.
    shadow_file: str | None = None

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        parse_mode(value)
        return value

    @field_validator("retention")
    @classmethod
    def _retention(cls, value: str) -> str:
        parse_retention(value)
        return value

    @property
    def fraction(self) -> float:
        return parse_mode(self.mode)


def serving_config(model_config: dict | None, home: Path) -> dict:
    """``model_config`` with its ``inference_log`` entry completed for the replicas.

    The log is on (``all``) unless the entry says otherwise; its segments wait
    under ``home``. Model, version and tracking URI are added per replica.
    """
    config = dict(model_config or {})
    config[INFERENCE_LOG] = {"mode": "all", "home": str(home), **(config.get(INFERENCE_LOG) or {})}
    return config


def local_directory(home: Path, model: str, version: str) -> Path:
    """Where a version's segments wait: ``HOME/serve/inference/<model>/v<version>/``."""
    return Path(home) / "serve" / "inference" / _file_safe(model) / f"v{version}"


# -- what one request leaves -------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    """One answered request, as the request path leaves it: references, no copies.

    ``numeric`` (rows × numeric columns, float) and ``categorical`` (one object
    array per categorical column) are the guard's checked arrays; ``problems``
    holds per-row problems of flagged rows (None where accepted).
    """

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    time_us: int = 0
    latency_ms: float | None = None
    numeric: np.ndarray | None = None
    categorical: list | None = None
    predictions: Any = None
    ids: Any = None
    problems: np.ndarray | None = None
    refused: dict | None = None
    first_row: int = 0
    rows: int = 0
    # A mirrored request (`serve --shadow`): logged as source `shadow`, and the
    # Production version whose answer it shadows.
    source: str | None = None
    shadow_of: str | None = None

    def refuse(self, problem: str, row: int | None = None) -> None:
        self.refused = {"problem": problem, "row": -1 if row is None else int(row)}
        self.numeric = self.categorical = self.predictions = None

    def finish(self, status: int | None = None) -> None:
        """Stamp the answer's time and latency; an answer predict never saw counts as refused."""
        self.time_us = time.time_ns() // 1000
        self.latency_ms = (time.perf_counter() - self.started) * 1000.0
        if self.refused is None and self.predictions is None:
            self.refuse(f"http_{status}" if status else "no_answer")
        if self.refused is None:
            self.rows = len(self.predictions)
        else:
            self.rows = 1


_CURRENT: contextvars.ContextVar[Request | None] = contextvars.ContextVar(
    "stageflow_inference_request", default=None
)


def current_request() -> Request | None:
    """The request being answered on this thread when it is logged, else None."""
    return _CURRENT.get()


# -- the writer ------------------------------------------------------------------------------


class InferenceLog:
    """A background writer of one model version's inference log.

    Args:
        settings: model, version, mode, retention, directory, tracking URI.
        numeric: the contract's numeric input columns, in the guard's order.
        categorical: its categorical input columns, in the guard's order.
        classify: predictions are class labels (logged as text) rather than numbers.

    Example:
        >>> log = InferenceLog(LogSettings(model="wine", version="3", source="batch"),
        ...                    numeric=["alcohol"], categorical=[]).start()
        >>> log.record_frame(frame, predictions, request_id=run_id, block=True)
        >>> log.close()  # flush and upload what is left
    """

    def __init__(
        self,
        settings: LogSettings,
        numeric: list[str],
        categorical: list[str],
        classify: bool = True,
        queue_requests: int = QUEUE_REQUESTS,
        queue_rows: int = QUEUE_ROWS,
    ):
        self.settings = settings
        self.numeric, self.categorical, self.classify = list(numeric), list(categorical), classify
        self.fraction = settings.fraction
        self.max_bytes, self.max_age = parse_retention(settings.retention)
        home = settings.home or os.environ.get("STAGEFLOW_HOME", ".stageflow")
        self.directory = Path(
            settings.directory
            or local_directory(Path(home).resolve(), settings.model, settings.version)
        )
        self.dropped = 0  # rows lost: queue full, disk trouble, retention before upload
        self.written = 0  # rows in segments on disk
        self.uploaded = 0  # segments in the artifact store
        # A deque, not a queue.Queue: appending takes no lock and wakes no thread (the
        # writer polls), so the request path pays ~1 µs. Rows in and out are counted by
        # one thread each, so neither count loses an update.
        self._queue: collections.deque = collections.deque()
        self._queue_requests = queue_requests
        self._rows_in = self._rows_out = 0
        self._queue_rows = queue_rows
        self._lock = threading.Lock()
        self._uploads: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._seq = 0
        self._warned_at = -DROP_WARNING_SECONDS
        self._run_id: str | None = None
        self._schema: pa.Schema | None = None

    @classmethod
    def for_model(cls, pyfunc, model: str, version: str, **settings) -> InferenceLog:
        """A log for a loaded guarded model (batch scoring): its columns and task from its contract.

        ``settings`` are :class:`LogSettings` fields (``source="batch"``, ``tracking_uri``,
        ``id_column``, ...). Start it, ``record_frame`` each chunk, ``close`` at the end.
        """
        guarded = pyfunc.unwrap_python_model()
        guard = guarded.guard
        return cls(
            LogSettings(model=model, version=str(version), **{"source": BATCH, **settings}),
            guard.numeric_names,
            _text_columns(guard),
            classify=guarded.classify,
        )

    # -- the request side (cheap, never raises) --

    def sampled(self) -> bool:
        """Whether the next request is logged (``sample:F`` keeps a fraction F at random)."""
        return self.fraction >= 1.0 or (self.fraction > 0.0 and random.random() < self.fraction)

    def record(self, request: Request, block: bool = False) -> bool:
        """Hand a finished request to the writer; False (and counted) if it was dropped."""
        rows = request.rows
        while True:
            queued = self._rows_in - self._rows_out
            full = len(self._queue) >= self._queue_requests or (
                queued > 0 and queued + rows > self._queue_rows
            )
            if not (full and block and self._threads and not self._stop.is_set()):
                break
            time.sleep(0.01)  # batch scoring waits for the writer instead of dropping
        if full:
            self._drop(rows, "the writer's queue is full")
            return False
        self._rows_in += rows
        self._queue.append(request)
        return True

    def record_frame(
        self,
        frame: pd.DataFrame,
        predictions,
        request_id: str,
        first_row: int = 0,
        ids=None,
        block: bool = True,
    ) -> bool:
        """Log checked rows given as a DataFrame (batch): ``row`` counts from ``first_row``."""
        numeric = (
            frame[self.numeric].to_numpy(dtype=np.float64, na_value=np.nan)
            if self.numeric
            else np.empty((len(frame), 0))
        )
        categorical = [frame[name].to_numpy(dtype=object) for name in self.categorical]
        request = Request(
            request_id=request_id,
            numeric=numeric,
            categorical=categorical,
            predictions=np.asarray(predictions),
            ids=None if ids is None else np.asarray(ids, dtype=object),
            first_row=first_row,
        )
        request.finish()
        request.latency_ms = None  # batch rows have no request latency
        return self.record(request, block=block)

    def _drop(self, rows: int, why: str) -> None:
        with self._lock:
            self.dropped += rows
            total = self.dropped
            now = time.monotonic()
            say = now - self._warned_at >= DROP_WARNING_SECONDS
            if say:
                self._warned_at = now
        if say:
            logger.warning(
                "inference log of %s version %s: dropped %d row(s) so far (%s); serving goes on",
                self.settings.model,
                self.settings.version,
                total,
                why,
            )

    # -- lifecycle --

    def start(self) -> InferenceLog:
        """Start the writer and uploader threads; segments left by earlier processes upload too."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            logger.warning(
                "inference log: cannot create %s (%s); rows will be dropped and counted",
                self.directory,
                exc.strerror or exc,
            )
        names = [("writer", self._write_loop)]
        if self.settings.upload:
            names.append(("uploader", self._upload_loop))
            for path in sorted(self.directory.glob("*.parquet")) if self.directory.is_dir() else []:
                self._uploads.put(path)
        for what, target in names:
            thread = threading.Thread(target=target, name=f"inference-log-{what}", daemon=True)
            thread.start()
            self._threads.append(thread)
        atexit.register(self.close)
        return self

    def close(self, timeout: float = SHUTDOWN_SECONDS) -> None:
        """Write what is buffered, upload what is written (within ``timeout``), stop the threads."""
        if self._stop.is_set():
            return
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        logger.info(
            "inference log of %s version %s closed: %d row(s) written, %d segment(s) uploaded, "
            "%d row(s) dropped",
            self.settings.model,
            self.settings.version,
            self.written,
            self.uploaded,
            self.dropped,
        )

    def flush(self, timeout: float = 30.0) -> None:
        """Write what is queued now (for tests and batch ends); uploads follow in the background."""
        done = threading.Event()
        self._queue.append(done)
        done.wait(timeout)

    def wait_uploaded(self, timeout: float = 60.0) -> bool:
        """Block until every written segment reached the artifact store (True) or ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._uploads.unfinished_tasks == 0:
                return True
            time.sleep(0.05)
        return False

    # -- the writer thread --

    def _write_loop(self) -> None:
        # Wakes a few times a second and takes everything queued, rather than waking per
        # request: each wake-up would take the GIL from the thread answering requests.
        buffered: list[Request] = []
        rows = 0
        opened = time.monotonic()
        while True:
            stopping = self._stop.wait(WAKE_SECONDS)
            flushes = []
            while True:
                try:
                    item = self._queue.popleft()
                except IndexError:
                    break
                if isinstance(item, threading.Event):
                    flushes.append(item)
                    continue
                self._rows_out += item.rows
                if not buffered:
                    opened = time.monotonic()
                buffered.append(item)
                rows += item.rows
                if rows >= SEGMENT_ROWS:
                    self._write_segment(buffered, rows)
                    buffered, rows = [], 0
            due = flushes or stopping or time.monotonic() - opened >= self.settings.flush_seconds
            if buffered and due:
                self._write_segment(buffered, rows)
                buffered, rows = [], 0
                self._apply_retention()
            for flushed in flushes:
                flushed.set()
            if stopping:
                return

    def _write_segment(self, requests: list[Request], rows: int) -> None:
        started = datetime.fromtimestamp(requests[0].time_us / 1e6, tz=UTC)
        self._seq += 1
        name = (
            f"{started.strftime(SEGMENT_TIME_FORMAT)}-{self.settings.source}-"
            f"{os.getpid()}-{self._seq:06d}.parquet"
        )
        path = self.directory / name
        partial = self.directory / f".{name}.partial"
        try:
            table = self.table(requests)
            pq.write_table(table, partial, compression="zstd")
            os.replace(partial, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            self._drop(rows, f"cannot write {path}: {exc.strerror or exc}")
            return
        except Exception as exc:  # a bad row must never stop the writer
            logger.exception("inference log: could not build a segment")
            self._drop(rows, f"could not build a segment: {type(exc).__name__}")
            return
        self.written += rows
        if self.settings.upload:
            self._uploads.put(path)

    def schema(self) -> pa.Schema:
        """The segment schema for this version's columns."""
        if self._schema is None:
            fields = [
                pa.field("time", pa.timestamp("us", tz="UTC")),
                pa.field("model", pa.string()),
                pa.field("version", pa.string()),
                pa.field("source", pa.string()),
                pa.field("request_id", pa.string()),
                pa.field("row", pa.int64()),
                pa.field("id", pa.string()),
                pa.field("outcome", pa.string()),
                pa.field("problem", pa.string()),
                pa.field("latency_ms", pa.float64()),
                pa.field("prediction", pa.string() if self.classify else pa.float64()),
                # Added with `serve --shadow`; segments written before lack it (readers
                # take a missing column as all null).
                pa.field(SHADOW_OF, pa.string()),
            ]
            fields += [pa.field(INPUT_PREFIX + n, pa.float64()) for n in self.numeric]
            fields += [pa.field(INPUT_PREFIX + n, pa.string()) for n in self.categorical]
            self._schema = pa.schema(fields)
        return self._schema

    def table(self, requests: list[Request]) -> pa.Table:
        """The requests' rows as one Arrow table in the segment schema."""
        counts = np.array([r.rows for r in requests], dtype=np.int64)
        total = int(counts.sum())
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        row = np.empty(total, dtype=np.int64)
        outcome = np.full(total, ACCEPTED, dtype=object)
        problem = np.full(total, None, dtype=object)
        ids = np.full(total, None, dtype=object)
        prediction = np.full(total, None if self.classify else np.nan, dtype=object)
        numeric = np.full((total, len(self.numeric)), np.nan)
        categorical = [np.full(total, None, dtype=object) for _ in self.categorical]
        for r, start, n in zip(requests, starts, counts, strict=True):
            end = start + n
            if r.refused is not None:
                row[start] = r.refused["row"]
                outcome[start], problem[start] = REFUSED, r.refused["problem"]
                continue
            row[start:end] = np.arange(r.first_row, r.first_row + n)
            prediction[start:end] = (
                np.asarray(r.predictions).astype(str) if self.classify else r.predictions
            )
            if r.numeric is not None and r.numeric.size:
                numeric[start:end] = r.numeric
            for column, values in zip(categorical, r.categorical or [], strict=False):
                column[start:end] = values
            if r.ids is not None:
                ids[start:end] = r.ids
            if r.problems is not None:
                flagged = np.asarray([p is not None for p in r.problems])
                outcome[start:end][flagged] = FLAGGED
                problem[start:end] = r.problems
        columns = [
            pa.array(
                np.repeat([r.time_us for r in requests], counts), pa.timestamp("us", tz="UTC")
            ),
            pa.array(np.full(total, self.settings.model, dtype=object), pa.string()),
            pa.array(np.full(total, self.settings.version, dtype=object), pa.string()),
            pa.array(
                np.repeat(
                    np.array([r.source or self.settings.source for r in requests], dtype=object),
                    counts,
                ),
                pa.string(),
            ),
            pa.array(
                np.repeat(np.array([r.request_id for r in requests], dtype=object), counts),
                pa.string(),
            ),
            pa.array(row),
            _text(ids),
            pa.array(outcome, pa.string()),
            pa.array(problem, pa.string()),
            pa.array(
                np.repeat(
                    np.array([np.nan if r.latency_ms is None else r.latency_ms for r in requests]),
                    counts,
                ),
                pa.float64(),
                from_pandas=True,
            ),
            _text(prediction)
            if self.classify
            else pa.array(prediction.astype(np.float64), pa.float64(), from_pandas=True),
            pa.array(
                np.repeat(np.array([r.shadow_of for r in requests], dtype=object), counts),
                pa.string(),
            ),
        ]
        columns += [
            pa.array(numeric[:, j], pa.float64(), from_pandas=True) for j in range(numeric.shape[1])
        ]
        columns += [_text(values) for values in categorical]
        return pa.Table.from_arrays(columns, schema=self.schema())

    def _apply_retention(self) -> None:
        """Delete local segments past the age bound, then the oldest past the size bound."""
        try:
            paths = sorted(self.directory.glob("*.parquet"))
            now = time.time()
            sizes = {}
            for path in paths:
                stat = path.stat()
                if self.max_age is not None and now - stat.st_mtime > self.max_age:
                    self._remove(path)
                else:
                    sizes[path] = stat.st_size
            if self.max_bytes is not None:
                total = sum(sizes.values())
                for path in sorted(sizes):
                    if total <= self.max_bytes:
                        break
                    total -= sizes[path]
                    self._remove(path)
        except OSError as exc:
            logger.warning("inference log: retention could not check %s: %s", self.directory, exc)

    def _remove(self, path: Path) -> None:
        pending = self._pending(path)
        rows = 0
        if pending:
            with contextlib.suppress(Exception):
                rows = pq.read_metadata(path).num_rows
        path.unlink(missing_ok=True)
        _uploaded_marker(path).unlink(missing_ok=True)
        if pending and rows:
            self._drop(rows, f"retention deleted {path.name} before it was uploaded")

    def _pending(self, path: Path) -> bool:
        return self.settings.upload and not _uploaded_marker(path).exists()

    # -- the uploader thread --

    def _upload_loop(self) -> None:
        retry_at = 0.0
        waiting: list[Path] = []
        writer = self._threads[0]
        while True:
            finishing = self._stop.is_set() and not writer.is_alive()
            try:
                waiting.append(self._uploads.get(timeout=0.2))
                continue  # take everything queued, then upload in one pass
            except queue.Empty:
                pass
            if waiting and (finishing or time.monotonic() >= retry_at):
                waiting = self._upload(waiting)
                if waiting:
                    retry_at = time.monotonic() + UPLOAD_RETRY_SECONDS
            if finishing and self._uploads.empty():
                for _ in waiting:  # left on disk: the next process for this version uploads them
                    self._uploads.task_done()
                return

    def _upload(self, paths: list[Path]) -> list[Path]:
        """Upload ``paths``; returns those that must be tried again."""
        from mlflow import MlflowClient  # noqa: PLC0415 - only where segments are uploaded

        left = []
        for i, path in enumerate(paths):
            if not path.exists() or _uploaded_marker(path).exists():
                self._uploads.task_done()
                continue
            try:
                client = MlflowClient(self.settings.tracking_uri)
                if self._run_id is None:
                    self._run_id = find_or_create_run(
                        client, self.settings.model, self.settings.version
                    )
                client.log_artifact(self._run_id, str(path), SEGMENTS_DIR)
            except Exception as exc:  # noqa: BLE001 - the tracking server may be away; retry later
                logger.warning(
                    "inference log: could not upload %s to the tracking server (%s); "
                    "retrying in %.0fs",
                    path.name,
                    str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
                    UPLOAD_RETRY_SECONDS,
                )
                left = paths[i:]
                break
            with contextlib.suppress(OSError):
                _uploaded_marker(path).touch()
            self.uploaded += 1
            self._uploads.task_done()
        return left


def find_or_create_run(client, model: str, version: str) -> str:
    """The run holding ``model`` version ``version``'s segments (created once, shared by replicas).

    Two replicas may create it at once; both then keep the oldest one and the
    other is deleted, so every segment lands in one run.
    """
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(EXPERIMENT)
        except Exception:  # noqa: BLE001 - another process created it first
            experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    else:
        experiment_id = experiment.experiment_id

    def existing():
        return client.search_runs(
            [experiment_id],
            filter_string=(
                f"tags.`{TAG_MODEL}` = {tracking.filter_value(model)} and tags.`{TAG_VERSION}` = "
                f"{tracking.filter_value(version)} and tags.`{TAG_KIND}` = '{KIND}'"
            ),
            order_by=["attributes.start_time ASC"],
            max_results=10,
        )

    runs = existing()
    if runs:
        return runs[0].info.run_id
    run = client.create_run(
        experiment_id,
        tags={TAG_MODEL: model, TAG_VERSION: str(version), TAG_KIND: KIND},
        run_name=f"inference-{model}-v{version}",
    )
    client.set_terminated(run.info.run_id)
    runs = existing()
    keep = min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
    if keep != run.info.run_id:
        client.delete_run(run.info.run_id)
    return keep


def _text_columns(guard) -> list[str]:
    """The guard's columns checked as objects, in the order its ``check`` returns them:
    categorical, then dates (logged as ISO text)."""
    return list(getattr(guard, "object_names", guard.categorical_names))


def _uploaded_marker(path: Path) -> Path:
    return path.with_name(f".{path.name}.uploaded")


def _text(values: np.ndarray) -> pa.Array:
    """An object array as Arrow text: None stays null, everything else as ``str``."""
    try:
        return pa.array(values, pa.string(), from_pandas=True)
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return pa.array(
            [
                None
                if v is None or (isinstance(v, float) and v != v)
                else v.isoformat()
                if hasattr(v, "isoformat")
                else str(v)
                for v in values
            ],
            pa.string(),
        )


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# -- inside the model server ---------------------------------------------------------------------


class RequestIds:
    """ASGI middleware: the request id of every ``/invocations`` answer, and its log record.

    Takes the client's ``X-Request-Id`` (the front door sets one when the client
    did not), else makes one; answers with it; and, when the request is sampled,
    opens the :class:`Request` record that the guarded model's ``predict``
    fills in (through a contextvar, which ``asyncio.to_thread`` carries into the
    thread MLflow predicts on) and hands it to the log once the answer is sent.
    """

    def __init__(self, app, log: InferenceLog | None = None, mirror: Mirror | None = None):
        self.app, self.log, self.mirror = app, log, mirror

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan" and self.log is not None:
            await self.app(scope, receive, self._closing(send))
            return
        if scope["type"] == "http" and scope["path"] == STATS_PATH:
            await self._stats(send)
            return
        if scope["type"] != "http" or scope["path"] != "/invocations":
            await self.app(scope, receive, send)
            return
        request_id, probe, shadow_of, content_type = None, False, None, None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                request_id = value.decode("latin-1")
            elif key == b"x-stageflow-probe":
                probe = True
            elif key == b"x-stageflow-shadow":
                shadow_of = value.decode("latin-1")
            elif key == b"content-type":
                content_type = value.decode("latin-1")
        # Only requests that bypass the front door lack one; 16 random bytes as hex cost
        # ~3 µs where uuid4() measured ~40 µs here.
        request_id = request_id or os.urandom(16).hex()
        header = (b"x-request-id", request_id.encode("latin-1"))
        if self.log is None or probe:
            record = None
        elif shadow_of is not None:
            # Mirrored by the Production replica, which logged it: every one is logged here
            # too, under this (the shadow) version, so the two pair up row by row.
            record = Request(request_id, source=SHADOW, shadow_of=shadow_of)
        else:
            record = Request(request_id) if self.log.sampled() else None
        # Mirror what this replica logs (so both sides have the same rows), never a mirror.
        mirror = (
            self.mirror
            if record is not None and shadow_of is None and self.mirror is not None
            else None
        )
        if mirror is not None and mirror.shadow_version is not None:
            body: list[bytes] = []
            receive = _keeping(receive, body)
        else:
            mirror = None
        status = [None]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        token = _CURRENT.set(record)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _CURRENT.reset(token)
            if record is not None:
                record.finish(status[0])
                self.log.record(record)
            # The answer has gone out; the copy waits on the mirror's bounded queue.
            if mirror is not None and status[0] is not None and status[0] < 500:
                mirror.offer(b"".join(body), content_type, request_id)

    async def _stats(self, send) -> None:
        """``GET STATS_PATH``: this replica's shadow mirror and inference log counts, as JSON."""
        stats = {
            "shadow": self.mirror.stats() if self.mirror is not None else None,
            "inference_log": None
            if self.log is None
            else {"written": self.log.written, "dropped": self.log.dropped},
        }
        data = json.dumps(stats).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})

    def _closing(self, send):
        """``send`` that writes and uploads what the log holds before the server says it stopped."""

        async def send_closing(message):
            if message["type"] == "lifespan.shutdown.complete":
                await asyncio.to_thread(self.log.close)
            await send(message)

        return send_closing


def _keeping(receive, parts: list[bytes]):
    """``receive`` that also keeps the request body's chunks (references, no copies)."""

    async def receive_keeping():
        message = await receive()
        if message["type"] == "http.request":
            parts.append(message.get("body", b""))
        return message

    return receive_keeping


def _install_on_next_app(
    log: InferenceLog | None, settings: LogSettings, mirror: Mirror | None = None
) -> None:
    """Make the FastAPI app MLflow's scoring server builds next carry :class:`RequestIds`
    and, inside it, :class:`serving._admission.Admission` with the settings' limits.

    Why this way: ``mlflow models serve`` stays the engine, and its scoring server
    (mlflow/pyfunc/scoring_server, MLflow 3.17) reads no request header and offers
    no hook for middleware: ``app.py`` loads the model, then ``init(model)``
    builds ``FastAPI()`` and returns it to uvicorn. The model loads first, so at
    load time it can arrange that the one app built next in this process gets a
    pure-ASGI middleware (``FastAPI(middleware=[...])``, a public argument), after
    which FastAPI is exactly as before. No fork of MLflow, no proxy process,
    nothing per request but the middleware. If MLflow changes this order, the
    serving tests that check ``X-Request-Id`` fail.
    """
    import fastapi  # noqa: PLC0415 - only inside the model server
    from starlette.middleware import Middleware  # noqa: PLC0415

    original = fastapi.FastAPI

    class _FastAPIWithRequestIds(original):
        def __init__(self, *args, **kwargs):
            fastapi.FastAPI = original  # one app only
            kwargs["middleware"] = [
                Middleware(RequestIds, log=log, mirror=mirror),
                Middleware(
                    _admission.Admission,
                    max_rows=settings.max_rows,
                    max_concurrency=settings.max_concurrency,
                ),
                *(kwargs.get("middleware") or []),
            ]
            super().__init__(*args, **kwargs)

    fastapi.FastAPI = _FastAPIWithRequestIds


def in_model_server() -> bool:
    """Whether this process is MLflow's scoring server (``mlflow models serve``)."""
    from mlflow.pyfunc import scoring_server  # noqa: PLC0415

    return scoring_server._SERVER_MODEL_PATH in os.environ  # noqa: SLF001 - set only by `models serve`


def attach(guard, classify: bool, config: dict) -> InferenceLog | None:
    """Called by the guarded model as it loads with an ``inference_log`` model_config entry.

    Inside ``mlflow models serve`` it installs :class:`RequestIds` (answers carry
    ``X-Request-Id`` even with the log off) and, unless the mode is ``off``,
    starts the version's :class:`InferenceLog`, which it returns. With a
    ``shadow_file`` (``serve --shadow``) it also starts the replica's shadow
    :class:`serving._mirror.Mirror`.
    """
    settings = LogSettings(**config)
    if not in_model_server():
        return None
    if not logger.handlers:  # this process's entry point is uvicorn: say what the log does
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    log = None
    if settings.fraction > 0.0:
        log = InferenceLog(
            settings, guard.numeric_names, _text_columns(guard), classify=classify
        ).start()
        logger.info(
            "inference log of %s version %s: %s, segments in %s",
            settings.model,
            settings.version,
            settings.mode,
            log.directory,
        )
    mirror = None
    if log is not None and settings.shadow_file:
        mirror = Mirror(settings.shadow_file, settings.version).start()
    _install_on_next_app(log, settings, mirror)
    return log
