"""Shared fixtures: a real tracking server per test session, a fresh model name per test."""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from pathlib import Path

import mlflow
import pytest

from stageflow import processes, server, tracking
from tests.helpers import UNTIMED_LATENCY_YAML

# Keep test output readable and --json output clean, as the CLI does.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session", autouse=True)
def temporary_files(tmp_path_factory):
    """This process's temporary files go under pytest's base temporary folder, which
    pytest prunes (it keeps the last three runs'): MLflow makes a folder in the
    temporary directory for every ``models:/`` URI loaded without ``dst_path``, and
    never removes it."""
    folder = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(folder))
        yield folder


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory):
    """A real ``mlflow server`` (Stageflow's embedded configuration) on a free port.

    Tests share it for speed; each test works on its own model name and experiment.
    """
    home = tmp_path_factory.mktemp("stageflow-home")
    info = server.start(port=processes.free_port(), home=home, tie_to_parent=True)
    yield info
    server.stop(home)


@pytest.fixture
def tracking_uri(tracking_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.uri)
    mlflow.set_tracking_uri(tracking_server.uri)
    mlflow.set_registry_uri(tracking_server.uri)
    return tracking_server.uri


@pytest.fixture
def model_name(request):
    """A registered-model name no other test uses."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:40]
    return f"{stem}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(autouse=True)
def stageflow_home(tmp_path_factory, monkeypatch):
    """Each test's own ``STAGEFLOW_HOME``: what goes to the default home (the gates' and
    scoring's verified copies, serve's state) lands in pytest's temporary folders, not
    in the checkout's ``./.stageflow``, and no test sees another's. (Not in
    ``tmp_path``: tests check what is in there.)"""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv(tracking.HOME_ENV, str(home))
    return home


@pytest.fixture(autouse=True)
def no_leaked_run():
    """A test that leaves an MLflow run active fails (and the run is closed)."""
    yield
    leaked = mlflow.active_run()
    if leaked is not None:
        mlflow.end_run()
        pytest.fail(f"test left MLflow run {leaked.info.run_id} active")


@pytest.fixture(scope="session")
def untimed_policy(tmp_path_factory) -> Path:
    """A policy file whose latency budget no machine can exceed; defaults otherwise."""
    path = tmp_path_factory.mktemp("policy") / "untimed-latency.yaml"
    path.write_text(UNTIMED_LATENCY_YAML)
    return path


@pytest.fixture
def untime_promotions(tracking_uri, untimed_policy):
    """``untime_promotions(name)``: store the untimed policy on model ``name`` (its tag)."""
    from registry import set_policy

    def untime(name: str, tracking_uri: str = tracking_uri) -> None:
        set_policy(name, untimed_policy, tracking_uri)

    return untime


@pytest.fixture(scope="session")
def wine_models(tracking_server):
    """Two real trained versions (lr, rf on builtin:wine), trained once per session.

    Tests that need versions of their own register these same models under their
    own name (``register_versions``): real artifacts, no retraining per test.
    """
    from experiments.train import train

    name = f"session-wine-{uuid.uuid4().hex[:6]}"
    results = [
        train("builtin:wine", "target", model_name=name, family=f, tracking_uri=tracking_server.uri)
        for f in ("lr", "rf")
    ]
    client = mlflow.MlflowClient(tracking_server.uri)
    return [client.get_model_version(name, r.version).source for r in results]


@pytest.fixture
def register_versions(tracking_uri, wine_models, untime_promotions):
    """``register_versions(name)`` → versions "1" (lr) and "2" (rf) of ``name``.

    The model promotes under the untimed policy (``UNTIMED_LATENCY_YAML``).
    """

    def register(name: str) -> list[str]:
        versions = [mlflow.register_model(source, name).version for source in wine_models]
        untime_promotions(name)
        return versions

    return register


POSTGRES_ADMIN_DSN = os.environ.get(
    "STAGEFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
def postgres_database():
    """A fresh PostgreSQL database for one test, dropped after: its SQLAlchemy URI.

    Uses the server at ``STAGEFLOW_TEST_POSTGRES`` (default: 127.0.0.1:5432, trust
    auth). Skips, saying why, where that server does not answer.
    """
    import psycopg

    try:
        admin = psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL at {POSTGRES_ADMIN_DSN} is not reachable: {exc}".strip())
    name = f"stageflow_test_{uuid.uuid4().hex[:10]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0]
            yield f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# Slowest modules first (cold starts of real model servers, end-to-end stories), the
# rest in collection order: `make test` hands tests to its workers in this order
# (`--dist loadgroup --no-loadscope-reorder`), so the long ones start at once and the
# short ones fill in around them instead of one long test ending the run alone.
SLOWEST_FIRST = (  # by the durations of `make test` (2026-12-02); a group goes as one
    "tests/test_mlproject.py",
    "tests/serving/test_spark.py",
    "tests/test_dags.py",
    "tests/test_demo.py",
    "tests/monitoring/test_closed_loop.py",
    "tests/registry/test_consistency.py",
    "tests/test_lifecycle.py",
    "tests/serving/test_verified_copy.py",
    "tests/serving/test_serve.py",
    "tests/serving/test_hung_replica.py",
    "tests/serving/test_alias_outside.py",
    "tests/serving/test_auto_rollback.py",
    "tests/serving/test_inference_log.py",
    "tests/stageflow/test_server_security.py",
    "tests/experiments/test_tune.py",
    "tests/serving/test_shadow.py",
    "tests/stageflow/test_server_tls.py",
    "tests/monitoring/test_monitor_cli.py",
    "tests/stageflow/test_cli.py",
    "tests/serving/test_guarded.py",
    "tests/serving/test_dates_and_ids.py",
    "tests/test_ui.py",
    "tests/registry/test_gates.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: position for position, path in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


def pytest_collection_finish(session):
    """On an xdist worker under ``--dist loadgroup``: every ``xdist_group`` test carries its
    group in its node id, or the groups' shared servers would silently be built twice."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [
        item.nodeid
        for item in session.items
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid
    ]
    if lost:
        raise pytest.UsageError(
            f"--dist loadgroup lost the xdist_group of {len(lost)} test(s), e.g. {lost[0]}: this "
            "pytest and pytest-xdist do not group together (pytest-dev/pytest-xdist#1386)"
        )
