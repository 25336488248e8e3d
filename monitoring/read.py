"""Reading the inference log back: the segments a window needs, batch by batch.

The writer (``serving.inference_log``) uploads Parquet segments to one run per
(model, version) in the experiment ``stageflow-inference``; a segment's file name
starts with the UTC time of its first row, so the reader lists ``segments/``, keeps
the ones that can overlap the window (those starting inside it, and the last one of
each writer stream that started before it), downloads them and reads them in
batches, keeping only the rows inside the window.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from monitoring.window import Window
from serving import inference_log
from stageflow import tracking

logger = logging.getLogger(__name__)

# The names the writer and the reader agree on (MONITORING_CONTRACT.md), from the writer.
INFERENCE_EXPERIMENT = inference_log.EXPERIMENT
MODEL_TAG, VERSION_TAG = inference_log.TAG_MODEL, inference_log.TAG_VERSION
KIND_TAG, INFERENCE_KIND = inference_log.TAG_KIND, inference_log.KIND
SEGMENTS = inference_log.SEGMENTS_DIR
INPUT_PREFIX = inference_log.INPUT_PREFIX
TIME_FORMAT = inference_log.SEGMENT_TIME_FORMAT
BATCH_ROWS = 65_536
DOWNLOAD_THREADS = 4
# Text columns whose values are (nearly) all different: read as plain strings.
UNIQUE_TEXT = frozenset({"request_id", "id"})
# What the monitor needs of a row; the ids only to join labels.
MONITOR_COLUMNS = ["source", "row", "outcome", "problem", "latency_ms", "prediction"]


@dataclass(frozen=True)
class Segment:
    path: str  # artifact path, segments/<name>
    start: datetime
    stream: str  # <source>-<pid>: one writer's sequence of segments
    seq: int

    @classmethod
    def parse(cls, path: str) -> Segment | None:
        name = Path(path).name
        if not name.endswith(".parquet"):
            return None
        stem = name[: -len(".parquet")]
        stamp, _, rest = stem.partition("-")
        try:
            start = datetime.strptime(stamp, TIME_FORMAT).replace(tzinfo=UTC)
            stream, seq = rest.rsplit("-", 1)
            return cls(path, start, stream, int(seq))
        except ValueError:
            logger.warning("ignoring inference-log artifact %s: not a segment name", path)
            return None


def log_runs(client, model: str, versions=None) -> dict[str, str]:
    """``{version: run_id}`` of the inference-log runs of ``model``."""
    experiment = client.get_experiment_by_name(INFERENCE_EXPERIMENT)
    if experiment is None:
        return {}
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{MODEL_TAG}` = {tracking.filter_value(model)} "
        f"and tags.`{KIND_TAG}` = '{INFERENCE_KIND}'",
        max_results=1000,
    )
    found = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        version = run.data.tags.get(VERSION_TAG)
        if version and (versions is None or version in {str(v) for v in versions}):
            found.setdefault(version, run.info.run_id)
    return found


def overlapping(segments: list[Segment], window: Window | None) -> list[Segment]:
    """The segments that can hold rows of ``window`` (all of them when it is None)."""
    if window is None:
        return sorted(segments, key=lambda s: (s.start, s.stream, s.seq))
    chosen = []
    streams: dict[str, list[Segment]] = {}
    for segment in segments:
        streams.setdefault(segment.stream, []).append(segment)
    for stream in streams.values():
        stream.sort(key=lambda s: (s.start, s.seq))
        before = [s for s in stream if s.start < window.start]
        if before:  # it may run on into the window
            chosen.append(before[-1])
        chosen += [s for s in stream if window.start <= s.start < window.end]
    return sorted(chosen, key=lambda s: (s.start, s.stream, s.seq))


def iter_version(
    client,
    run_id: str,
    window: Window | None,
    batch_rows: int = BATCH_ROWS,
    columns: list[str] | None = None,
) -> Iterator[pd.DataFrame]:
    """The logged rows of one version's run inside ``window``, as DataFrames of bounded size.

    ``columns`` reads only those (where a segment has them), ``time`` always; a name
    ending in ``*`` reads every column it starts (``input.*``).
    """
    listed = client.list_artifacts(run_id, SEGMENTS)
    segments = [s for s in (Segment.parse(f.path) for f in listed if not f.is_dir) if s]
    chosen = overlapping(segments, window)
    if not chosen:
        return
    with tempfile.TemporaryDirectory(prefix="stageflow-log-") as tmp:

        def fetch(segment: Segment) -> str:
            return client.download_artifacts(run_id, segment.path, tmp)

        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            for local in pool.map(fetch, chosen):
                yield from _read(local, window, batch_rows, columns)


def _read(
    path: str, window: Window | None, batch_rows: int, columns: list[str] | None = None
) -> Iterator[pd.DataFrame]:
    schema = pq.read_schema(path)
    # Text columns of few values (outcome, problem, categorical inputs, class labels) come
    # back as pandas categoricals: counting them is then a bincount, not a hash per row.
    strings = [
        f.name
        for f in schema
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
        if f.name not in UNIQUE_TEXT
    ]
    parquet = pq.ParquetFile(path, read_dictionary=strings)
    if columns is not None:
        wanted = ["time"]
        for c in columns:
            if c.endswith("*"):
                wanted += [n for n in schema.names if n.startswith(c[:-1])]
            elif c in schema.names:
                wanted.append(c)
        columns = list(dict.fromkeys(wanted))
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
        frame = batch.to_pandas()
        if window is not None and len(frame):
            times = frame["time"]
            if not isinstance(times.dtype, pd.DatetimeTZDtype):
                times = pd.to_datetime(times, utc=True)
            inside = (times >= window.start) & (times < window.end)
            if not inside.all():
                frame = frame[inside]
        if len(frame):
            yield frame


def read_log(model: str, since=None, tracking_uri: str | None = None, versions=None):
    """The inference log of ``model`` in one DataFrame (the contract's segment schema).

    Args:
        model: the registered model.
        since: a duration (``"1h"``), a ``Window``, or None for everything logged.
        tracking_uri: the tracking server (default: ``MLFLOW_TRACKING_URI``, then local).
        versions: only these versions (default: every version that logged rows).

    Example:
        >>> read_log("churn", since="15m").groupby("version").size()
    """

    client = tracking.client(tracking_uri)
    window = since if isinstance(since, Window) or since is None else Window.ending_now(since)
    frames = [
        frame
        for run_id in log_runs(client, model, versions).values()
        for frame in iter_version(client, run_id, window)
    ]
    if not frames:
        return pd.DataFrame(
            columns=["time", "model", "version", "source", "request_id", "row", "id"]
            + ["outcome", "problem", "latency_ms", "prediction"]
        )
    return pd.concat(frames, ignore_index=True)
