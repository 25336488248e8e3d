"""Keeping secrets out of what Stageflow writes: files, command lines, params, tags, logs."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

# Folders and files under STAGEFLOW_HOME hold database paths, logs and the auth
# configuration: readable by their owner only.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def mask_uri(uri: str) -> str:
    """The URI with its password replaced by ``***``: safe to log, print, store and tag."""
    try:
        return make_url(uri).render_as_string(hide_password=True)
    except ArgumentError:
        return uri.split("@", 1)[-1] if "@" in uri else uri


def has_password(uri: str) -> bool:
    """Whether a database URI carries a password in itself."""
    try:
        return make_url(uri).password is not None
    except ArgumentError:
        return False


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it owner-only."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read, created so from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, PRIVATE_FILE_MODE)  # an existing file keeps its old mode through O_CREAT
