"""Batch scoring: a CSV or Parquet input through the Production version, locally or on Spark.

The same registered model that ``serve`` puts behind the front door scores the
input. The ``local`` engine reads one file chunk by chunk so memory stays flat
however large it is; the output is written beside its final name and renamed
when complete, so a failure never leaves a half-written file that looks
finished. The ``spark`` engine (``serving/_spark.py``, the ``stageflow[spark]``
extra) runs the same model as ``mlflow.pyfunc.spark_udf`` over a file or a
directory of parts and writes Parquet parts.

Either way the version is resolved once, a run in ``stageflow-batch`` records
what was scored, and the rows reach the inference log as ``batch`` rows. With
``on_invalid="mark"`` (Spark's default) a row the data contract refuses does not
fail the job: it gets a null prediction and the refusal's problem in
``guard_problem``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.exceptions import MlflowException
from tqdm import tqdm

from registry import PRODUCTION, current_version, require_model
from serving import guarded_model
from serving.guarded_model import GUARD_PROBLEM
from serving.inference_log import BATCH, InferenceLog
from stageflow import files, manifest, tracking
from stageflow.contract import input_columns
from stageflow.errors import StageflowError, UsageError
from stageflow.files import FILE_SUFFIXES, file_digest

logger = logging.getLogger(__name__)

BATCH_EXPERIMENT = "stageflow-batch"
PREDICTION_COLUMN = "prediction"
VERSION_COLUMN = "model_version"
DEFAULT_CHUNK_ROWS = 50_000
ENGINES = ("local", "spark")
ON_INVALID = ("fail", "mark")
# What each engine does with a row the contract refuses unless told: locally the
# file fails as it always has; on Spark one bad row must not fail a night's job.
DEFAULT_ON_INVALID = {"local": "fail", "spark": "mark"}
# String columns are read as strings in every chunk (a chunk whose values are all
# missing would otherwise come back as floats); numbers are left to the model's
# schema, so a bad value is reported with its rows.
CSV_DTYPES = {"string": "str"}
NUMBER_TYPES = ("double", "float", "long", "integer")


@dataclass
class ScoreResult:
    model: str
    version: str
    rows: int
    seconds: float
    output: str
    input_digest: str
    run_id: str
    engine: str = "local"
    on_invalid: str = "fail"
    refused: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Scored:
    """What an engine reports back: rows scored and refused rows by problem."""

    rows: int
    refused: Counter
    detail: dict = field(default_factory=dict)


def score(
    model: str,
    input_path: str | Path,
    output_path: str | Path,
    tracking_uri: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    model_config: dict | None = None,
    *,
    engine: str = "local",
    version: str | None = None,
    on_invalid: str | None = None,
    id_column: str | None = None,
    spark_master: str | None = None,
    progress: bool = False,
) -> ScoreResult:
    """Score ``input_path`` with the Production version (or ``version``) of ``model``.

    The output holds the input's columns, a ``prediction`` column and the
    ``model_version`` that made it (and ``guard_problem`` when rows are marked);
    a run in the ``stageflow-batch`` experiment records engine, rows, refused
    rows by problem, seconds, version and the input's digest.

    Args:
        engine: ``local`` (one file, in chunks) or ``spark`` (a file or a
            directory of parts, as ``mlflow.pyfunc.spark_udf``; Parquet parts out).
        version: score with this version instead of the Production one.
        on_invalid: ``fail`` (the first refused row fails the job) or ``mark``
            (refused rows get a null prediction and ``guard_problem``); the
            default is ``fail`` locally and ``mark`` on Spark.
        id_column: a column that identifies rows; kept in the output and written
            to the inference log as each row's ``id``.
        spark_master: Spark's master URL (default ``local[*]``).
        progress: draw a progress bar of the rows scored on stderr (local engine).

    Raises:
        UsageError: bad paths or suffixes, missing input columns, refused rows
            under ``fail``, or a missing pyspark or Java for ``spark``.
        StageflowError: the model has no Production version.
    """
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    on_invalid = on_invalid or DEFAULT_ON_INVALID[engine]
    if on_invalid not in ON_INVALID:
        raise UsageError(f"--on-invalid {on_invalid!r}: choose one of {', '.join(ON_INVALID)}")
    if engine == "spark":
        from serving import _spark  # noqa: PLC0415 - pyspark is an optional extra

        _spark.require_engine()  # before anything slow: say what to install
        input_path, output_path = _spark.check_paths(input_path, output_path)
    else:
        input_path, output_path = _check_local_paths(Path(input_path), Path(output_path))

    client = tracking.client(tracking_uri)
    require_model(client, model)
    version = _resolve_version(client, model, version)
    config = {**(model_config or {}), "on_invalid": on_invalid}
    # Fetched afresh and checked against the version's manifest before anything runs:
    # a version whose files changed in the store is refused here (stageflow.manifest).
    model_dir = manifest.local_copy(model, version, client, fresh=True)

    # The run exists before scoring, so the inference log's batch rows carry its id.
    run_id = os.environ.get("MLFLOW_RUN_ID") or _create_run(client, model, version)
    started = time.perf_counter()
    try:
        if engine == "spark":
            scored = _spark.score(
                model, version, input_path, output_path, config, id_column, spark_master, model_dir
            )
            scored.detail["logged_rows"] = log_batch_rows(
                model, version, output_path, run_id, id_column, model_dir, client.tracking_uri
            )
        else:
            scored = _score_local(
                model,
                version,
                input_path,
                output_path,
                config,
                chunk_rows,
                id_column,
                run_id,
                client.tracking_uri,
                progress,
                model_dir,
            )
    except BaseException:
        if run_id != os.environ.get("MLFLOW_RUN_ID"):
            client.set_terminated(run_id, "FAILED")
        raise
    seconds = time.perf_counter() - started
    digest = input_digest(input_path)

    if run_id != os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(BATCH_EXPERIMENT)  # the experiment the run was created in
    with mlflow.start_run(run_id=run_id) as run:
        mlflow.set_tags(
            {"stageflow.kind": "batch", "stageflow.model_name": model, "stageflow.engine": engine}
        )
        tracking.log_params(
            {
                "model": model,
                "version": version,
                "engine": engine,
                "on_invalid": on_invalid,
                "id_column": id_column or "",
                "input": str(_shown(input_path)),
                "output": str(_shown(output_path)),
                "input_sha256": digest,
                **(
                    {"chunk_rows": chunk_rows}
                    if engine == "local"
                    else {"spark_master": scored.detail.get("master", "")}
                ),
            }
        )
        mlflow.log_metrics(
            {
                "rows": scored.rows,
                "seconds": seconds,
                "rows_per_second": scored.rows / max(seconds, 1e-9),
                "refused_rows": sum(scored.refused.values()),
                **{f"refused_rows.{problem}": n for problem, n in scored.refused.items()},
                **{k: v for k, v in scored.detail.items() if isinstance(v, (int, float))},
            }
        )
    return ScoreResult(
        model=model,
        version=version,
        rows=scored.rows,
        seconds=round(seconds, 3),
        output=str(output_path),
        input_digest=digest,
        run_id=run.info.run_id,
        engine=engine,
        on_invalid=on_invalid,
        refused=dict(sorted(scored.refused.items())),
    )


def require_spark() -> None:
    """pyspark installed and Java findable, else a UsageError saying what to install."""
    from serving import _spark  # noqa: PLC0415 - pyspark is an optional extra

    _spark.require_engine()


def _create_run(client, model: str, version: str) -> str:
    experiment = client.get_experiment_by_name(BATCH_EXPERIMENT)
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(BATCH_EXPERIMENT)
    )
    return client.create_run(experiment_id, run_name=f"score-{model}-v{version}").info.run_id


def _inference_log(pyfunc, model: str, version: str, tracking_uri: str):
    """The version's inference log for ``batch`` rows, or None for a model without a guard."""
    try:
        guarded = pyfunc.unwrap_python_model()
    except MlflowException:  # not a python model (the plain scikit-learn flavor)
        return None
    if getattr(guarded, "guard", None) is None:
        return None
    return InferenceLog.for_model(
        pyfunc, model, version, source=BATCH, tracking_uri=tracking_uri
    ).start()


def _row_count(path: Path) -> int | None:
    """The input's rows when the file says so without reading it (Parquet's footer)."""
    if path.suffix.lower() != ".parquet":
        return None
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (ValueError, OSError, pa.ArrowException):
        return None  # reading it fails in _chunks, with the one-line error


def _log_accepted(log, features, predictions, problems, run_id, first_row, ids) -> int:
    """Give the log the accepted rows (all when ``problems`` is None), each with its row number."""
    if log is None:
        return 0
    accepted = (
        np.ones(len(features), dtype=bool) if problems is None else problems.isna().to_numpy()
    )
    handed = 0
    for start, stop in _runs(accepted):
        part = features.iloc[start:stop]
        log.record_frame(
            part,
            np.asarray(predictions)[start:stop],
            run_id,
            first_row=first_row + start,
            ids=None if ids is None else np.asarray(ids)[start:stop],
        )
        handed += stop - start
    return handed


def input_digest(path: str | Path) -> str:
    """sha256 of a file's bytes; for a directory, of its data files' names and sizes.

    A directory of parts can be large; its listing identifies a snapshot of it
    without reading every byte (a rewritten part changes its size or name in
    practice, as Spark writes new part names on each run).
    """
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    h = hashlib.sha256()
    for part in data_files(path):
        h.update(f"{part.relative_to(path).as_posix()}\0{part.stat().st_size}\n".encode())
    return h.hexdigest()


def data_files(folder: Path) -> list[Path]:
    """The data files of a directory of parts, as Spark and Hive see them.

    Names starting with ``_`` or ``.`` (``_SUCCESS``, ``.part-0.crc``) are not data.
    """
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith(("_", ".")) for part in p.relative_to(folder).parts)
    )


def _shown(path) -> str:
    return str(path.resolve()) if isinstance(path, Path) else str(path)


def _check_local_paths(input_path: Path, output_path: Path) -> tuple[Path, Path]:
    for path, role in ((input_path, "input"), (output_path, "output")):
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise UsageError(f"{role} {path} must be a .csv or .parquet file")
    if input_path.is_dir():
        raise UsageError(
            f"input {input_path} is a directory; the local engine scores one file "
            "(score a directory of parts with --engine spark)"
        )
    if not input_path.is_file():
        raise UsageError(f"input file {input_path} does not exist")
    if not output_path.parent.is_dir():
        raise UsageError(f"output folder {output_path.parent} does not exist")
    if output_path.resolve() == input_path.resolve():
        raise UsageError("the output must not overwrite the input")
    return input_path, output_path


def _resolve_version(client, model: str, version: str | None) -> str:
    """The version to score with, resolved once: ``version`` as given, else Production's."""
    if version is not None:
        try:
            return client.get_model_version(model, str(version)).version
        except MlflowException:
            raise UsageError(
                f"{model} has no version {version}; `stageflow status --model {model}` "
                "lists its versions"
            ) from None
    current = current_version(client, model, PRODUCTION)
    if current is None:
        raise StageflowError(
            f"{model} has no Production version; promote one with "
            f"`stageflow promote --model {model} --version V --to Production`"
        )
    return current


def _score_local(
    model: str,
    version: str,
    input_path: Path,
    output_path: Path,
    config: dict,
    chunk_rows: int,
    id_column: str | None,
    run_id: str,
    tracking_uri: str,
    progress: bool,
    model_dir: Path,
) -> Scored:
    # The guarded model's policies (``unknown_category``, ``abnormal_output``), as `serve` has.
    pyfunc = mlflow.pyfunc.load_model(str(model_dir), model_config=config)
    mark = config["on_invalid"] == "mark"
    spec = input_columns(pyfunc)
    columns = list(spec) if spec is not None else None
    dtypes = {c: CSV_DTYPES[kind] for c, (kind, _) in (spec or {}).items() if kind in CSV_DTYPES}
    if id_column:
        dtypes[id_column] = "str"  # identifiers are text (leading zeros, long numbers)
    numbers = [c for c, (kind, _) in (spec or {}).items() if kind in NUMBER_TYPES]

    log = _inference_log(pyfunc, model, version, tracking_uri)
    rows = 0
    refused: Counter = Counter()
    # A random name made exclusively: a planted link at a guessable one is never followed.
    handle, partial = files.open_beside(output_path, "wb")
    writer = _Writer(handle, parquet=output_path.suffix.lower() == ".parquet")
    bar = tqdm(
        total=_row_count(input_path),  # None for CSV: rows and rate, without a total
        desc=f"score {model} v{version}",
        unit="rows",
        unit_scale=True,
        disable=not progress,
        file=sys.stderr,
    )
    try:
        for chunk in _chunks(input_path, chunk_rows, dtypes):
            if rows == 0:
                wanted = [*(columns or []), *([id_column] if id_column else [])]
                missing = [c for c in dict.fromkeys(wanted) if c not in chunk.columns]
                if missing:
                    raise UsageError(
                        f"{input_path} lacks column(s) the model needs: {', '.join(missing)}"
                        if columns and set(missing) & set(columns)
                        else f"{input_path} has no id column {id_column!r}; its columns: "
                        f"{', '.join(map(str, chunk.columns))}"
                    )
            if chunk.empty:
                continue
            features = chunk[columns] if columns else chunk
            features = _as_numbers(features, numbers, input_path, rows, mark=mark)
            try:
                predictions = pyfunc.predict(features)
            except MlflowException as exc:
                raise UsageError(_refusal(input_path, exc, rows, len(chunk))) from None
            out = chunk.copy()
            if mark:
                # Same index as the chunk; nullable dtypes keep each part's Parquet types.
                out[PREDICTION_COLUMN] = predictions[guarded_model.PREDICTION]
                out[VERSION_COLUMN] = int(version)
                out[GUARD_PROBLEM] = predictions[GUARD_PROBLEM].astype("string")
                refused.update(predictions[GUARD_PROBLEM].dropna().tolist())
            else:
                out[PREDICTION_COLUMN] = _one_column(predictions)
                out[VERSION_COLUMN] = int(version)
            writer.write(out)
            _log_accepted(
                log,
                features,
                out[PREDICTION_COLUMN].to_numpy(),
                out[GUARD_PROBLEM] if mark else None,
                run_id,
                rows,
                chunk[id_column].astype(str).to_numpy() if id_column else None,
            )
            rows += len(chunk)
            bar.update(len(chunk))
            logger.info("scored %d rows", rows)
        if rows == 0:
            raise UsageError(f"{input_path} has no rows to score")
        writer.close()
        os.replace(partial, output_path)
    finally:
        bar.close()
        writer.close()
        partial.unlink(missing_ok=True)
        if log is not None:
            log.close(timeout=60)
    return Scored(rows=rows, refused=refused)


def log_batch_rows(
    model: str,
    version: str,
    output_path,
    run_id: str,
    id_column: str | None,
    model_dir: Path,
    tracking_uri: str | None = None,
) -> int:
    """Hand Spark's scored rows to the inference log as ``batch`` rows; the number handed.

    It reads the scored parts back on the driver, in part order (the order Spark
    read the input), and gives the writer the accepted rows with their row
    numbers; ``request_id`` is this batch run's id. The local engine logs each
    chunk as it scores it instead.
    """
    pyfunc = mlflow.pyfunc.load_model(str(model_dir))
    log = _inference_log(pyfunc, model, version, tracking_uri)
    if log is None:
        return 0
    handed = row = 0
    try:
        for chunk in _scored_chunks(Path(output_path)):
            handed += _log_accepted(
                log,
                chunk,
                chunk[PREDICTION_COLUMN].to_numpy(),
                chunk[GUARD_PROBLEM],
                run_id,
                row,
                chunk[id_column].astype(str).to_numpy() if id_column else None,
            )
            row += len(chunk)
    finally:
        log.close(timeout=60)
    return handed


def _scored_chunks(path: Path, rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """The scored output in chunks, in its row order (Spark's parts in part order)."""
    if path.is_dir():
        files = data_files(path)
    else:
        files = [path]
    for file in files:
        if file.suffix.lower() == ".csv":
            yield from pd.read_csv(file, chunksize=rows)
        else:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=rows):
                yield batch.to_pandas()


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of True in ``mask``."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def _chunks(path: Path, chunk_rows: int, dtypes: dict[str, str]) -> Iterator[pd.DataFrame]:
    try:
        if path.suffix.lower() == ".csv":
            header = pd.read_csv(path, nrows=0).columns
            known = {c: t for c, t in dtypes.items() if c in header}
            yield from pd.read_csv(path, chunksize=chunk_rows, dtype=known)
        else:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
                yield batch.to_pandas()
    except (ValueError, OSError, pa.ArrowException) as exc:
        raise UsageError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None


def _one_column(predictions):
    """The prediction column: a Series or 1-column frame as is."""
    if isinstance(predictions, pd.DataFrame):
        if predictions.shape[1] != 1:
            raise StageflowError(
                f"the model returned {predictions.shape[1]} columns; batch expects one"
            )
        return predictions.iloc[:, 0].to_numpy()
    return pd.Series(predictions).to_numpy()


class _Writer:
    """Appends frames to an open file as CSV or Parquet, typed by the first chunk."""

    def __init__(self, handle: IO[bytes], parquet: bool):
        self.handle = handle
        self.parquet = parquet
        self._pq: pq.ParquetWriter | None = None
        self._csv_started = False

    def write(self, frame: pd.DataFrame) -> None:
        if self.parquet:
            if self._pq is None:
                table = pa.Table.from_pandas(frame, preserve_index=False)
                self._pq = pq.ParquetWriter(self.handle, table.schema)
            else:
                table = pa.Table.from_pandas(frame, schema=self._pq.schema, preserve_index=False)
            self._pq.write_table(table)
        else:
            self.handle.write(
                frame.to_csv(index=False, header=not self._csv_started).encode("utf-8")
            )
            self._csv_started = True

    def close(self) -> None:
        if self._pq is not None:
            self._pq.close()
            self._pq = None
        self.handle.close()


def _as_numbers(
    frame: pd.DataFrame, numbers: list[str], path: Path, done: int, mark: bool = False
) -> pd.DataFrame:
    """Numeric columns a CSV reader left as text (one bad cell does that) as numbers.

    With ``mark``, a cell whose text is not a number stays text, for the guarded
    model to mark its row ``wrong_type``.

    Raises:
        UsageError: (without ``mark``) naming the first row and column whose text is
            not a number.
    """
    converted = {}
    for name in numbers:
        if pd.api.types.is_numeric_dtype(frame[name]):
            continue
        values = pd.to_numeric(frame[name], errors="coerce")
        bad = (values.isna() & frame[name].notna()).to_numpy()
        if bad.any():
            if mark:
                values = values.astype(object).where(~bad, frame[name])
            else:
                row = done + int(bad.argmax()) + 1
                raise UsageError(f"{path} row {row}: column {name!r} holds text, not a number")
        converted[name] = values
    return frame.assign(**converted) if converted else frame


def _refusal(input_path: Path, exc: MlflowException, done: int, chunk_rows: int) -> str:
    """One line saying which row of the file the model refused, and why."""
    body = getattr(exc, "body", None)  # the guarded model's error: names row and column
    if body is not None and "row" in body:
        # Data rows of the file count from 1, like a spreadsheet's rows under the header.
        detail = body["message"].split(", ", 1)[-1]
        return f"{input_path} row {done + body['row'] + 1}: {detail} ({body['problem']})"
    first = (body or {}).get("message") or exc.message.strip().splitlines()[0][:300]
    return f"{input_path} rows {done + 1}-{done + chunk_rows} do not fit the model: {first}"
