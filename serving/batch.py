"""Batch scoring: a CSV or Parquet file through the Production version, in chunks.

The same registered model that ``serve`` puts behind the front door scores the
file, chunk by chunk so memory stays flat however large the input is. The output
is written beside its final name and renamed when complete, so a failure never
leaves a half-written file that looks finished.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.exceptions import MlflowException
from tqdm import tqdm

from registry import PRODUCTION, current_version, require_model
from serving.inference_log import BATCH, InferenceLog
from stageflow import tracking
from stageflow.contract import input_columns
from stageflow.errors import StageflowError, UsageError
from stageflow.files import FILE_SUFFIXES, file_digest

logger = logging.getLogger(__name__)

BATCH_EXPERIMENT = "stageflow-batch"
PREDICTION_COLUMN = "prediction"
VERSION_COLUMN = "model_version"
DEFAULT_CHUNK_ROWS = 50_000
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

    def to_json(self) -> dict:
        return asdict(self)


def score(
    model: str,
    input_path: str | Path,
    output_path: str | Path,
    tracking_uri: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    model_config: dict | None = None,
    progress: bool = False,
) -> ScoreResult:
    """Score ``input_path`` with the Production version of ``model`` into ``output_path``.

    The output holds the input's columns, a ``prediction`` column and the
    ``model_version`` that made it; a run in the ``stageflow-batch`` experiment
    records rows, seconds, version and the input's digest.

    Args:
        progress: draw a progress bar of the rows scored on stderr.

    Raises:
        UsageError: bad paths or suffixes, or input columns the model needs are missing.
        StageflowError: the model has no Production version.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    for path, role in ((input_path, "input"), (output_path, "output")):
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise UsageError(f"{role} {path} must be a .csv or .parquet file")
    if not input_path.is_file():
        raise UsageError(f"input file {input_path} does not exist")
    if not output_path.parent.is_dir():
        raise UsageError(f"output folder {output_path.parent} does not exist")
    if output_path.resolve() == input_path.resolve():
        raise UsageError("the output must not overwrite the input")

    client = tracking.client(tracking_uri)
    require_model(client, model)
    version = current_version(client, model, PRODUCTION)
    if version is None:
        raise StageflowError(
            f"{model} has no Production version; promote one with "
            f"`stageflow promote --model {model} --version V --to Production`"
        )
    # The guarded model's policies (``unknown_category``, ``abnormal_output``), as `serve` has.
    pyfunc = mlflow.pyfunc.load_model(f"models:/{model}/{version}", model_config=model_config)
    spec = input_columns(pyfunc)
    columns = list(spec) if spec is not None else None
    dtypes = {c: CSV_DTYPES[kind] for c, (kind, _) in (spec or {}).items() if kind in CSV_DTYPES}

    # The run exists before scoring, so the inference log's batch rows carry its id.
    run_id = os.environ.get("MLFLOW_RUN_ID") or _create_run(client, model, version)
    log = _inference_log(pyfunc, model, version, client.tracking_uri)
    started = time.perf_counter()
    rows = 0
    partial = output_path.with_name(f".{output_path.name}.partial")
    writer = _Writer(partial)
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
            if rows == 0 and columns:
                missing = [c for c in columns if c not in chunk.columns]
                if missing:
                    raise UsageError(
                        f"{input_path} lacks column(s) the model needs: {', '.join(missing)}"
                    )
            if chunk.empty:
                continue
            numbers = [c for c, (kind, _) in (spec or {}).items() if kind in NUMBER_TYPES]
            features = _as_numbers(chunk[columns] if columns else chunk, numbers, input_path, rows)
            try:
                predictions = pyfunc.predict(features)
            except MlflowException as exc:
                raise UsageError(_refusal(input_path, exc, rows, len(chunk))) from None
            out = chunk.copy()
            out[PREDICTION_COLUMN] = _one_column(predictions)
            out[VERSION_COLUMN] = int(version)
            writer.write(out)
            if log is not None:
                log.record_frame(features, out[PREDICTION_COLUMN], run_id, first_row=rows)
            rows += len(chunk)
            bar.update(len(chunk))
            logger.info("scored %d rows", rows)
        if rows == 0:
            raise UsageError(f"{input_path} has no rows to score")
        writer.close()
        os.replace(partial, output_path)
    except BaseException:
        if run_id != os.environ.get("MLFLOW_RUN_ID"):
            client.set_terminated(run_id, "FAILED")
        raise
    finally:
        bar.close()
        writer.close()
        partial.unlink(missing_ok=True)
        if log is not None:
            log.close(timeout=60)
    seconds = time.perf_counter() - started
    digest = file_digest(input_path)

    if run_id != os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(BATCH_EXPERIMENT)  # the experiment the run was created in
    with mlflow.start_run(run_id=run_id) as run:
        mlflow.set_tags({"stageflow.kind": "batch", "stageflow.model_name": model})
        tracking.log_params(
            {
                "model": model,
                "version": version,
                "input": str(input_path.resolve()),
                "output": str(output_path.resolve()),
                "input_sha256": digest,
                "chunk_rows": chunk_rows,
            }
        )
        mlflow.log_metrics(
            {"rows": rows, "seconds": seconds, "rows_per_second": rows / max(seconds, 1e-9)}
        )
    return ScoreResult(
        model=model,
        version=version,
        rows=rows,
        seconds=round(seconds, 3),
        output=str(output_path),
        input_digest=digest,
        run_id=run.info.run_id,
    )


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
    """Appends frames to a CSV or Parquet file with the first chunk's columns and types."""

    def __init__(self, path: Path):
        self.path = path
        self.parquet = path.name.removesuffix(".partial").endswith(".parquet")
        self._pq: pq.ParquetWriter | None = None
        self._csv_started = False

    def write(self, frame: pd.DataFrame) -> None:
        if self.parquet:
            if self._pq is None:
                table = pa.Table.from_pandas(frame, preserve_index=False)
                self._pq = pq.ParquetWriter(self.path, table.schema)
            else:
                table = pa.Table.from_pandas(frame, schema=self._pq.schema, preserve_index=False)
            self._pq.write_table(table)
        else:
            frame.to_csv(
                self.path,
                mode="a" if self._csv_started else "w",
                index=False,
                header=not self._csv_started,
            )
            self._csv_started = True

    def close(self) -> None:
        if self._pq is not None:
            self._pq.close()
            self._pq = None


def _as_numbers(frame: pd.DataFrame, numbers: list[str], path: Path, done: int) -> pd.DataFrame:
    """Numeric columns a CSV reader left as text (one bad cell does that) as numbers.

    Raises:
        UsageError: naming the first row and column whose text is not a number.
    """
    converted = {}
    for name in numbers:
        if pd.api.types.is_numeric_dtype(frame[name]):
            continue
        values = pd.to_numeric(frame[name], errors="coerce")
        bad = (values.isna() & frame[name].notna()).to_numpy()
        if bad.any():
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
