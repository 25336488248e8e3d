"""The one place that talks to MLflow's stage and alias APIs.

Stages are what users asked for (None → Staging → Production → Archived), but
MLflow deprecated them in 2.9 in favour of aliases (mlflow#10336). Every move
here sets the stage and its mirror alias together, so ``models:/NAME/Production``
and ``models:/NAME@champion`` resolve to the same version; the rest of Stageflow
asks this module and never calls the stage API itself.

It also owns what "the Production version" means, for ``serve`` and ``status``
alike (:func:`placements`): the version that holds the stage *and* its alias, and
that the ledger's head names for it -- the ledger only says so when a gated
transition (or a recorded repair) put it there. When they disagree (an alias moved
outside Stageflow, a fault between a move's two writes) there is no settled
Production: serving keeps what it serves, and ``status`` names the split and the fix.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from registry import ledger
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


@dataclass(frozen=True)
class Placement:
    """Where one stage stands: its holders, its alias, and what the ledger says.

    Attributes:
        held: the versions whose stage it is.
        aliased: the version its mirror alias points at.
        ledgered: the version the ledger's head last put there (None: emptied);
            ``known`` is False when the ledger has no say yet (no chained entry
            into the stage: a ledger older than its head, or a stage set up by hand).
    """

    stage: str
    held: tuple[str, ...]
    aliased: str | None
    ledgered: str | None = None
    known: bool = False

    @property
    def alias(self) -> str:
        return ALIAS_FOR_STAGE[self.stage]

    @property
    def version(self) -> str | None:
        """The settled version: stage, alias and ledger agree; None when empty or split."""
        if self.split or not self.held:
            return None
        return self.aliased

    @property
    def candidate(self) -> str | None:
        """What the registry names, settled or not: the alias, else the newest holder."""
        if self.aliased is not None:
            return self.aliased
        return max(self.held, key=int) if self.held else None

    @property
    def ledgered_split(self) -> bool:
        """Stage and alias agree, on a version the ledger did not put there."""
        return (
            self.known
            and self.ledgered != self.aliased
            and self.held == ((self.aliased,) if self.aliased else ())
        )

    @property
    def split(self) -> str | None:
        """Why the stage is not settled, in one line; None when it is."""
        alias = self.alias
        held = ", ".join(self.held)
        if len(self.held) > 1:
            return f"{self.stage} is held by versions {held} (expected one)"
        if self.held and self.aliased is None:
            return f"{self.stage} version {held} has no @{alias} alias"
        if self.aliased is not None and self.aliased not in self.held:
            where = f"version {held} is" if self.held else "no version is"
            return f"@{alias} points at version {self.aliased}, but {where} in {self.stage}"
        if self.ledgered_split:
            said = f"version {self.ledgered}" if self.ledgered else "no version"
            now = f"version {self.aliased}" if self.aliased else "no version"
            return (
                f"{self.stage} holds {now}, but the ledger last put {said} there: "
                "it was moved outside Stageflow"
            )
        return None


def placements(client: MlflowClient, name: str) -> dict[str, Placement]:
    """Staging and Production as they stand (two reads: the registered model, its versions)."""
    registered = client.get_registered_model(name)
    head = ledger.parse_head(registered.tags.get(ledger.HEAD_TAG))
    placed = head.placed if head is not None else {}
    aliases = {alias: str(v) for alias, v in (registered.aliases or {}).items()}
    every = versions(client, name)
    return {
        stage: Placement(
            stage,
            tuple(str(v.version) for v in every if v.current_stage == stage),
            aliases.get(alias),
            placed.get(stage),
            stage in placed,
        )
        for stage, alias in ALIAS_FOR_STAGE.items()
    }


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
