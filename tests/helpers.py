"""Small helpers shared by test modules."""

import contextlib
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import mlflow
import psutil
import pytest
from mlflow import MlflowClient
from mlflow.tracking import fluent
from mlflow.tracking._model_registry import utils as registry_uri_state
from mlflow.tracking._tracking_service import utils as tracking_uri_state

from stageflow.cli import main

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


def in_process(capsys, *args: str, env: dict) -> subprocess.CompletedProcess:
    """``stageflow ARGS`` run by ``stageflow.cli.main`` in this interpreter, as a fresh
    ``python -m stageflow ARGS`` would run it; its exit code and output returned as a
    subprocess's would be (``stageflow_cli``), without the ~3 s of importing MLflow.

    ``env``'s variables are set (None: unset) for the call only. ``capsys`` captures the
    output; what the test printed before the call is dropped. As with a process that
    ends, nothing the command changes in this interpreter outlives the call: the
    variables it sets (MLflow exports the tracking URI and experiment it is given),
    MLflow's current tracking URI, registry URI and experiment, warning filters, logger
    levels, and the CLI's logging handler. That handler is the CLI's own: for the call,
    the root logger has no handlers, as in a new process, so ``configure_logging`` binds
    its handler to this call's captured stderr and the warnings it logs are in
    ``stderr``. (Python warnings are recorded by pytest rather than printed there.)

    ``SystemExit`` (argparse's usage errors, ``--help``) becomes the exit code as
    ``python -m`` makes it; any other exception the CLI lets out propagates, and the
    test fails, as the process would have ended with a traceback.
    """
    capsys.readouterr()
    root = logging.getLogger()
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        for key, value in env.items():
            if value is None:
                patch.delenv(key, raising=False)
            else:
                patch.setenv(key, value)
        environ = dict(os.environ)
        levels = _logger_levels()
        patch.setattr(root, "handlers", [])
        patch.setattr(registry_uri_state, "_registry_uri", registry_uri_state._registry_uri)
        patch.setattr(fluent, "_active_experiment_id", fluent._active_experiment_id)
        tracking_uri = tracking_uri_state._tracking_uri
        try:
            try:
                code = main(list(args))
            except SystemExit as exit_:
                code = _exit_code(exit_.code)
        finally:
            for handler in root.handlers:
                handler.close()
            mlflow.set_tracking_uri(tracking_uri)
            for key in set(os.environ) - set(environ):
                del os.environ[key]
            for key, value in environ.items():
                if os.environ.get(key) != value:
                    os.environ[key] = value
            _restore_logger_levels(levels)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["stageflow", *args], code, captured.out, captured.err)


def _exit_code(code) -> int:
    """The exit status ``sys.exit(code)`` gives a process (and its message on stderr)."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def _logger_levels() -> dict[str, int]:
    manager = logging.Logger.manager
    levels = {
        name: logger.level
        for name, logger in manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    return levels | {"": logging.getLogger().level}


def _restore_logger_levels(levels: dict[str, int]) -> None:
    """Every logger back to its level before the call; a logger made during it, unset."""
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != levels.get(name, 0):
            logger.setLevel(levels.get(name, logging.NOTSET))
    logging.getLogger().setLevel(levels[""])


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
