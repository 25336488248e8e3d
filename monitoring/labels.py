"""Labels that arrive after the answers: ``stageflow feedback``.

A labels file (CSV or Parquet) names each row either by the serving id column
(``serve --id-column``) or by ``request_id`` (+ ``row``, default 0), and carries
the model's target column. It is stored as one run in ``stageflow-monitoring``
(tag ``stageflow.kind=feedback``): the file as the run's input dataset and the
normalised labels as ``labels/labels.parquet`` (``id`` or ``request_id`` + ``row``,
and ``label``), which the monitor joins to the log. Ids the log has never seen
are kept (their rows may not be uploaded yet) and counted in the result, never
silently dropped.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from monitoring import read
from stageflow import tracking
from stageflow.errors import UsageError

logger = logging.getLogger(__name__)

MONITORING_EXPERIMENT = "stageflow-monitoring"
FEEDBACK_KIND = "feedback"
LABELS_ARTIFACT = "labels/labels.parquet"
ID, REQUEST_ID, ROW, LABEL = "id", "request_id", "row", "label"
EXAMPLES = 5


@dataclass
class FeedbackResult:
    model: str
    rows: int
    key: list[str]
    matched: int
    unknown: int
    unknown_examples: list[str] = field(default_factory=list)
    run_id: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def feedback(
    model: str, labels: str | Path, id_column: str | None = None, tracking_uri: str | None = None
) -> FeedbackResult:
    """Store the labels in ``labels`` for ``model``; count those the log does not know.

    Args:
        model: the registered model.
        labels: a ``.csv`` or ``.parquet`` file with the ids and the target column.
        id_column: the file's column holding the serving id column's values (default:
            ``request_id`` (+ ``row``) when present, else ``id``).

    Example:
        >>> feedback("churn", "labels.csv", id_column="order_id").unknown
        0

    Raises:
        UsageError: unreadable file, no id or target column, a missing label.
    """

    client = tracking.client(tracking_uri)
    target = _target(client, model)
    frame = _read(labels)
    table, key = normalise(frame, target, id_column, str(labels))
    known = _known_keys(client, model, key)
    keys = _keys(table, key)
    unknown_mask = ~keys.isin(known)
    result = FeedbackResult(
        model=model,
        rows=len(table),
        key=key,
        matched=int((~unknown_mask).sum()),
        unknown=int(unknown_mask.sum()),
        unknown_examples=keys[unknown_mask].head(EXAMPLES).tolist(),
    )
    result.run_id = _log(client, model, table, key, labels, result)
    if result.unknown:
        logger.warning(
            "%d of %d labels name rows the inference log of %s does not hold (yet): %s",
            result.unknown,
            result.rows,
            model,
            ", ".join(result.unknown_examples),
        )
    return result


def normalise(
    frame: pd.DataFrame, target: str, id_column: str | None, source: str = "labels"
) -> tuple[pd.DataFrame, list[str]]:
    """The labels as ``id``/``label`` or ``request_id``/``row``/``label``, and that key.

    Raises:
        UsageError: the id column or the target is missing, or a row lacks a key or label.
    """
    columns = ", ".join(map(str, frame.columns))
    label_column = target if target in frame.columns else LABEL if LABEL in frame.columns else None
    if label_column is None:
        raise UsageError(
            f"{source} has no target column {target!r} (nor {LABEL!r}); its columns are: {columns}"
        )
    if id_column is not None:
        if id_column not in frame.columns:
            raise UsageError(f"{source} has no id column {id_column!r}; its columns are: {columns}")
        table = pd.DataFrame({ID: _text(frame[id_column]), LABEL: frame[label_column].to_numpy()})
        key = [ID]
    elif REQUEST_ID in frame.columns:
        rows = frame[ROW] if ROW in frame.columns else pd.Series(0, index=frame.index)
        if rows.isna().any() or not pd.api.types.is_numeric_dtype(rows):
            raise UsageError(f"{source}: column {ROW!r} must hold whole numbers for every label")
        table = pd.DataFrame(
            {
                REQUEST_ID: _text(frame[REQUEST_ID]),
                ROW: rows.astype("int64").to_numpy(),
                LABEL: frame[label_column].to_numpy(),
            }
        )
        key = [REQUEST_ID, ROW]
    elif ID in frame.columns:
        table = pd.DataFrame({ID: _text(frame[ID]), LABEL: frame[label_column].to_numpy()})
        key = [ID]
    else:
        raise UsageError(
            f"{source} names no rows: give --id-column (the serving id column), or a "
            f"{REQUEST_ID!r} column (+ {ROW!r}); its columns are: {columns}"
        )
    missing = table[key[0]].isna() | table[LABEL].isna()
    if missing.any():
        first = int(missing.to_numpy().argmax())
        raise UsageError(
            f"{source}: {int(missing.sum())} rows have no id or no label (first: row {first}); "
            "remove them or fill them in"
        )
    return table.drop_duplicates(subset=key, keep="last").reset_index(drop=True), key


def load_labels(client, model: str) -> dict[tuple[str, ...], pd.DataFrame]:
    """Every label stored for ``model``, later feedback overriding earlier: by key."""
    experiment = client.get_experiment_by_name(MONITORING_EXPERIMENT)
    if experiment is None:
        return {}
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`stageflow.kind` = '{FEEDBACK_KIND}' "
        f"and tags.`stageflow.model` = {tracking.filter_value(model)}",
        order_by=["attributes.start_time ASC"],
        max_results=10_000,
    )
    by_key: dict[tuple[str, ...], list[pd.DataFrame]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, run in enumerate(runs):
            path = client.download_artifacts(run.info.run_id, LABELS_ARTIFACT, f"{tmp}/{i}")
            table = pd.read_parquet(path)
            key = (ID,) if ID in table.columns else (REQUEST_ID, ROW)
            by_key.setdefault(key, []).append(table)
    return {
        key: pd.concat(tables, ignore_index=True).drop_duplicates(subset=list(key), keep="last")
        for key, tables in by_key.items()
    }


def join(frame: pd.DataFrame, by_key: dict, keep: list[str]) -> pd.DataFrame:
    """The rows of ``frame`` that have a label: their ``keep`` columns, the key and ``label``.

    ``by_key`` is :func:`load_labels`' answer; each key's labels join on the rows that
    carry that key (``id``, or ``request_id`` + ``row``).
    """
    joined = []
    for key, table in by_key.items():
        key = list(key)
        if not all(k in frame.columns for k in key):
            continue
        left = frame[list(dict.fromkeys([*key, *keep]))].dropna(subset=key).copy()
        if ID in key:
            left[ID] = left[ID].astype(str)
        else:
            left[REQUEST_ID] = left[REQUEST_ID].astype(str)
            left[ROW] = pd.to_numeric(left[ROW]).astype("int64")
        right = table.copy()
        for k in key:
            right[k] = right[k].astype(left[k].dtype)
        found = left.merge(right, on=key, how="inner")
        if len(found):
            joined.append(found)
    if not joined:
        return pd.DataFrame(columns=[*keep, LABEL])
    return pd.concat(joined, ignore_index=True)


def _target(client, model: str) -> str:
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    try:
        versions = client.search_model_versions(f"name = {tracking.filter_value(model)}")
    except MlflowException:
        versions = []
    if not versions:
        raise UsageError(f"model {model!r} has no versions; train one first")
    latest = max(versions, key=lambda v: int(v.version))
    # Unquoted: `mlflow run` logs its params shell-quoted (stageflow.tracking.plain_params).
    return tracking.plain_params(client.get_run(latest.run_id)).get("target", "target")


def _read(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".parquet"):
        raise UsageError(f"labels file {path} must be a .csv or .parquet file")
    if not path.is_file():
        raise UsageError(f"labels file {path} does not exist")
    try:
        return pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the user's file
        raise UsageError(f"cannot read labels file {path}: {exc}") from None


def _text(values: pd.Series) -> pd.Series:
    """Ids as the log holds them: text (integers without a trailing .0)."""
    if pd.api.types.is_float_dtype(values) and (values.dropna() % 1 == 0).all():
        values = values.astype("Int64")
    return values.astype("string").astype(object).where(values.notna(), None)


def _keys(table: pd.DataFrame, key: list[str]) -> pd.Series:
    if key == [ID]:
        return table[ID].astype(str)
    return table[REQUEST_ID].astype(str) + "#" + table[ROW].astype(str)


def _known_keys(client, model: str, key: list[str]) -> set[str]:
    """The keys the whole inference log of ``model`` holds (only the key columns are read)."""
    known: set[str] = set()
    for run_id in read.log_runs(client, model).values():
        for frame in read.iter_version(client, run_id, None, columns=[ID, REQUEST_ID, ROW]):
            if key == [ID]:
                known.update(frame[ID].dropna().astype(str))
            else:
                known.update(frame[REQUEST_ID].astype(str) + "#" + frame[ROW].astype(str))
    return known


def _log(client, model: str, table: pd.DataFrame, key, source, result: FeedbackResult) -> str:
    import mlflow  # noqa: PLC0415
    from mlflow.entities import DatasetInput, InputTag, Metric, Param  # noqa: PLC0415
    from mlflow.entities import RunTag as Tag  # noqa: PLC0415

    experiment_id = experiment(client)
    tags = {"stageflow.kind": FEEDBACK_KIND, "stageflow.model": model}
    if os.environ.get("MLFLOW_RUN_ID"):  # inside `mlflow run`: point back at the project run
        tags["stageflow.project_run_id"] = os.environ["MLFLOW_RUN_ID"]
    run = client.create_run(experiment_id, run_name=f"feedback-{model}", tags=tags)
    run_id = run.info.run_id
    try:
        client.log_batch(
            run_id,
            metrics=[
                Metric(name, float(value), int(run.info.start_time), 0)
                for name, value in (
                    ("labels", result.rows),
                    ("matched", result.matched),
                    ("unknown_ids", result.unknown),
                )
            ],
            params=[
                Param("labels_file", str(Path(source).name)[:500]),
                Param("key", ",".join(key)),
            ],
            tags=[Tag("stageflow.unknown_examples", ", ".join(result.unknown_examples)[:5000])],
        )
        dataset = mlflow.data.from_pandas(
            table, source=Path(source).resolve().as_uri(), targets=LABEL, name=f"{model}-labels"
        )
        client.log_inputs(
            run_id,
            datasets=[
                DatasetInput(
                    # MLflow has no public way to turn a dataset into the entity a run logs.
                    dataset._to_mlflow_entity(),  # noqa: SLF001
                    [InputTag("mlflow.data.context", "labels")],
                )
            ],
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(LABELS_ARTIFACT).name
            table.to_parquet(path, index=False)
            client.log_artifact(run_id, str(path), str(Path(LABELS_ARTIFACT).parent))
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id)
    return run_id


def experiment(client) -> str:
    """The id of ``stageflow-monitoring``, created the first time."""
    found = client.get_experiment_by_name(MONITORING_EXPERIMENT)
    if found is not None:
        return found.experiment_id
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    try:
        return client.create_experiment(MONITORING_EXPERIMENT)
    except MlflowException:  # created meanwhile by another monitor
        return client.get_experiment_by_name(MONITORING_EXPERIMENT).experiment_id
