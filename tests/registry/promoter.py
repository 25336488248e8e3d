"""Promoters in processes of their own, for the race and kill tests.

Each is a real process, forked from one forkserver that imported ``registry`` once
(``forkserver`` start method, preloaded): six promoters are ready in a fraction of a
second, not after six interpreters import MLflow side by side (~3 CPU-s each). A promoter
says it is ready, waits for the go file (a start barrier, so the promoters really race),
promotes, and writes its result as JSON beside the barrier.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import mlflow

import registry

_CONTEXT = multiprocessing.get_context("forkserver")
# Before the forkserver starts (on the first promoter): what every promoter imports.
_CONTEXT.set_forkserver_preload(["registry"])


def start(uri: str, model: str, version: str, stage: str, barrier: Path):
    """A started promoter process (``multiprocessing.Process``) for ``version`` → ``stage``."""
    process = _CONTEXT.Process(
        target=_promote, args=(uri, model, version, stage, str(barrier)), daemon=True
    )
    process.start()
    return process


def result(barrier: Path, version: str, stage: str) -> dict:
    """What the promoter of ``version`` → ``stage`` wrote: the transition, or ``refused``."""
    return json.loads((barrier / f"result-{version}-{stage}.json").read_text())


def errors(barrier: Path) -> str:
    """The end of every promoter's stderr, for a failed test's message."""
    return "\n".join(f"{p.name}: {p.read_text()[-2000:]}" for p in sorted(barrier.glob("stderr-*")))


def _promote(uri: str, model: str, version: str, stage: str, barrier: str) -> None:
    # Its stderr (a traceback included) to a file of its own, as a process's own pipe.
    log = open(Path(barrier) / f"stderr-{version}-{stage}.txt", "w")  # open until it exits
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    # As a process started with MLFLOW_TRACKING_URI would see it.
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    barrier_dir = Path(barrier)
    (barrier_dir / f"ready-{version}-{stage}").touch()
    while not (barrier_dir / "go").exists():
        time.sleep(0.01)
    try:
        answer = registry.promote(model, version, stage, f"race {version}", tracking_uri=uri)
        document, code = answer.to_json(), 0
    except registry.Refused as refused:
        document, code = {"refused": str(refused)}, 1
    (barrier_dir / f"result-{version}-{stage}.json").write_text(json.dumps(document))
    raise SystemExit(code)
