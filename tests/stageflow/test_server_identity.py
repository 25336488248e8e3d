"""`server stop` with a stale server.json: it signals only the process it started (issue 11)."""

import json
import subprocess
from dataclasses import asdict

import pytest

from stageflow import processes, server


@pytest.fixture
def bystander():
    """An unrelated process in its own session, standing in for one that reused the pid."""
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait(timeout=10)


def write_state(home, pid: int, **fields) -> None:
    info = server.ServerInfo(
        pid=pid,
        host="127.0.0.1",
        port=5999,
        backend_store_uri=f"sqlite:///{home / 'mlflow.db'}",
        artifacts_destination=str(home / "artifacts"),
        log=str(home / "server.log"),
        **fields,
    )
    document = asdict(info)
    if "started" not in fields:
        del document["started"]  # as files written before start times were recorded
    (home / server.STATE_FILE).write_text(json.dumps(document))


def test_a_reused_pid_with_another_start_time_is_not_signalled(tmp_path, bystander):
    started = processes.started_at(bystander.pid)
    write_state(tmp_path, bystander.pid, started=started - 3600)  # the server's, long gone

    stopped = server.stop(tmp_path)

    assert stopped.stale
    assert bystander.poll() is None  # still running: nothing was signalled
    assert server.read_state(tmp_path) is None  # the stale file is gone


def test_an_old_file_without_a_start_time_spares_a_process_that_is_not_mlflow(tmp_path, bystander):
    write_state(tmp_path, bystander.pid)
    assert server.read_state(tmp_path).started is None

    assert server.stop(tmp_path).stale
    assert bystander.poll() is None


def test_the_recorded_process_itself_is_stopped(tmp_path, bystander):
    write_state(tmp_path, bystander.pid, started=processes.started_at(bystander.pid))

    stopped = server.stop(tmp_path)

    assert not stopped.stale
    bystander.wait(timeout=30)  # (stop_group reaps its own child: no exit code to read)
    assert not processes.group_alive(bystander.pid)
    assert server.read_state(tmp_path) is None


def test_a_start_time_names_one_process():
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        started = processes.started_at(proc.pid)
        assert processes.is_process(proc.pid, started)
        assert not processes.is_process(proc.pid, started + 1)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert processes.started_at(proc.pid) is None
    assert not processes.is_process(proc.pid, started)
