"""The embedded tracking server: start, reuse, refuse a taken port, stop leaving nothing."""

import socket
import sqlite3

import pytest

from stageflow import processes, server
from stageflow.errors import UsageError

pytestmark = pytest.mark.slow


def test_start_reuse_and_stop_leave_nothing_behind(tmp_path):
    port = processes.free_port()
    info = server.start(port=port, home=tmp_path, tie_to_parent=True)
    try:
        assert not info.reused
        assert info.host == "127.0.0.1"
        assert processes.http_ok(f"{info.uri}/health")
        # WAL is recorded in the database file itself.
        with sqlite3.connect(tmp_path / "mlflow.db") as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

        again = server.start(port=port, home=tmp_path)
        assert again.reused
        assert again.pid == info.pid
        with pytest.raises(UsageError, match="already runs from"):
            server.start(port=processes.free_port(), home=tmp_path)
    finally:
        stopped = server.stop(tmp_path)
    assert stopped is not None
    assert stopped.pid == info.pid
    assert not processes.group_alive(info.pid)
    assert not processes.port_in_use("127.0.0.1", port)
    assert server.read_state(tmp_path) is None
    assert server.stop(tmp_path) is None


def test_a_port_taken_by_another_program_is_refused(tmp_path):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(UsageError, match=f"port {port} on 127.0.0.1 is already in use"):
            server.start(port=port, home=tmp_path)
    assert server.read_state(tmp_path) is None
