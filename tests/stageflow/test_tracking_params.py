"""Params logged beside `mlflow run`'s own record of them (issue 10), on a real SQLite store."""

import shlex

import mlflow
import pytest
from mlflow import MlflowClient

from stageflow import tracking

# A fresh MLflow SQLite store migrates for many seconds: not the fast tier.
pytestmark = pytest.mark.slow


@pytest.fixture
def project_run(tmp_path, monkeypatch):
    """A run as `mlflow run` leaves it: entry point tag, params shell-quoted, then resumed."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("project")
    run = client.create_run(experiment, tags={tracking.PROJECT_ENTRY_POINT_TAG: "train"})
    for key, value in {"target": "이탈 여부", "data": "it's.csv", "seed": "42"}.items():
        client.log_param(run.info.run_id, key, shlex.quote(value))
    client.log_param(run.info.run_id, "input", "in.csv")
    # As the runner leaves them: the run and its experiment in the environment. The fluent
    # API's active experiment (another test's, in this worker) is put back afterwards.
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    yield client, run.info.run_id
    mlflow.end_run()


def test_keys_the_runner_logged_quoted_are_kept_and_read_back_plain(project_run):
    client, run_id = project_run
    with mlflow.start_run():
        tracking.log_params({"target": "이탈 여부", "data": "it's.csv", "seed": 42, "n": 7})
        tracking.log_params({"family": "lr", "input": "/abs/in.csv"})
    run = client.get_run(run_id)
    assert run.data.params["target"] == "'이탈 여부'"  # the runner's record stands
    assert tracking.plain_params(run) == {
        "target": "이탈 여부",
        "data": "it's.csv",
        "seed": "42",
        "n": "7",
        "family": "lr",
        "input": "/abs/in.csv",  # a value of ours that is no quoting of the runner's
    }


def test_outside_mlflow_run_params_are_logged_as_they_are(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("plain")
    with mlflow.start_run() as run:
        tracking.log_params({"target": "이탈 여부"})
    logged = MlflowClient().get_run(run.info.run_id)
    assert logged.data.params == {"target": "이탈 여부"}
    assert tracking.plain_params(logged) == {"target": "이탈 여부"}
