"""`make demo` runs `stageflow demo`: the story completes, and it leaves nothing running."""

import json
import signal
import subprocess
import sys

import pytest

from stageflow import processes
from tests.helpers import processes_mentioning

pytestmark = pytest.mark.slow

# The demo waits up to 300 s for each of three switches, and trains first, on a busy machine.
DEMO_TIMEOUT_S = 1800


@pytest.mark.timeout(DEMO_TIMEOUT_S + 60)
def test_the_demo_tells_the_whole_story_and_cleans_up(tmp_path):
    home = tmp_path / "home"
    tracking_port, serve_port = processes.free_port(), processes.free_port()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stageflow",
            "demo",
            "--port",
            str(tracking_port),
            "--serve-port",
            str(serve_port),
        ],
        capture_output=True,
        text=True,
        env=processes.venv_env({"STAGEFLOW_HOME": str(home)}),
        timeout=DEMO_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for step in (
        "started mlflow server",
        "version 1 (lr)",
        "version 2 (hgb)",
        "→ Production",
        "→ X-Model-Version:",
        "X-Model-Version is now",
        "is Production again",
        "rows in",
        "rollback",
        f"open http://127.0.0.1:{tracking_port} for the MLflow UI",
    ):
        assert step in out, f"{step!r} missing from the demo's output:\n{out}"
    assert (home / "demo" / "batch-scored.csv").exists()
    assert not processes.port_in_use("127.0.0.1", tracking_port)
    assert not processes.port_in_use("127.0.0.1", serve_port)
    assert processes_mentioning(str(home)) == []


def test_a_demo_stopped_by_sigterm_stops_the_servers_it_started(tmp_path):
    home = tmp_path / "home"
    tracking_port, serve_port = processes.free_port(), processes.free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "stageflow", "demo", "--port", str(tracking_port),
         "--serve-port", str(serve_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=processes.venv_env({"STAGEFLOW_HOME": str(home)}),
        start_new_session=True,
    )  # fmt: skip
    try:
        processes.wait_until(
            lambda: (home / "server.json").exists(), timeout=300, proc=demo, what="the demo"
        )
        server_pid = json.loads((home / "server.json").read_text())["pid"]
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=120) == 130, demo.stderr.read().decode()[-2000:]
    finally:
        if demo.poll() is None:
            processes.stop_group(demo.pid)
    assert not processes.group_alive(server_pid)
    assert not processes.port_in_use("127.0.0.1", tracking_port)
