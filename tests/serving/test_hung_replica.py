"""``serve`` for real when a part stops answering or dies: a hung replica, a killed Caddy.

Real tracking server, real ``mlflow models serve`` replicas, real Caddy. How long the
hang lasted for clients and how soon the fresh replica served are measured by
``benchmarks/hung_replica.py`` (BENCHMARKS.md); these tests assert what a client
gets and that the parts come back, within generous timeouts.
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

from experiments import data
from registry._stages import PRODUCTION, move
from serving.controller import Controller
from stageflow import processes
from tests.serving.test_serve import Load

pytestmark = pytest.mark.slow

# A replica's start is ~10-15 s on a quiet 2-CPU machine; several times that under load.
START_TIMEOUT_S = 240.0
REPLACED_TIMEOUT_S = 240.0


@pytest.fixture
def served_version(tracking_uri, wine_models, client):
    """A fresh model whose version 1 (the session's lr) is Production."""
    name = f"hung-{uuid.uuid4().hex[:6]}"
    version = mlflow.register_model(wine_models[0], name).version
    move(client, name, version, PRODUCTION)
    return name, version


@pytest.fixture
def client(tracking_uri):
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@pytest.fixture
def wine_request():
    rows = data.load("builtin:wine").drop(columns=[data.BUILTIN_TARGET]).head(3)
    return {"dataframe_split": rows.to_dict(orient="split", index=False)}


def started(start_serving, served_version, replicas: int, caplog) -> Controller:
    """``serve`` of the Production version with ``replicas`` replicas, once it serves."""
    name, version = served_version
    caplog.set_level(logging.INFO, logger="serving.controller")
    running = start_serving(name, replicas=replicas)
    assert running.wait_serving(timeout=START_TIMEOUT_S) == version
    return running.controller


def test_a_hung_replica_under_load_fails_no_request_and_is_replaced(
    served_version, wine_request, start_serving, caplog
):
    version = served_version[1]
    controller = started(start_serving, served_version, 2, caplog)
    hung, sibling = controller._active.replicas
    # Both proved (the second starts once the first has): the hang is a serving replica's.
    processes.wait_until(
        lambda: hung.ready and sibling.ready, timeout=START_TIMEOUT_S, what="both replicas proved"
    )
    stopped = hung.pid

    with Load(controller.url, wine_request, clients=4, max_seconds=600) as load:
        processes.wait_until(lambda: len(load.answers) >= 20, timeout=60, what="steady load")
        os.killpg(stopped, signal.SIGSTOP)
        try:
            processes.wait_until(
                lambda: hung.ready and hung.alive() and hung.pid != stopped,
                timeout=REPLACED_TIMEOUT_S,
                what="a fresh replica in place of the hung one",
            )
            answered_before = len(load.answers)
            processes.wait_until(
                lambda: len(load.answers) >= answered_before + 20,
                timeout=60,
                what="answers after the replacement",
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(stopped, signal.SIGCONT)  # if it was not killed, let it stop

    assert load.failures == [], f"{len(load.failures)} of {len(load.answers)} requests failed"
    assert {served for _, served in load.answers} == {version}
    assert not processes.group_alive(stopped), "the hung replica was not killed"
    assert sibling.alive(), "the replica that kept answering kept running"
    # No line per request in a model server's log unless serve --access-log asks for it.
    assert "POST /invocations" not in sibling.log_path.read_text(errors="replace")
    # The liveness rule replaced it (not the start-up proof's timeout, nor a restart).
    assert any(
        hung.address in message and "answered no liveness ping" in message
        for message in caplog.messages
    )


def test_caddy_killed_under_load_is_started_again_and_serving_goes_on(
    served_version, wine_request, start_serving, caplog
):
    version = served_version[1]
    controller = started(start_serving, served_version, 1, caplog)
    door = controller.front_door
    first = door.proc.pid
    (replica,) = controller._active.replicas

    with Load(controller.url, wine_request, clients=2, max_seconds=600) as load:
        processes.wait_until(lambda: len(load.answers) >= 20, timeout=60, what="steady load")
        os.killpg(first, signal.SIGKILL)
        processes.wait_until(
            lambda: door.alive() and door.proc.pid != first,
            timeout=60,
            what="Caddy started again",
        )
        answered_before = len(load.answers)
        processes.wait_until(
            lambda: sum(1 for status, _ in load.answers[answered_before:] if status == 200) >= 20,
            timeout=60,
            what="answers through the new Caddy",
        )

    assert not processes.group_alive(first)
    assert controller.serving_version == version
    assert replica.alive(), "the model server kept running while Caddy was away"
    # Only the moment Caddy was away failed: refused or dropped connections, no 5xx.
    assert all(isinstance(status, str) for status, _ in load.failures), load.failures
    assert any("starting it again" in message for message in caplog.messages)
    assert requests.post(controller.url + "/invocations", json=wine_request, timeout=60).ok
