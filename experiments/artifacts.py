"""What every trained pipeline leaves in its run: metrics, plots, lineage, environment, model.

``train`` uses this today; tuning refits its best trial through the same calls,
so both kinds of run look alike in the MLflow UI and the registry.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import skops.io
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.models import ModelSignature, infer_signature

from experiments import evaluate
from experiments.data import BUILTIN_PREFIX, Splits
from experiments.families import split_columns
from monitoring import reference as monitoring_reference
from serving import guarded_model
from stageflow import manifest
from stageflow.catalog import TEST_SPLIT_ARTIFACT
from stageflow.errors import StageflowError

logger = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
INPUT_EXAMPLE_ROWS = 5

# The skops types a pipeline may need (every load checks a version's list against it).
ALLOWED_TRUSTED_TYPES = manifest.ALLOWED_TRUSTED_TYPES
# Pinned in every model's requirements so a version can be rebuilt as it was trained.
PINNED_PACKAGES = ("mlflow", "scikit-learn", "skops", "pandas", "numpy", "scipy", "pyarrow")


def trusted_types(pipeline) -> list[str]:
    """The exact skops types ``pipeline`` needs, refused if any is outside the allow-list."""
    needed = sorted(skops.io.get_untrusted_types(data=skops.io.dumps(pipeline)))
    unexpected = sorted(set(needed) - ALLOWED_TRUSTED_TYPES)
    if unexpected:
        raise StageflowError(
            f"the pipeline needs types Stageflow does not trust: {', '.join(unexpected)}; "
            "review them and add them to stageflow.manifest.ALLOWED_TRUSTED_TYPES"
        )
    return needed


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PINNED_PACKAGES + ("optuna", "stageflow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def pinned_requirements() -> list[str]:
    versions = package_versions()
    return [f"{name}=={versions[name]}" for name in PINNED_PACKAGES if name in versions]


def git_commit() -> tuple[str | None, bool]:
    """The commit of the working tree and whether it has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                check=True,
                timeout=5,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        return None, False
    return commit, dirty


def log_environment() -> None:
    """Package versions (tags and a JSON artifact) and the git commit."""
    versions = package_versions()
    mlflow.set_tags({f"stageflow.package.{name}": v for name, v in versions.items()})
    mlflow.log_dict(versions, "environment/packages.json")
    commit, dirty = git_commit()
    if commit:
        mlflow.set_tags({"mlflow.source.git.commit": commit, "stageflow.git_dirty": str(dirty)})


def log_lineage(splits: Splits, source: str, target: str) -> dict[str, str]:
    """Each split as an MLflow dataset input (with its digest); the test split as an artifact.

    The test split is what promotion compares champion and challenger on, so it is
    kept with the run, not only described.
    """
    name = Path(source.removeprefix(BUILTIN_PREFIX)).stem
    digests = {}
    for context, (X, y) in splits.named().items():
        frame = X.assign(**{target: y})
        dataset = mlflow.data.from_pandas(
            frame, source=_dataset_source(source), targets=target, name=f"{name}-{context}"
        )
        mlflow.log_input(dataset, context=context)
        digests[context] = dataset.digest
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(TEST_SPLIT_ARTIFACT).name
        splits.X_test.assign(**{target: splits.y_test}).to_parquet(path)
        mlflow.log_artifact(str(path), artifact_path=str(Path(TEST_SPLIT_ARTIFACT).parent))
    return digests


def _dataset_source(source: str):
    """Where a split came from, in a form MLflow records: a file URI, or the built-in's loader."""
    if source.startswith(BUILTIN_PREFIX):
        loader = f"sklearn.datasets.load_{source.removeprefix(BUILTIN_PREFIX)}"
        return CodeDatasetSource(tags={"loader": loader})
    return Path(source).resolve().as_uri()


def log_evaluation(pipeline, splits: Splits, task: str, seed: int) -> dict[str, float]:
    """Metrics on every split (prefixes ``train_``, ``val_``, ``test_``) and test-split plots."""
    prefixes = {"train": "train", "validation": "val", "test": "test"}
    scores = {}
    for context, (X, y) in splits.named().items():
        for name, value in evaluate.score(pipeline, X, y, task).items():
            scores[f"{prefixes[context]}_{name}"] = value
    mlflow.log_metrics(scores)
    for file_name, fig in evaluate.figures(
        pipeline, splits.X_test, splits.y_test, task, seed
    ).items():
        mlflow.log_figure(fig, f"plots/{file_name}")
        plt.close(fig)
    return scores


def log_pipeline(
    pipeline,
    splits: Splits,
    task: str,
    model_name: str,
    *,
    date_formats: dict[str, str | None] | None = None,
    ignored_columns: list[str] = (),
):
    """Log the fitted pipeline as Stageflow's guarded model and register a new version.

    ``date_formats`` (date column → the format its training strings had) and
    ``ignored_columns`` (columns the data check dropped, which requests may still
    send) come from :mod:`experiments.data_check` and go into the contract.

    The pipeline is stored with skops (exact trusted types) beside the data
    contract learned from the training split; the registered model is
    :mod:`serving.guarded_model` (an MLflow model from code) wrapping both. It
    logs an output signature only: the contract checks inputs, so the scoring
    server does not enforce a schema a second time.

    Returns:
        MLflow's ``ModelInfo``; ``registered_model_version`` is the new version.
    """
    X_train, y_train = splits.X_train, splits.y_train
    numeric, _ = split_columns(X_train)
    contract = guarded_model.learn_contract(
        X_train,
        y_train,
        task,
        numeric,
        trusted_types(pipeline),
        date_formats=date_formats,
        ignored_columns=ignored_columns,
    )
    contract["fast_path"] = fast_path_agrees(pipeline, contract, X_train)
    example = X_train.head(INPUT_EXAMPLE_ROWS)
    outputs = infer_signature(example, pipeline.predict(example)).outputs
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_path = Path(tmp) / "pipeline.skops"
        skops.io.dump(pipeline, pipeline_path)
        contract_path = Path(tmp) / "contract.json"
        contract_path.write_text(json.dumps(contract, ensure_ascii=False, indent=1))
        # What monitoring compares live traffic with (artifacts/reference.json of the model).
        reference_path = monitoring_reference.write(
            monitoring_reference.for_pipeline(pipeline, splits, task), tmp
        )
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=Path(guarded_model.__file__),
            artifacts={
                guarded_model.PIPELINE: str(pipeline_path),
                guarded_model.CONTRACT: str(contract_path),
                monitoring_reference.ARTIFACT_KEY: str(reference_path),
            },
            model_config=dict(guarded_model.LOGGED_CONFIG),
            signature=ModelSignature(outputs=outputs),
            input_example=example,
            pip_requirements=pinned_requirements(),
            registered_model_name=model_name,
        )
    # Every later load verifies the version's files against this (stageflow.manifest).
    manifest.record(mlflow.MlflowClient(), model_name, str(info.registered_model_version))
    return info


def fast_path_agrees(pipeline, contract: dict, X: pd.DataFrame, rows: int = 5000) -> bool:
    """Whether the guarded model's numpy preprocessing gives the pipeline's own answers.

    Checked on (up to ``rows`` of) the training split when the model is logged;
    if it does not agree, or the pipeline has a shape it does not compile, the
    model runs the pipeline itself.
    """
    model = guarded_model.GuardedModel().setup(pipeline, contract)
    if model.fast is None:
        logger.info("the pipeline has no fast path; the guarded model runs it as it is")
        return False
    sample = X.head(rows)
    numeric, categorical, _ = model.guard.check(sample)
    fast = model._scores(numeric, categorical, sample)  # noqa: SLF001 - the proof of its own fast path
    model.fast = None
    reference = model._scores(numeric, categorical, sample)  # noqa: SLF001
    agrees = fast.shape == reference.shape and np.allclose(fast, reference, rtol=1e-9, atol=1e-12)
    if not agrees:
        logger.warning("the fast path disagrees with the pipeline; the model runs the pipeline")
    return bool(agrees)
