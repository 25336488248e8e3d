"""A tracking server a team can share: authentication, public binds, hosts, and secrets."""

import json
import os
import stat

import pytest
import requests

from stageflow import processes, server, tracking
from stageflow.errors import StageflowError, UsageError
from tests.helpers import in_process, stageflow_cli

ADMIN_PASSWORD = "a-long-admin-password"
PROBE = tracking.API_PROBE


def test_a_public_bind_without_auth_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(UsageError, match="--auth") as refused:
        server.start(port=processes.free_port(), host="0.0.0.0", home=tmp_path)
    assert refused.value.exit_code == 2
    assert not (tmp_path / server.STATE_FILE).exists()


def test_auth_without_the_admin_password_is_refused_with_exit_2(tmp_path, monkeypatch):
    monkeypatch.delenv(server.ADMIN_PASSWORD_ENV, raising=False)
    env = os.environ | {"STAGEFLOW_HOME": str(tmp_path)}
    answer = stageflow_cli(
        "server", "start", "--auth", "--port", str(processes.free_port()), env=env
    )
    assert answer.returncode == 2
    assert server.ADMIN_PASSWORD_ENV in answer.stderr
    assert len(answer.stderr.strip().splitlines()) == 1
    monkeypatch.setenv(server.ADMIN_PASSWORD_ENV, "short")
    with pytest.raises(UsageError, match="at least 12 characters"):
        server.start(port=processes.free_port(), home=tmp_path, auth=True)


def test_a_loopback_host_needs_no_auth_and_a_host_name_is_not_loopback():
    assert server.is_loopback("127.0.0.1")
    assert server.is_loopback("::1")
    assert server.is_loopback("localhost")
    assert not server.is_loopback("0.0.0.0")
    assert not server.is_loopback("tracking.internal")


@pytest.mark.slow
def test_with_auth_a_call_without_credentials_is_answered_401_and_commands_work_with_them(
    tmp_path, monkeypatch, untimed_policy, capsys
):
    def stageflow(*args, env):
        return in_process(capsys, *args, env=env)

    monkeypatch.setenv(server.ADMIN_PASSWORD_ENV, ADMIN_PASSWORD)
    info = server.start(port=processes.free_port(), home=tmp_path, auth=True, tie_to_parent=True)
    try:
        assert requests.get(info.uri + PROBE, timeout=10).status_code == 401
        assert (
            requests.get(info.uri + PROBE, auth=("admin", "wrong-password"), timeout=10).status_code
            == 401
        )
        # No secret in the server's command line, files or state.
        cmdline = " ".join(processes_cmdline(info.pid))
        assert ADMIN_PASSWORD not in cmdline
        for path in tmp_path.rglob("*"):
            if path.is_file() and path.suffix in (".json", ".ini", ".log", ".key"):
                assert ADMIN_PASSWORD not in path.read_text(errors="replace"), path

        # The commands run in this interpreter, each with its user's variables (the
        # server and its auth are the real ones; the command line is test_cli.py's).
        base = {
            "MLFLOW_TRACKING_URI": info.uri,
            "MLFLOW_TRACKING_USERNAME": None,
            "MLFLOW_TRACKING_PASSWORD": None,
        }
        refused = stageflow("status", "--model", "anything", env=base)
        assert refused.returncode == 1
        assert "MLFLOW_TRACKING_USERNAME" in refused.stderr
        assert "Traceback" not in refused.stderr

        creds = base | {
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD,
        }
        trained = stageflow(
            "train", "--data", "builtin:wine", "--target", "target", "--family", "lr",
            "--model-name", "team-wine", "--json", env=creds,
        )  # fmt: skip
        assert trained.returncode == 0, trained.stderr
        assert json.loads(trained.stdout)["version"] == "1"
        # Promotion speed is not this test's subject (tests/helpers.py, UNTIMED_LATENCY_YAML).
        for command in (
            ("policy", "set", "--model", "team-wine", "--file", str(untimed_policy)),
            ("status", "--model", "team-wine", "--json"),
        ):
            answer = stageflow(*command, env=creds)
            assert answer.returncode == 0, (command, answer.stderr)

        # Roles: two promoters take turns through the registry lock; a reader reads only.
        def user(name, role):
            made = stageflow(
                "server", "user", "add", name, "--role", role, "--model", "team-wine",
                env=creds | {"STAGEFLOW_USER_PASSWORD": f"{name}-password-long"},
            )  # fmt: skip
            assert made.returncode == 0, made.stderr
            return base | {
                "MLFLOW_TRACKING_USERNAME": name,
                "MLFLOW_TRACKING_PASSWORD": f"{name}-password-long",
            }

        alice, bob, carol = (
            user("alice", "promoter"),
            user("bob", "promoter"),
            user("carol", "reader"),
        )
        staged = stageflow(
            "promote", "--model", "team-wine", "--version", "1", "--to", "Staging", env=alice
        )
        assert staged.returncode == 0, staged.stderr
        refused = stageflow(
            "promote", "--model", "team-wine", "--version", "1", "--to", "Production", env=carol
        )
        assert refused.returncode == 1
        assert "server user add" in refused.stderr  # names the fix, whichever call said no
        assert len(refused.stderr.strip().splitlines()) == 1
        promoted = stageflow(
            "promote", "--model", "team-wine", "--version", "1", "--to", "Production", env=bob
        )
        assert promoted.returncode == 0, promoted.stderr
        seen = stageflow("status", "--model", "team-wine", "--json", env=carol)
        assert seen.returncode == 0, seen.stderr
        assert json.loads(seen.stdout)["production"] == "1"
        assert json.loads(seen.stdout)["problems"] == []
        history = stageflow("history", "--model", "team-wine", "--json", env=carol)
        assert [e["to_stage"] for e in json.loads(history.stdout)["entries"]] == [
            "Staging",
            "Production",
        ]
    finally:
        server.stop(tmp_path)
    assert not processes.group_alive(info.pid)


@pytest.mark.slow
def test_a_host_outside_allowed_hosts_is_named_by_the_reachability_check(tmp_path):
    info = server.start(
        port=processes.free_port(),
        home=tmp_path,
        allowed_hosts="tracking.internal:5000",
        tie_to_parent=True,
    )
    try:
        # /health answers whatever the Host; the check must not stop there.
        assert requests.get(info.uri + "/health", timeout=10).status_code == 200
        with pytest.raises(StageflowError, match="--allowed-hosts"):
            tracking.require_server(info.uri)
    finally:
        server.stop(tmp_path)


@pytest.mark.slow
def test_a_password_in_the_backend_uri_stays_out_of_argv_and_files(tmp_path, postgres_database):
    user, rest = postgres_database.split("://", 1)[1].split("@", 1)
    secret = "pw-never-written-anywhere"
    uri = f"postgresql://{user}:{secret}@{rest}"
    info = server.start(
        port=processes.free_port(), home=tmp_path, backend_store_uri=uri, tie_to_parent=True
    )
    try:
        assert secret not in " ".join(processes_cmdline(info.pid))
        state = (tmp_path / server.STATE_FILE).read_text()
        assert secret not in state
        assert "***" in json.loads(state)["backend_store_uri"]
        assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / server.STATE_FILE).stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / server.LOG_FILE).stat().st_mode) == 0o600
        assert secret not in (tmp_path / server.LOG_FILE).read_text(errors="replace")
    finally:
        server.stop(tmp_path)


def processes_cmdline(pid: int) -> list[str]:
    """The command lines of ``pid`` and every process in its group (the server's children)."""
    import psutil

    lines = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getpgid(proc.pid) == pid:
                lines.extend(proc.info["cmdline"] or [])
        except (ProcessLookupError, PermissionError):
            continue
    return lines
