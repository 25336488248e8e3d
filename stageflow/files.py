"""Data files as every stage sees them: which kinds Stageflow reads, and their digest."""

from __future__ import annotations

import hashlib
from pathlib import Path

# The file kinds a data source, a batch input or a labels file may be.
FILE_SUFFIXES = (".csv", ".parquet")


def file_digest(path: Path, chunk_size: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()
