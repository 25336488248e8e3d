"""``serve`` runs verified local copies: files changed in the store, a tracking server away.

Files are changed the way anyone who can write artifacts could: through the tracking
server's artifact API (``tests.helpers.overwrite_in_store``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import uuid

import mlflow
import pytest
import requests

from experiments.data import load
from experiments.train import train
from registry import PRODUCTION, STAGING, promote, set_policy
from serving.controller import VERSION_HEADER, BackgroundServe
from stageflow import processes, server
from tests.helpers import overwrite_in_store

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 240.0
INJECTED = "\nopen({marker!r}, 'w').write('ran')\n"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return load("builtin:wine").drop(columns=["target"]).head(2).to_dict(orient="records")


def predict(url: str, rows: list[dict]) -> requests.Response:
    return requests.post(url + "/invocations", json={"dataframe_records": rows}, timeout=30)


def in_production(name: str, uri: str, policy) -> str:
    """A freshly trained version of ``name``, promoted through the gates to Production."""
    trained = train("builtin:wine", "target", model_name=name, family="lr", tracking_uri=uri)
    version = str(trained.version)
    set_policy(name, policy, uri)
    promote(name, version, STAGING, reason="verified copy test", tracking_uri=uri)
    promote(name, version, PRODUCTION, reason="verified copy test", tracking_uri=uri)
    return version


def tamper_code(client, name: str, version: str, marker, tmp_path) -> None:
    code = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{version}/guarded_model.py", dst_path=str(tmp_path / "orig")
    )
    with open(code) as handle:
        text = handle.read()
    injected = text + INJECTED.format(marker=str(marker))
    overwrite_in_store(client, name, version, "guarded_model.py", injected)


def wait_answering(url: str, rows, version: str) -> None:
    def answers() -> bool:
        try:
            answer = predict(url, rows)
        except requests.RequestException:
            return False
        return answer.status_code == 200 and answer.headers.get(VERSION_HEADER) == version

    processes.wait_until(answers, timeout=START_TIMEOUT_S, what=f"version {version} answering")


def test_a_replica_restarted_after_its_files_changed_in_the_store_serves_the_verified_copy(
    tracking_uri, model_name, untimed_policy, start_serving, rows, tmp_path
):
    client = mlflow.MlflowClient(tracking_uri)
    version = in_production(model_name, tracking_uri, untimed_policy)
    running = start_serving(model_name, replicas=1)
    assert running.wait_serving(timeout=START_TIMEOUT_S) == version
    marker = tmp_path / "injected"
    tamper_code(client, model_name, version, marker, tmp_path)
    (replica,) = running.controller._active.replicas
    killed = replica.pid

    os.killpg(killed, signal.SIGKILL)

    processes.wait_until(
        lambda: replica.ready and replica.alive() and replica.pid != killed,
        timeout=START_TIMEOUT_S,
        what="the restarted model server",
    )
    wait_answering(running.url, rows, version)
    assert not marker.exists()


def test_a_serve_without_a_verified_copy_refuses_a_production_changed_in_the_store(
    tracking_uri, model_name, untimed_policy, start_serving, rows, tmp_path, caplog
):
    client = mlflow.MlflowClient(tracking_uri)
    version = in_production(model_name, tracking_uri, untimed_policy)
    first = start_serving(model_name, replicas=1)
    assert first.wait_serving(timeout=START_TIMEOUT_S) == version
    marker = tmp_path / "injected"
    tamper_code(client, model_name, version, marker, tmp_path)
    caplog.set_level(logging.INFO, logger="serving.controller")

    fresh = BackgroundServe(
        model_name,
        processes.free_port(),
        tracking_uri=tracking_uri,
        home=tmp_path / "fresh-home",
        poll_interval=0.5,
        replicas=1,
    ).start()
    try:
        refused = "file guarded_model.py changed since registration"
        processes.wait_until(
            lambda: any("failed to start" in m and refused in m for m in caplog.messages),
            timeout=START_TIMEOUT_S,
            what="the refusal in the log",
        )
        assert not fresh.controller.serving.is_set()
        assert fresh.controller.started_pids == fresh.controller.started_pids[:1]  # Caddy only
    finally:
        fresh.stop()
    answer = predict(first.url, rows)
    assert answer.status_code == 200
    assert answer.headers[VERSION_HEADER] == version
    assert not marker.exists()


@pytest.fixture
def own_tracking_server(tmp_path):
    """A tracking server this test may stop or freeze (not the session's)."""
    home = tmp_path / "tracking-home"
    info = server.start(port=processes.free_port(), home=home, tie_to_parent=True)
    yield info, home
    with contextlib.suppress(ProcessLookupError):
        os.killpg(info.pid, signal.SIGCONT)  # the server leads its own process group
    server.stop(home)


def test_serve_started_while_the_tracking_server_is_down_serves_the_last_verified_production(
    own_tracking_server, untimed_policy, rows, tmp_path, caplog, monkeypatch
):
    info, tracking_home = own_tracking_server
    uri = info.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    name = f"offline-{uuid.uuid4().hex[:6]}"
    version = in_production(name, uri, untimed_policy)
    home = tmp_path / "serve-home"
    with BackgroundServe(
        name, processes.free_port(), tracking_uri=uri, home=home, poll_interval=0.5, replicas=1
    ) as running:
        assert running.wait_serving(timeout=START_TIMEOUT_S) == version
    server.stop(tracking_home)
    caplog.set_level(logging.INFO, logger="serving.controller")

    with BackgroundServe(
        name, processes.free_port(), tracking_uri=uri, home=home, poll_interval=0.5, replicas=1
    ) as offline:
        assert offline.wait_serving(timeout=START_TIMEOUT_S) == version
        answer = predict(offline.url, rows)

    assert answer.status_code == 200
    assert answer.headers[VERSION_HEADER] == version
    said = [m for m in caplog.messages if "does not answer; serving version" in m]
    assert len(said) == 1
    assert "from its verified local copy" in said[0]


def test_a_replica_restarts_from_its_verified_copy_while_the_tracking_server_hangs(
    own_tracking_server, untimed_policy, rows, tmp_path, caplog, monkeypatch
):
    info, tracking_home = own_tracking_server
    uri = info.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    name = f"hung-{uuid.uuid4().hex[:6]}"
    version = in_production(name, uri, untimed_policy)
    caplog.set_level(logging.INFO, logger="serving.controller")
    with BackgroundServe(
        name, processes.free_port(), tracking_uri=uri, home=tmp_path, poll_interval=0.5, replicas=1
    ) as running:
        assert running.wait_serving(timeout=START_TIMEOUT_S) == version
        (replica,) = running.controller._active.replicas
        killed = replica.pid
        os.killpg(info.pid, signal.SIGSTOP)  # hung, not down: connections wait
        try:
            processes.wait_until(
                lambda: any("cannot read" in m for m in caplog.messages),
                timeout=60,
                what="the controller noticing the hung tracking server",
            )
            os.killpg(killed, signal.SIGKILL)
            processes.wait_until(
                lambda: replica.ready and replica.alive() and replica.pid != killed,
                timeout=START_TIMEOUT_S,
                what="the restarted model server",
            )
            answer = predict(running.url, rows)
        finally:
            os.killpg(info.pid, signal.SIGCONT)

    assert answer.status_code == 200
    assert answer.headers[VERSION_HEADER] == version
