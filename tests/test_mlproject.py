"""`mlflow run` executes the same functions as the CLI, with any value a user may pass."""

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from mlflow import MlflowClient

import registry
from stageflow import manifest, processes, tracking
from tests.experiments.test_tune import trial_runs

ROOT = Path(__file__).resolve().parents[1]
SERVE_TIMEOUT_S = 180.0


def mlflow_run_args(entry_point: str, **params: str) -> list[str]:
    args = [processes.bin_path("mlflow"), "run", str(ROOT), "-e", entry_point]
    args += ["--env-manager", "local"]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    return args


def mlflow_run(entry_point: str, tracking_uri: str, env: dict | None = None, **params: str):
    """``mlflow run . -e ENTRY --env-manager local -P k=v ...``, which must exit 0."""
    result = subprocess.run(
        mlflow_run_args(entry_point, **params),
        capture_output=True,
        text=True,
        env=processes.venv_env({"MLFLOW_TRACKING_URI": tracking_uri, **(env or {})}),
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_every_documented_entry_point_exists():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert set(project["entry_points"]) >= {
        "main",
        "train",
        "promote",
        "rollback",
        "serve",
        "score",
    }
    for name, entry in project["entry_points"].items():
        assert entry["command"].startswith("python -m stageflow "), name


# Values that need shell quoting: spaces, quotes, Korean (issue 10).
TARGET = "이탈 여부"


@pytest.fixture(scope="module")
def quoted(tracking_server, tmp_path_factory):
    """A CSV under a folder whose name needs quoting, with a target that does too."""
    folder = tmp_path_factory.mktemp("mlflow-run") / "it's 고객 data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = 300
    frame = pd.DataFrame({"나이": rng.integers(20, 80, rows).astype(float)})
    frame["지역 이름"] = rng.choice(["서울", "부산"], rows)
    frame[TARGET] = ((frame["나이"] > 50) ^ (rng.random(rows) < 0.1)).astype(int)
    data = folder / "고객 목록.csv"
    frame.to_csv(data, index=False)
    return {"data": str(data), "folder": folder, "rows": frame.drop(columns=[TARGET])}


@pytest.fixture(scope="module")
def trained(tracking_server, quoted, untimed_policy):
    """Version 1 by `mlflow run -e train`, 2 by `-e tune` (2 workers), 3 the same model as 1.

    Version 3 is version 1's model registered once more (same files, same training run,
    so the same held-out split and predictions), as training it again by `mlflow run -e
    train` would give, without a third project run. The untimed policy keeps the
    gates' latency budget out of it (no machine is too slow).
    """
    name = f"churn-{uuid.uuid4().hex[:6]}"
    uri = tracking_server.uri
    params = {"data": quoted["data"], "target": TARGET, "model_name": name}
    mlflow_run("train", uri, family="lr", **params)
    home = {"STAGEFLOW_HOME": str(quoted["folder"] / "home")}
    study = "it's a study 연구"
    mlflow_run(
        "tune", uri, env=home, n_trials="2", workers="2", families="lr", study_name=study, **params
    )
    client = tracking.client(uri)
    first = client.get_model_version(name, "1")
    tags = {key: first.tags[key] for key in ("stageflow.task", "stageflow.family")}
    logged_model = first.source.removeprefix("models:/")  # as mlflow.register_model reads it
    third = client.create_model_version(
        name, first.source, run_id=first.run_id, tags=tags, model_id=logged_model
    )
    assert (third.version, third.run_id) == ("3", first.run_id), third
    manifest.record(client, name, "3")  # as `train` records one on registering
    registry.set_policy(name, untimed_policy, uri)
    return name


@pytest.mark.slow
@pytest.mark.xdist_group("mlproject-quoted")  # `trained` is built once, on one worker
def test_mlflow_run_train_with_values_needing_quotes_logs_them_once(tracking_uri, quoted, trained):
    client = MlflowClient(tracking_uri)
    run = client.get_run(client.get_model_version(trained, "1").run_id)
    # The project run itself holds the training: one run, not a nested second one.
    assert run.data.tags["mlflow.project.entryPoint"] == "train"
    # The runner's record stands (shell-quoted); Stageflow's reader gives the plain values.
    assert run.data.params["target"] != TARGET
    plain = tracking.plain_params(run)
    assert plain["target"] == TARGET
    assert plain["data"] == quoted["data"]
    assert plain["family"] == "lr"
    assert "test_accuracy" in run.data.metrics


@pytest.mark.slow
@pytest.mark.xdist_group("mlproject-quoted")  # `trained` is built once, on one worker
def test_mlflow_run_tune_with_values_needing_quotes_logs_the_study(tracking_uri, quoted, trained):
    client = MlflowClient(tracking_uri)
    parent = client.get_run(client.get_model_version(trained, "2").run_id)
    # The run MLflow created is the study's run, and both workers' trials nest under it.
    assert parent.data.tags["mlflow.project.entryPoint"] == "tune"
    assert parent.data.tags["stageflow.kind"] == "tune"
    assert parent.info.status == "FINISHED"
    assert len(trial_runs(client, parent.info.run_id)) == 2
    plain = tracking.plain_params(parent)
    assert (plain["target"], plain["data"]) == (TARGET, quoted["data"])
    assert plain["study.name"] == "it's a study 연구"
    assert plain["study_name"] == "it's a study 연구"  # the runner's own key, unquoted
    assert plain["family"] == "lr"


@pytest.mark.slow
@pytest.mark.xdist_group("mlproject-quoted")  # `trained` is built once, on one worker
def test_mlflow_run_promote_score_rollback_and_serve_take_quoted_values(
    tracking_uri, quoted, trained, tmp_path
):
    reason = 'it\'s "ready" — 검증 완료'
    # Setup, in-process through the same gates: 1 into Production, 3 into Staging. The
    # setup's reason differs, so the ledger's last reason can only be the runner's.
    for version, stage in (("1", "Staging"), ("1", "Production"), ("3", "Staging")):
        registry.promote(trained, version, stage, "setup", tracking_uri)
    assert registry.status(trained).production == "1"
    # 3 predicts exactly as 1 does, so the champion comparison lets it replace 1.
    mlflow_run("promote", tracking_uri, model=trained, version="3", to="Production", reason=reason)
    assert registry.status(trained).production == "3"
    assert registry.history(trained)[-1].reason == reason

    source = quoted["folder"] / "점수 매길 it's.csv"
    output = tmp_path / "결과 it's.csv"
    quoted["rows"].head(20).to_csv(source, index=False)
    mlflow_run("score", tracking_uri, model=trained, input=str(source), output=str(output))
    assert pd.read_csv(output)["model_version"].eq(3).all()

    # No --to: the ledger names the version to go back to.
    mlflow_run("rollback", tracking_uri, model=trained, reason=reason)
    assert registry.status(trained).production == "1"
    assert registry.history(trained)[-1].reason == reason

    port = processes.free_port()
    serving = subprocess.Popen(
        mlflow_run_args("serve", model=trained, port=str(port)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=processes.venv_env(
            {"MLFLOW_TRACKING_URI": tracking_uri, "STAGEFLOW_HOME": str(tmp_path / "home")}
        ),
        cwd=ROOT,
        start_new_session=True,
    )
    rows = quoted["rows"].head(2)
    body = {"dataframe_split": {"columns": list(rows.columns), "data": rows.values.tolist()}}
    try:
        answer, deadline = None, time.monotonic() + SERVE_TIMEOUT_S
        while time.monotonic() < deadline and serving.poll() is None:
            try:
                answer = requests.post(
                    f"http://127.0.0.1:{port}/invocations", json=body, timeout=10
                )
                if answer.status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        assert serving.poll() is None, "mlflow run -e serve exited"
        assert answer is not None, "the front door never answered"
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Model-Version"] == "1"
        assert len(answer.json()["predictions"]) == 2
    finally:
        os.killpg(serving.pid, signal.SIGTERM)
        try:
            serving.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serving.pid, signal.SIGKILL)
            serving.wait()
