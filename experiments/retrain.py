"""Retrain the Production version with its own recipe on its data plus newly labelled rows.

The candidate is an ordinary trained version: the same family, hyperparameters,
seed, target and task as the Production version's run (read from that run's
params), trained on that run's data source plus the new rows -- the labelled
rows of the inference log, or ``--data`` -- and registered with its lineage as
version tags. It then goes to Staging through the Staging gate like any other
version, and to Production only through the Production gate, and only by
itself where the model's policy says ``monitoring.auto_promote: true``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from experiments import data, families
from experiments.train import train
from registry import PRODUCTION, STAGING, Refused, current_version, promote
from registry.policy import for_model as policy_for
from stageflow import tracking
from stageflow.errors import StageflowError, UsageError

logger = logging.getLogger(__name__)

TAG = "stageflow.retrain."
TRIGGER_TAG = f"{TAG}trigger"
PARENT_TAG = f"{TAG}parent_version"
MONITORING_RUN_TAG = f"{TAG}monitoring_run"
DATA_ARTIFACT = "retrain/data.parquet"
MANUAL = "manual"
# The labelled rows of the inference log are read back this far by default.
DEFAULT_SINCE = "30d"
INPUT_PREFIX = "input."


@dataclass
class RetrainResult:
    model: str
    version: str
    parent_version: str
    trigger: str
    run_id: str
    rows: int  # training data rows: the parent's source plus the new ones
    new_rows: int
    new_data: str  # where the new rows came from: the inference log, or --data
    digests: dict[str, str] = field(default_factory=dict)
    monitoring_run: str = ""
    staging: dict = field(
        default_factory=dict
    )  # {"promoted": bool, "detail": str, "ledger_run_id"}
    production: dict = field(default_factory=dict)  # the same, when auto_promote tried it
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def refused(self) -> bool:
        """The candidate did not reach Staging (a gate said no)."""
        return not self.staging.get("promoted", False)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Recipe:
    """How the parent version was trained, read back from its run."""

    source: str
    target: str
    family: str
    task: str
    seed: int
    params: dict
    experiment: str
    run_id: str


def recipe(client, model: str, version: str) -> Recipe:
    """The parent version's recipe: its run's data source, target, family, params and seed.

    Raises:
        StageflowError: the version's run is gone or was not made by train/tune.
    """
    found = client.get_model_version(model, version)
    try:
        run = client.get_run(found.run_id)
    except MlflowException:
        raise StageflowError(
            f"{model} version {version} has no training run on this server ({found.run_id}); "
            "retrain needs the run to read its recipe"
        ) from None
    params = run.data.params
    missing = [k for k in ("data", "target", "family", "task", "seed") if k not in params]
    if missing:
        raise StageflowError(
            f"the run of {model} version {version} lacks {', '.join(missing)}; "
            "only versions made by `stageflow train` or `tune` can be retrained"
        )
    hyper = families.parse_params(
        [f"{k.removeprefix('model.')}={v}" for k, v in params.items() if k.startswith("model.")]
    )
    experiment = client.get_experiment(run.info.experiment_id).name
    return Recipe(
        source=params["data"],
        target=params["target"],
        family=params["family"],
        task=params["task"],
        seed=int(params["seed"]),
        params=hyper,
        experiment=experiment,
        run_id=run.info.run_id,
    )


def retrain(
    model: str,
    new_data: str | None = None,
    *,
    trigger: str = MANUAL,
    monitoring_run: str = "",
    since: str = DEFAULT_SINCE,
    tracking_uri: str | None = None,
) -> RetrainResult:
    """Retrain the Production version of ``model`` and put the candidate through the gates.

    Args:
        new_data: a labelled data source (``builtin:NAME``, .csv, .parquet, with the
            target column) to add to the parent's training data instead of the
            labelled rows of the inference log.
        trigger: why (``manual``, ``drift``, ``labels``, ``schedule``); kept as a tag.
        monitoring_run: the monitoring run that prompted it, kept as a tag.
        since: how far back the inference log's labelled rows are read.

    Returns:
        The candidate and what its gates said; ``refused`` is true when the Staging
        gate said no (the candidate stays registered, in stage None).

    Raises:
        StageflowError: nothing is in Production, or its recipe cannot be read.
        UsageError: a bad ``new_data`` source, or one without the target column.
    """
    tracking.require_server(tracking_uri)
    client = tracking.client(tracking_uri)
    parent = current_version(client, model, PRODUCTION)
    if parent is None:
        raise StageflowError(
            f"{model} has no Production version whose recipe retrain could reuse; "
            "promote one first (`stageflow promote --to Production`)"
        )
    how = recipe(client, model, parent)
    original = _parent_data(client, how)
    if new_data:
        fresh = data.load(new_data)
        where = new_data
    else:
        fresh = labelled_rows(model, how.target, since, tracking_uri)
        where = f"inference log of {model} (last {since})"
    fresh = _align(fresh, original, how.target, where)
    combined = pd.concat([original, fresh], ignore_index=True)
    digests = {
        "parent_data": data.digest(original),
        "new_data": data.digest(fresh),
        "training_data": data.digest(combined),
    }
    logger.info(
        "retraining %s v%s (%s, seed %d): %d rows of %s + %d new from %s",
        model,
        parent,
        how.family,
        how.seed,
        len(original),
        how.source,
        len(fresh),
        where,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(DATA_ARTIFACT).name
        combined.to_parquet(path, index=False)
        trained = train(
            str(path),
            how.target,
            model_name=model,
            family=how.family,
            params=how.params,
            seed=how.seed,
            task=how.task,
            experiment=how.experiment,
            tracking_uri=tracking_uri,
        )
        # The temporary file is gone after this; the run keeps the data it learned from.
        client.log_artifact(trained.run_id, str(path), artifact_path=Path(DATA_ARTIFACT).parent)
    lineage = {
        TRIGGER_TAG: trigger,
        PARENT_TAG: parent,
        f"{TAG}parent_run": how.run_id,
        f"{TAG}parent_data": how.source,
        f"{TAG}new_data": where,
        f"{TAG}new_rows": str(len(fresh)),
        MONITORING_RUN_TAG: monitoring_run,
        f"{TAG}data_artifact": DATA_ARTIFACT,
        **{f"{TAG}digest.{k}": v for k, v in digests.items()},
    }
    for key, value in lineage.items():
        client.set_tag(trained.run_id, key, value)
        client.set_model_version_tag(model, trained.version, key, value)
    result = RetrainResult(
        model=model,
        version=trained.version,
        parent_version=parent,
        trigger=trigger,
        run_id=trained.run_id,
        rows=len(combined),
        new_rows=len(fresh),
        new_data=where,
        digests=digests,
        monitoring_run=monitoring_run,
        metrics=trained.metrics,
    )
    reason = f"retrain ({trigger}) of version {parent} on {len(fresh)} new row(s) from {where}"
    result.staging = _through_gate(model, trained.version, STAGING, reason, trained.run_id)
    if result.staging["promoted"] and _auto_promote(client, model):
        result.production = _through_gate(
            model, trained.version, PRODUCTION, reason + "; monitoring.auto_promote", trained.run_id
        )
    return result


def _through_gate(model: str, version: str, stage: str, reason: str, evidence_run: str) -> dict:
    try:
        moved = promote(model, version, stage, reason, evidence_run=evidence_run)
    except Refused as refused:
        logger.warning("%s", refused)
        return {
            "promoted": False,
            "detail": str(refused),
            "ledger_run_id": refused.result.ledger_run_id,
        }
    return {"promoted": True, "detail": "", "ledger_run_id": moved.ledger_run_id}


def _auto_promote(client, model: str) -> bool:
    """The policy's ``monitoring.auto_promote`` (default false)."""
    from monitoring.watch import settings  # noqa: PLC0415

    return bool(settings(policy_for(client, model))["auto_promote"])


def _parent_data(client, how: Recipe) -> pd.DataFrame:
    """The parent's training data: its source, or (for a retrained parent) its run's copy."""
    source = how.source
    if source.startswith(data.BUILTIN_PREFIX) or Path(source).is_file():
        return data.load(source)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(
                run_id=how.run_id, artifact_path=DATA_ARTIFACT, dst_path=tmp
            )
            return pd.read_parquet(local)
    except (MlflowException, OSError):
        raise StageflowError(
            f"the parent's training data {source} is gone and its run {how.run_id} keeps no "
            "copy; retrain with --data pointing at the data"
        ) from None


def _align(fresh: pd.DataFrame, original: pd.DataFrame, target: str, where: str) -> pd.DataFrame:
    """The new rows in the parent data's columns and dtypes; a missing column is an error."""
    missing = [c for c in original.columns if c not in fresh.columns]
    if missing:
        raise UsageError(
            f"the new data from {where} lacks column(s) {', '.join(map(str, missing))} "
            f"of the training data (target: {target!r})"
        )
    fresh = fresh[list(original.columns)]
    fresh = fresh[fresh[target].notna()]
    try:
        return fresh.astype(original.dtypes.to_dict())
    except (TypeError, ValueError):
        return fresh


def labelled_rows(
    model: str, target: str, since: str = DEFAULT_SINCE, tracking_uri: str | None = None
) -> pd.DataFrame:
    """Rows the model answered (inference log) joined with their labels, as training rows.

    The inference log and the labels are the monitor's (``monitoring.read_log``,
    ``stageflow feedback``); the join follows the log's contract: on ``id`` where
    both have it, else on (``request_id``, ``row``). Only accepted or flagged
    online/batch rows count (a refused row has no inputs; shadow rows repeat
    online ones).
    """
    import monitoring  # noqa: PLC0415 - the log reader is heavy and needed only here

    log = monitoring.read_log(model, since, tracking_uri=tracking_uri)
    labels = _labels(model, tracking_uri)
    if log is None or log.empty or labels.empty:
        return pd.DataFrame(columns=[target])
    log = log[log["outcome"].isin(["accepted", "flagged"]) & (log["source"] != "shadow")]
    if "id" in labels.columns and "id" in log.columns and log["id"].notna().any():
        labels = labels.assign(id=labels["id"].astype(str))
        joined = log.merge(labels[["id", "label"]], on="id", how="inner")
    else:
        joined = log.merge(labels[["request_id", "row", "label"]], on=["request_id", "row"])
    inputs = {c: c.removeprefix(INPUT_PREFIX) for c in joined.columns if c.startswith(INPUT_PREFIX)}
    rows = joined[list(inputs)].rename(columns=inputs)
    return rows.assign(**{target: joined["label"].to_numpy()})


def _labels(model: str, tracking_uri: str | None) -> pd.DataFrame:
    """Every label ``stageflow feedback`` stored for ``model`` (later ones win), by key."""
    from monitoring.labels import load_labels  # noqa: PLC0415

    tables = load_labels(tracking.client(tracking_uri), model)
    return tables.get(("id",), next(iter(tables.values()), pd.DataFrame()))


def summary(result: RetrainResult) -> str:
    """The human lines ``stageflow retrain`` prints."""
    lines = [
        f"retrained {result.model} version {result.parent_version}'s recipe as version "
        f"{result.version} ({result.trigger}): {result.rows} rows, {result.new_rows} new "
        f"from {result.new_data}",
        "  digests: " + json.dumps(result.digests),
    ]
    for stage, outcome in (("Staging", result.staging), ("Production", result.production)):
        if outcome:
            lines.append(
                f"  {stage}: "
                + ("promoted" if outcome["promoted"] else f"refused — {outcome['detail']}")
            )
    if not result.production and not result.refused:
        lines.append(
            f"  next: stageflow promote --model {result.model} --version {result.version} "
            "--to Production"
        )
    return "\n".join(lines)
