"""The one place that talks to MLflow's stage and alias APIs.

Stages are what users asked for (None → Staging → Production → Archived), but
MLflow deprecated them in 2.9 in favour of aliases (mlflow#10336). Every move
here sets the stage and its mirror alias together, so ``models:/NAME/Production``
and ``models:/NAME@champion`` resolve to the same version; the rest of Stageflow
asks this module and never calls the stage API itself.
"""

from __future__ import annotations

import warnings

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from stageflow import tracking
from stageflow.errors import StageflowError, UsageError

NONE, STAGING, PRODUCTION, ARCHIVED = "None", "Staging", "Production", "Archived"
STAGES = (NONE, STAGING, PRODUCTION, ARCHIVED)
CHALLENGER, CHAMPION = "challenger", "champion"
ALIAS_FOR_STAGE = {STAGING: CHALLENGER, PRODUCTION: CHAMPION}


def canonical_stage(stage: str) -> str:
    """``production`` → ``Production``; an unknown stage is a usage error."""
    for known in STAGES:
        if stage.lower() == known.lower():
            return known
    raise UsageError(f"unknown stage {stage!r}; choose one of: {', '.join(STAGES)}")


def get_version(client: MlflowClient, name: str, version: str | int) -> ModelVersion:
    """The registered version, or a usage error naming what exists."""
    if not str(version).isdigit():
        raise UsageError(f"version must be a positive number, got {version!r}")
    require_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        known = sorted(int(v.version) for v in versions(client, name))
        listing = ", ".join(map(str, known)) or "none"
        raise UsageError(
            f"model {name!r} has no version {version}; its versions: {listing}"
        ) from None


def require_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise UsageError(
            f"no registered model named {name!r}; train one with "
            f"`stageflow train ... --model-name {name}`"
        ) from None


def versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of ``name``, oldest first."""
    found = client.search_model_versions(f"name = {tracking.filter_value(name)}")
    return sorted(found, key=lambda v: int(v.version))


def holders(client: MlflowClient, name: str, stage: str) -> list[ModelVersion]:
    """Versions whose stage is ``stage`` (more than one means someone bypassed Stageflow)."""
    return [v for v in versions(client, name) if v.current_stage == stage]


def alias_target(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        return None


def current_version(client: MlflowClient, name: str, stage: str = PRODUCTION) -> str | None:
    """The version in ``stage`` -- by its alias, falling back to the stage itself."""
    alias = ALIAS_FOR_STAGE.get(stage)
    if alias and (target := alias_target(client, name, alias)) is not None:
        return str(target)
    held = holders(client, name, stage)
    return str(max(int(v.version) for v in held)) if held else None


def move(client: MlflowClient, name: str, version: str, stage: str) -> None:
    """Put ``version`` in ``stage``, archive the previous holder, and mirror the aliases.

    Idempotent: repeating a move that already happened changes nothing.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated; see above
            # Not archive_existing_versions=True: on PostgreSQL MLflow 3.17 compares the
            # integer version column with a string there and the call fails. The stage
            # is written first, so a fault before the archiving leaves two holders that
            # `repair` resolves in favour of the version the ledger placed last.
            client.transition_model_version_stage(name, version, stage)
            if stage in ALIAS_FOR_STAGE:
                for other in holders(client, name, stage):
                    if str(other.version) != str(version):
                        client.transition_model_version_stage(name, other.version, ARCHIVED)
        for other_stage, alias in ALIAS_FOR_STAGE.items():
            if other_stage == stage:
                client.set_registered_model_alias(name, alias, version)
            elif alias_target(client, name, alias) == str(version):
                client.delete_registered_model_alias(name, alias)
    except MlflowException as exc:
        raise StageflowError(
            f"the registry refused moving {name} version {version} to {stage}: {exc.message}"
        ) from None
