"""Small helpers shared by test modules."""

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import mlflow
import psutil
from mlflow import MlflowClient

if TYPE_CHECKING:
    from serving.controller import BackgroundServe

# The policy every test promotes under unless promotion speed is its subject: the
# default latency budget (100 ms per row, p95) is a stopwatch, and on a busy machine
# it refused promotions in tests about thresholds, races and the CLI. Tests of the
# latency gate set tight and loose budgets of their own (tests/registry/test_gates.py).
UNTIMED_LATENCY_YAML = """\
latency:
  single_row_p95_ms: 1000000
  batch_p95_ms: 1000000
  repeats: 3
"""


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (to prove nothing was left running)."""
    return [
        proc.pid
        for proc in psutil.process_iter(["cmdline"])
        if text in " ".join(proc.info["cmdline"] or ())
    ]


def assert_one_holder_per_stage(client: MlflowClient, name: str) -> dict[str, str | None]:
    """Each stage held by at most one version, and its alias names that version."""
    found = {}
    for stage, alias in (("Staging", "challenger"), ("Production", "champion")):
        held = [
            v.version
            for v in client.search_model_versions(f"name='{name}'")
            if v.current_stage == stage
        ]
        assert len(held) <= 1, f"{stage} held by {held}"
        try:
            by_alias = client.get_model_version_by_alias(name, alias).version
        except mlflow.exceptions.MlflowException:
            by_alias = None
        assert (held[0] if held else None) == by_alias, f"{stage} {held} vs @{alias} {by_alias}"
        found[stage] = by_alias
    return found


def overwrite_in_store(client: MlflowClient, name: str, version: str, path: str, text: str) -> None:
    """Replace one file of a registered version in the artifact store, as anyone may who can
    write artifacts: through the tracking server's artifact API, not the registry."""
    import tempfile
    from pathlib import Path

    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    location = client.get_model_version_download_uri(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(path).name
        local.write_text(text)
        parent = str(Path(path).parent)
        get_artifact_repository(location).log_artifact(
            str(local), None if parent == "." else parent
        )


def stageflow_cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m stageflow ARGS`` in ``env``, its output captured, whatever its exit code."""
    return subprocess.run(
        [sys.executable, "-m", "stageflow", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@contextlib.contextmanager
def serving_in_production(
    name: str, version: str, tracking_uri: str, home, timeout: float
) -> Iterator["BackgroundServe"]:
    """``version`` of ``name`` moved to Production and served (one replica) until the block ends.

    For module-scoped fixtures whose tests only send requests: one cold start for all of
    them (the tests share it on one worker through an ``xdist_group``).
    """
    from registry._stages import PRODUCTION, move
    from serving.controller import BackgroundServe
    from stageflow import processes

    move(MlflowClient(tracking_uri), name, version, PRODUCTION)
    # Replicas are tests/serving/test_serve.py's subject; one starts faster.
    running = BackgroundServe(
        name,
        processes.free_port(),
        tracking_uri=tracking_uri,
        home=home,
        poll_interval=0.5,
        replicas=1,
    ).start()
    try:
        assert running.wait_serving(timeout=timeout) == version
        yield running
    finally:
        running.stop()
