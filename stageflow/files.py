"""Data files as every stage sees them: which kinds Stageflow reads, their digest, and
how an output is written whole (staged beside its name, then renamed)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO

# The file kinds a data source, a batch input or a labels file may be.
FILE_SUFFIXES = (".csv", ".parquet")


def file_digest(path: Path, chunk_size: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def open_beside(target: Path, mode: str = "wb", **options) -> tuple[IO, Path]:
    """A new file in ``target``'s folder to write ``target`` under, then ``os.replace`` it.

    ``tempfile.mkstemp`` creates it exclusively under a random name, so a link someone
    planted at a guessable name (``.out.csv.partial``) is never followed and nothing
    is written where it points. Its mode is what the umask gives a new file.

    Returns:
        The open file (``mode`` and ``options`` as for ``open``) and its path.
    """
    target = Path(target)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    os.fchmod(fd, 0o666 & ~_umask())
    return os.fdopen(fd, mode, **options), Path(name)


def folder_beside(target: Path) -> Path:
    """A new, empty folder in ``target``'s folder to build ``target`` (a folder) inside.

    Made exclusively under a random name (``tempfile.mkdtemp``, mode 0700); build the
    output at ``folder / "out"`` and ``os.replace`` that onto ``target``.
    """
    target = Path(target)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask
