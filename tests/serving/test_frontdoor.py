"""The real Caddy front door in front of real uvicorn replicas: what a client sees when one dies.

No model here: the replicas run a tiny ASGI app (``answering_app.py``) so a replica
can die at exactly the moment that matters, after its headers and before its body.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import requests

from serving._hold_answers import PROTOCOL
from serving._slots import HealthServer, make_slots
from serving.frontdoor import FrontDoor
from stageflow import processes
from tests.serving.answering_app import BODY

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
# The dying replica gets a request within a few (least_conn picks at random among
# idle replicas); the bound only keeps a broken setup from looping forever.
MAX_REQUESTS = 100


def answers_with_one_replica_dying_mid_answer(protocol: str, tmp_path: Path) -> list:
    """Two replicas behind the front door, one dies after its headers: every client's outcome."""
    (slot,), health_port = make_slots(replicas=2, count=1)
    dying, healthy = slot.replicas
    health = HealthServer([slot], health_port)
    door = FrontDoor(processes.free_port(), [slot], health_port, tmp_path / "door")
    try:
        for replica, dies in ((dying, "1"), (healthy, "0")):
            replica.proc = processes.spawn(
                [
                    sys.executable, "-m", "uvicorn", "tests.serving.answering_app:app",
                    "--host", replica.address, "--port", str(replica.port),
                    "--http", protocol, "--no-access-log",
                ],
                log_path=tmp_path / f"{replica.address}.log",
                env=processes.venv_env(
                    {"PYTHONPATH": str(REPO_ROOT), "ANSWER": replica.address,
                     "DIE_AFTER_HEADERS": dies}
                ),
            )  # fmt: skip
            processes.wait_until(
                lambda r=replica: processes.port_in_use(r.address, r.port),
                timeout=START_TIMEOUT_S,
                proc=replica.proc,
                what=f"uvicorn on {replica.url}",
                log_path=tmp_path / f"{replica.address}.log",
            )
            replica.ready = True
        slot.version, slot.routed = "1", True
        health.start()
        door.start()
        assert slot.wait_seen(healthy=True, timeout=START_TIMEOUT_S), "replicas never probed"

        outcomes = []
        with requests.Session() as session:
            for _ in range(MAX_REQUESTS):
                try:
                    answer = session.post(door.url + "/invocations", json={"x": 1}, timeout=30)
                    outcomes.append(
                        (answer.status_code, answer.headers.get("X-Answered-By"), answer.content)
                    )
                except requests.RequestException as exc:
                    outcomes.append((type(exc).__name__, None, None))
                if not dying.alive():
                    break
        assert dying.proc.wait(timeout=30) == -9, "the dying replica never got a request"
        return outcomes
    finally:
        door.stop()
        health.close()
        for replica in slot.replicas:
            if replica.proc is not None:
                processes.stop_group(replica.proc.pid)


def test_a_replica_dying_after_its_headers_reaches_no_client_as_a_broken_answer(tmp_path):
    outcomes = answers_with_one_replica_dying_mid_answer(PROTOCOL, tmp_path)

    healthy_address = sorted({address for _, address, _ in outcomes if address})
    assert all(outcome[0] == 200 and outcome[2] == BODY for outcome in outcomes), outcomes
    assert len(healthy_address) == 1, f"answers from {healthy_address}: only the sibling answers"


def test_with_uvicorns_own_protocol_the_same_death_breaks_an_answer(tmp_path):
    """The control: without the held answer, this setup reproduces the truncated 200.

    Were Caddy to retry after committed headers one day (caddyserver/caddy#8053),
    this fails, and ``serving/_hold_answers.py`` may go.
    """
    outcomes = answers_with_one_replica_dying_mid_answer("h11", tmp_path)

    broken = [outcome for outcome in outcomes if outcome[0] != 200]
    assert broken == [("ChunkedEncodingError", None, None)], outcomes
