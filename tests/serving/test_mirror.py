"""The shadow mirror's bounds without a model server: its queue, its target, its counts."""

from __future__ import annotations

import socket
import time

from serving._mirror import Mirror, publish


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_nothing_is_queued_or_counted_while_no_shadow_is_warm(tmp_path):
    mirror = Mirror(tmp_path / "shadow.json", version="1").start()
    assert not mirror.offer(b"{}", "application/json", "r-1")
    assert mirror.stats()["dropped"] == 0


def test_a_replica_never_mirrors_to_its_own_version(tmp_path):
    target = tmp_path / "shadow.json"
    publish(target, "1", ["http://127.0.0.1:9"])
    mirror = Mirror(target, version="1").start()
    time.sleep(1.5)  # past one look at the target
    assert mirror.shadow_version is None


def test_past_its_queue_requests_are_dropped_and_counted_and_a_dead_shadow_counts_failures(
    tmp_path,
):
    target = tmp_path / "shadow.json"
    publish(target, "2", [f"http://127.0.0.1:{closed_port()}"])
    mirror = Mirror(target, version="1", queue_requests=3)
    mirror._refresh_target()  # as the sender does first; not started, so nothing drains
    offered = [mirror.offer(b"{}", "application/json", f"r-{i}") for i in range(5)]
    assert offered == [True, True, True, False, False]
    assert mirror.stats()["dropped"] == 2
    mirror.start()
    assert wait_for(lambda: mirror.stats()["failed"] == 3)  # connection refused, each counted
    assert mirror.stats()["mirrored"] == 0


def test_a_new_target_is_followed_and_an_empty_one_stops_mirroring(tmp_path):
    target = tmp_path / "shadow.json"
    mirror = Mirror(target, version="1").start()
    publish(target, "2", ["http://127.0.0.1:9"])
    assert wait_for(lambda: mirror.shadow_version == "2")
    publish(target, None, [])
    assert wait_for(lambda: mirror.shadow_version is None)
