"""What a registered version's files must be, and verified local copies to load them from.

A version's *manifest* is the sha256 of every file of its model, recorded on the
model version (tag ``stageflow.manifest``) when it is registered. Every load that
Stageflow does — a replica of ``serve``, a gate, ``score`` — first makes a local
copy of the version, checks each file against the manifest and the skops trusted
types against :data:`ALLOWED_TRUSTED_TYPES`, and loads that copy, never the
artifact store's files directly: someone who can write to the artifact store
cannot change what a version runs.

Copies live under ``$STAGEFLOW_HOME/models/NAME/VERSION`` beside the manifest
they were verified against, so ``serve`` can restart a replica, or start at all,
while the tracking server is away (``last_production``).

A version registered before manifests existed is sealed at its first load (trust
on first use, said in the log and tagged ``stageflow.manifest_source``); a user
who may not tag the version keeps the manifest with the local copy only.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from stageflow import tracking
from stageflow.errors import StageflowError
from stageflow.files import file_digest
from stageflow.secrets import private_dir, write_private

logger = logging.getLogger(__name__)

MANIFEST_TAG = "stageflow.manifest"
# "registered" (recorded as the version was registered) or "first load by USER at TIME".
MANIFEST_SOURCE_TAG = "stageflow.manifest_source"
REGISTERED = "registered"
# MLflow writes this file into every download of a ``models:/`` URI; the store has none.
DOWNLOAD_ONLY_FILES = frozenset({"registered_model_meta"})
# Where a guarded model keeps its data contract (and the skops types it trusts).
CONTRACT_PATH = "artifacts/contract.json"
MANIFEST_FILE = "manifest.json"
MODEL_DIR = "model"
PRODUCTION_FILE = "production.json"

# Types a Stageflow pipeline may need beyond skops' defaults: what the families of
# experiments/families.py can legitimately hold. Each model is logged with exactly
# the subset its own pipeline needs (never blanket pickle), and every load checks the
# version's list against this one, so a list rewritten in the store is refused too;
# anything outside it means a new kind of pipeline and must be reviewed.
ALLOWED_TRUSTED_TYPES = frozenset(
    {
        "builtins.object",
        "numpy.dtype",
        "sklearn.tree._tree.Tree",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn.compose._column_transformer.make_column_selector",
        # Calendar parts of date columns (issue 10): our own, plain-list attributes.
        "experiments.features.CalendarFeatures",
    }
)


class TamperedVersion(StageflowError):
    """A version's files are not the ones its manifest recorded: it is never loaded."""


@dataclass(frozen=True)
class LastProduction:
    """The last Production version ``serve`` saw, and when (its verified copy is local)."""

    version: str
    seen_at: float
    path: Path


def digest_tree(root: Path) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every file under ``root`` but download-only ones."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and relative not in DOWNLOAD_ONLY_FILES:
            found[relative] = file_digest(path)
    return found


def record(client: MlflowClient, name: str, version: str, source: str = REGISTERED) -> dict:
    """Record the manifest of ``name`` version ``version`` from its files in the store now.

    Called as a version is registered (``experiments.artifacts.log_pipeline``).

    Returns:
        The manifest recorded (``{path: sha256}``).
    """
    with tempfile.TemporaryDirectory(prefix="stageflow-manifest-") as tmp:
        files = digest_tree(_download(client, name, version, Path(tmp)))
    _tag(client, name, version, files, source)
    return files


def recorded(client: MlflowClient, name: str, version: str) -> dict | None:
    """The manifest on the model version, or None if it was registered without one."""
    tags = client.get_model_version(name, version).tags or {}
    text = tags.get(MANIFEST_TAG)
    if not text:
        return None
    try:
        files = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        raise TamperedVersion(
            f"version {version} of {name}: its {MANIFEST_TAG} tag is not a manifest; "
            "re-register the version"
        ) from None
    return dict(files)


def verify(root: Path, files: dict, what: str) -> None:
    """Check the files under ``root`` against ``files`` and the trusted types against ours.

    Raises:
        TamperedVersion: one line naming the first file that changed, is missing or
            was added, or the trusted type outside :data:`ALLOWED_TRUSTED_TYPES`.
    """
    present = digest_tree(root)
    for path in sorted(set(files) | set(present)):
        if path not in present:
            raise TamperedVersion(f"{what}: file {path} is missing from its artifacts; refused")
        if path not in files:
            raise TamperedVersion(
                f"{what}: file {path} was added to its artifacts after registration; refused"
            )
        if present[path] != files[path]:
            raise TamperedVersion(
                f"{what}: file {path} changed since registration (sha256 {present[path][:12]}, "
                f"recorded {files[path][:12]}); refused"
            )
    check_trusted_types(root, what)


def check_trusted_types(root: Path, what: str) -> None:
    """The skops types a guarded model's contract trusts must all be in our allow-list."""
    contract = root / CONTRACT_PATH
    if not contract.is_file():
        return  # not a guarded model: no skops file to trust anything in
    try:
        trusted = json.loads(contract.read_text()).get("skops_trusted_types", [])
    except (ValueError, AttributeError):
        raise TamperedVersion(f"{what}: {CONTRACT_PATH} is not a contract; refused") from None
    unexpected = sorted(set(map(str, trusted)) - ALLOWED_TRUSTED_TYPES)
    if unexpected:
        raise TamperedVersion(
            f"{what}: its skops trusted types include {', '.join(unexpected)}, outside "
            "Stageflow's allow-list (stageflow.manifest.ALLOWED_TRUSTED_TYPES); refused"
        )


def local_copy(
    name: str,
    version: str,
    client: MlflowClient | None,
    home: Path | None = None,
    *,
    fresh: bool = False,
    seal: bool = True,
) -> Path:
    """A verified local copy of ``name`` version ``version``: the directory to load.

    Args:
        client: the registry, or None while it is away: then only a copy already
            verified here is used, against the manifest it was verified with.
        home: Stageflow's local state (``$STAGEFLOW_HOME``).
        fresh: download and verify the store's files even if a copy is here (the
            gates and ``score`` do: a version changed in the store is refused there).
        seal: record a manifest on a version registered without one (a dry run
            of the gates changes nothing, so it only keeps it with the copy).

    Raises:
        TamperedVersion: the files differ from the manifest (one line naming the file).
        StageflowError: the registry is away and there is no local copy.
    """
    what = f"version {version} of {name}"
    place = version_dir(name, version, home)
    cached = _cached_manifest(place)
    if client is None:
        if cached is None:
            raise StageflowError(
                f"{what}: the tracking server is away and there is no verified local copy "
                f"in {place}"
            )
        verify(place / MODEL_DIR, cached, f"{what} (local copy {place})")
        return place / MODEL_DIR
    files = recorded(client, name, version)
    if files is not None and cached == files and not fresh:
        with contextlib.suppress(TamperedVersion):
            verify(place / MODEL_DIR, files, what)
            return place / MODEL_DIR
        logger.warning("the local copy of %s in %s changed; downloading it again", what, place)
    private_dir(place.parent)
    staged = Path(tempfile.mkdtemp(prefix=f".{place.name}.", dir=place.parent))
    try:
        model = _download(client, name, version, staged / MODEL_DIR)
        if files is None:
            files = _seal_on_first_load(client, name, version, model, seal)
        verify(model, files, what)
        write_private(staged / MANIFEST_FILE, json.dumps({"files": files}, indent=1))
        if place.exists():
            shutil.rmtree(place)
        os.replace(staged, place)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return place / MODEL_DIR


def check_store(client: MlflowClient, name: str, version: str) -> str | None:
    """Why ``version``'s files in the store would be refused at a load, or None (``status``).

    A version without a manifest is none: its first load seals it (the gates of its
    promotion, at the latest).
    """
    what = f"version {version} of {name}"
    files = recorded(client, name, version)
    if files is None:
        return None
    with tempfile.TemporaryDirectory(prefix="stageflow-check-") as tmp:
        model = _download(client, name, version, Path(tmp))
        try:
            verify(model, files, what)
        except TamperedVersion as exc:
            return f"{exc} at its next load (a copy verified before keeps serving)"
    return None


def kept_manifest(model_dir: Path) -> dict:
    """The manifest a local copy (``local_copy``'s answer) was verified against."""
    files = _cached_manifest(model_dir.parent)
    if files is None:
        raise TamperedVersion(f"the local copy {model_dir} has lost its manifest; refused")
    return files


def remember_production(name: str, version: str, home: Path | None = None) -> None:
    """Note ``version`` as the last Production ``serve`` saw (its copy is in ``home``)."""
    path = _model_dir(name, home) / PRODUCTION_FILE
    private_dir(path.parent)
    text = json.dumps({"version": str(version), "seen_at": time.time()})
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return
    write_private(path, text)


def last_production(name: str, home: Path | None = None) -> LastProduction | None:
    """The last Production version ``serve`` saw, if its verified copy is still here."""
    try:
        seen = json.loads((_model_dir(name, home) / PRODUCTION_FILE).read_text())
        version, seen_at = str(seen["version"]), float(seen["seen_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    place = version_dir(name, version, home)
    if _cached_manifest(place) is None:
        return None
    return LastProduction(version, seen_at, place)


def version_dir(name: str, version: str, home: Path | None = None) -> Path:
    return _model_dir(name, home) / str(version)


def _model_dir(name: str, home: Path | None) -> Path:
    safe = re.sub(r"[^\w.-]+", "-", name).strip("-.") or "model"
    return (home or tracking.home()) / "models" / safe


def _cached_manifest(place: Path) -> dict | None:
    try:
        return dict(json.loads((place / MANIFEST_FILE).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _download(client: MlflowClient, name: str, version: str, dst: Path) -> Path:
    """``version``'s files from the registry ``client`` talks to (not the process's default)."""
    from mlflow.store.artifact.artifact_repository_registry import (  # noqa: PLC0415 - heavy
        get_artifact_repository,
    )

    # Not ``models:/name/version``: MLflow resolves that URI against the process's default
    # registry whatever registry_uri it is given. The client's registry names the files'
    # place, and the client's tracking server serves them.
    place = client.get_model_version_download_uri(name, version)
    dst.mkdir(parents=True, exist_ok=True)
    repository = get_artifact_repository(place, tracking_uri=client.tracking_uri)
    return Path(repository.download_artifacts("", dst_path=str(dst)))


def _seal_on_first_load(
    client: MlflowClient, name: str, version: str, model: Path, seal: bool
) -> dict:
    """A version registered before manifests: its files now become its manifest."""
    files = digest_tree(model)
    if not seal:
        return files
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    source = f"first load by {getpass.getuser()} at {when}"
    try:
        _tag(client, name, version, files, source)
        kept = "recorded on the version"
    except MlflowException as exc:  # e.g. a reader, who may not tag versions
        kept = f"kept with the local copy only ({exc.error_code})"
    logger.warning(
        "version %s of %s was registered without a file manifest; its files as they are now "
        "are its manifest from here on (%s)",
        version,
        name,
        kept,
    )
    return files


def _tag(client: MlflowClient, name: str, version: str, files: dict, source: str) -> None:
    client.set_model_version_tag(
        name, version, MANIFEST_TAG, json.dumps({"files": files}, separators=(",", ":"))
    )
    client.set_model_version_tag(name, version, MANIFEST_SOURCE_TAG, source)
