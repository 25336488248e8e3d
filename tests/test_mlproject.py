"""`mlflow run` executes the same functions as the CLI."""

import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

import registry
from stageflow import processes

ROOT = Path(__file__).resolve().parents[1]


def mlflow_run(entry_point: str, tracking_uri: str, **params: str) -> None:
    """``mlflow run . -e ENTRY --env-manager local -P k=v ...``, which must exit 0."""
    args = [processes.bin_path("mlflow"), "run", str(ROOT), "-e", entry_point]
    args += ["--env-manager", "local"]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        env=processes.venv_env({"MLFLOW_TRACKING_URI": tracking_uri}),
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]


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


@pytest.mark.slow
def test_mlflow_run_train_trains_and_registers_in_the_run_mlflow_created(tracking_uri, model_name):
    mlflow_run(
        "train",
        tracking_uri,
        data="builtin:iris",
        target="target",
        model_name=model_name,
        family="lr",
    )
    client = MlflowClient(tracking_uri)
    version = client.get_model_version(model_name, "1")
    run = client.get_run(version.run_id)
    # The project run itself holds the training: one run, not a nested second one.
    assert run.data.tags.get("mlflow.project.entryPoint") == "train"
    assert run.data.params["family"] == "lr"
    assert "test_accuracy" in run.data.metrics


@pytest.mark.slow
def test_mlflow_run_rollback_without_a_target_uses_the_ledger(
    tracking_uri, register_versions, model_name
):
    register_versions(model_name)
    for version in ("1", "2"):
        registry.promote(model_name, version, "Staging")
        registry.promote(model_name, version, "Production")
    mlflow_run("rollback", tracking_uri, model=model_name, reason="from mlflow run")
    assert registry.status(model_name).production == "1"
    assert registry.history(model_name)[-1].reason == "from mlflow run"
