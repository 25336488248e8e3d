"""The real Caddy front door in front of real uvicorn replicas: what a client sees when one fails.

No model here: the replicas run a tiny ASGI app (``answering_app.py``) so a replica
can die at exactly the moment that matters, after its headers and before its body,
or hang (SIGSTOP) with requests on it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from serving._hold_answers import PROTOCOL
from serving._slots import HealthServer, Slot, make_slots
from serving.frontdoor import ACCESS_LOG_FILE, FrontDoor, FrontDoorTimings
from stageflow import processes
from tests.serving.answering_app import BODY

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
# The dying replica gets a request within a few (least_conn picks at random among
# idle replicas); the bound only keeps a broken setup from looping forever.
MAX_REQUESTS = 100
# Short, so the hung-replica tests wait little; try_duration (5 s) stays above twice it.
FIRST_BYTE_S = 1.0
TIMINGS = FrontDoorTimings(first_byte_timeout=FIRST_BYTE_S)


@contextlib.contextmanager
def front_door(
    tmp_path: Path,
    dies: tuple[bool, ...] = (False, False),
    protocol: str = PROTOCOL,
    access_log: bool = False,
    timings: FrontDoorTimings = TIMINGS,
) -> Iterator[tuple[FrontDoor, Slot]]:
    """Caddy in front of one slot of answering replicas, routed; ``dies``: which die mid-answer."""
    (slot,), health_port = make_slots(replicas=len(dies), count=1)
    health = HealthServer([slot], health_port)
    door = FrontDoor(
        processes.free_port(),
        [slot],
        health_port,
        tmp_path / "door",
        timings,
        access_log=access_log,
    )
    try:
        for replica, dying in zip(slot.replicas, dies, strict=True):
            log_path = tmp_path / f"{replica.address}.log"
            replica.proc = processes.spawn(
                [
                    sys.executable, "-m", "uvicorn", "tests.serving.answering_app:app",
                    "--host", replica.address, "--port", str(replica.port),
                    "--http", protocol, "--no-access-log",
                ],
                log_path=log_path,
                env=processes.venv_env(
                    {"PYTHONPATH": str(REPO_ROOT), "ANSWER": replica.address,
                     "DIE_AFTER_HEADERS": "1" if dying else "0"}
                ),
            )  # fmt: skip
            processes.wait_until(
                lambda r=replica: processes.port_in_use(r.address, r.port),
                timeout=START_TIMEOUT_S,
                proc=replica.proc,
                what=f"uvicorn on {replica.url}",
                log_path=log_path,
            )
            replica.ready = True
        slot.version, slot.routed = "1", True
        health.start()
        door.start()
        assert slot.wait_seen(healthy=True, timeout=START_TIMEOUT_S), "replicas never probed"
        yield door, slot
    finally:
        door.stop()
        health.close()
        for replica in slot.replicas:
            if replica.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(replica.proc.pid, signal.SIGCONT)
                processes.stop_group(replica.proc.pid)


def answers_with_one_replica_dying_mid_answer(
    protocol: str, tmp_path: Path, timings: FrontDoorTimings | None = None
) -> list:
    """Two replicas behind the front door, one dies after its headers: every client's outcome."""
    options = {"timings": timings} if timings else {}
    with front_door(tmp_path, dies=(True, False), protocol=protocol, **options) as (door, slot):
        dying = slot.replicas[0]
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
                if outcomes[-1][0] != 200 or not dying.alive():
                    break  # the death is what is watched, not what follows it
        assert dying.proc.wait(timeout=30) == -9, "the dying replica never got a request"
        return outcomes


def test_without_resend_dropped_a_replica_dying_after_its_headers_fails_its_request_cleanly(
    tmp_path,
):
    """The request a replica died under is not sent on (it may be what killed it): a clean 502."""
    timings = FrontDoorTimings(first_byte_timeout=FIRST_BYTE_S, resend_dropped=False)
    outcomes = answers_with_one_replica_dying_mid_answer(PROTOCOL, tmp_path, timings)

    failed = [outcome for outcome in outcomes if outcome[0] != 200]
    answered = [outcome for outcome in outcomes if outcome[0] == 200]
    assert [(status, by) for status, by, _ in failed] == [(502, None)], outcomes
    assert b'"error_code": "MODEL_SERVER_FAILED"' in failed[0][2]
    healthy_address = {address for _, address, _ in answered}
    assert all(body == BODY for _, _, body in answered), outcomes
    assert len(healthy_address) <= 1, f"answers from {healthy_address}: only the sibling answers"


def test_a_replica_dying_after_its_headers_reaches_no_client_as_a_broken_answer(tmp_path):
    outcomes = answers_with_one_replica_dying_mid_answer(PROTOCOL, tmp_path)

    healthy_address = {address for _, address, _ in outcomes}
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


def post_from_threads(url: str, clients: int, each: int) -> list:
    """``clients`` keep-alive clients posting ``each`` requests: every (status, answerer)."""
    outcomes: list = []

    def post() -> None:
        with requests.Session() as session:
            for _ in range(each):
                try:
                    answer = session.post(url + "/invocations", json={"x": 1}, timeout=60)
                    outcomes.append((answer.status_code, answer.headers.get("X-Answered-By")))
                except requests.RequestException as exc:
                    outcomes.append((type(exc).__name__, None))

    threads = [threading.Thread(target=post) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return outcomes


def test_requests_on_a_hung_replica_are_answered_by_its_sibling_after_the_first_byte_timeout(
    tmp_path,
):
    # No controller here: the hung replica stays in the rotation, so requests keep
    # reaching it, and every one of them must time out and be answered elsewhere.
    with front_door(tmp_path) as (door, slot):
        hung, sibling = slot.replicas
        os.killpg(hung.proc.pid, signal.SIGSTOP)

        outcomes = post_from_threads(door.url, clients=3, each=10)

    assert len(outcomes) == 30
    assert all(outcome == (200, sibling.address) for outcome in outcomes), outcomes


def test_a_timed_out_request_is_resent_once_so_with_every_replica_hung_it_gets_a_json_504(
    tmp_path,
):
    with front_door(tmp_path) as (door, slot):
        for replica in slot.replicas:
            os.killpg(replica.proc.pid, signal.SIGSTOP)

        answer = requests.post(door.url + "/invocations", json={"x": 1}, timeout=60)

    assert answer.status_code == 504
    assert answer.json()["error_code"] == "MODEL_SERVER_FAILED"


def test_only_invocations_and_ping_are_routed_the_rest_is_a_json_404(tmp_path):
    with front_door(tmp_path) as (door, _):
        ping = requests.get(door.url + "/ping", timeout=30)
        others = {
            path: requests.get(door.url + path, timeout=30)
            for path in ("/version", "/health", "/", "/invocations/../version", "/metrics")
        }

    assert ping.status_code == 200
    for path, answer in others.items():
        assert answer.status_code == 404, path
        assert answer.headers["Content-Type"] == "application/json", path
        assert answer.json()["error_code"] == "ENDPOINT_NOT_FOUND", path


def test_access_logs_are_off_by_default_and_caddys_own_log_is_a_file(tmp_path):
    with front_door(tmp_path) as (door, _):
        post_from_threads(door.url, clients=1, each=5)
        directory = door.directory

    assert not (directory / ACCESS_LOG_FILE).exists()
    assert "/invocations" not in door.log_path.read_text()
    assert door.log_path.stat().st_size > 0  # Caddy's start-up lines land in the rolled file


def test_the_access_log_option_writes_one_line_per_request(tmp_path):
    with front_door(tmp_path, access_log=True) as (door, _):
        post_from_threads(door.url, clients=1, each=5)
        access = door.directory / ACCESS_LOG_FILE

    assert access.read_text().count('"uri":"/invocations"') == 5


def test_an_idle_connection_to_the_health_port_is_closed_after_the_handler_timeout():
    (slot,), health_port = make_slots(replicas=1, count=1)
    health = HealthServer([slot], health_port, idle_timeout=0.5)
    health.start()
    try:
        with socket.create_connection((slot.replicas[0].address, health_port), timeout=30) as sock:
            # Blocks until the server closes it; socket.timeout (a failure) after 30 s.
            closed = sock.recv(1) == b""
    finally:
        health.close()

    assert closed, "the health server kept an idle connection open"
