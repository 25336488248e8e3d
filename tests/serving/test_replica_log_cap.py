"""A model server's log is capped in place while the server keeps appending to it."""

from __future__ import annotations

import subprocess
import sys
import time

from serving._supervisor import cap_log


def test_a_log_over_its_cap_is_copied_aside_and_emptied_and_the_writer_appends_on(tmp_path):
    log = tmp_path / "replica.log"
    echo = "import sys\nfor line in sys.stdin: print(line, end='', flush=True)"
    with log.open("ab") as out:  # as processes.spawn opens it: append mode
        writer = subprocess.Popen(
            [sys.executable, "-c", echo], stdin=subprocess.PIPE, stdout=out, text=True
        )
    try:
        writer.stdin.write("x" * 2000 + "\n")
        writer.stdin.flush()
        deadline = time.monotonic() + 30
        while log.stat().st_size < 2000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cap_log(log, max_bytes=1000)
        writer.stdin.write("after the cap\n")
        writer.stdin.close()
        writer.wait(timeout=30)
    finally:
        writer.kill()

    assert (tmp_path / "replica.log.1").read_text() == "x" * 2000 + "\n"
    assert log.read_text() == "after the cap\n"  # at the start of the emptied file, no hole


def test_a_log_under_its_cap_is_left_alone(tmp_path):
    log = tmp_path / "replica.log"
    log.write_text("short\n")

    assert not cap_log(log, max_bytes=1000)
    assert log.read_text() == "short\n"
    assert not (tmp_path / "replica.log.1").exists()
