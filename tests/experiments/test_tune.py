"""Tuning against a real tracking server: nested trial runs, workers, storages, resume, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow import MlflowClient

from experiments.tune import tune
from tests.helpers import in_process

pytestmark = pytest.mark.slow

FAST = {"families": ("lr",), "folds": 3}


def trial_runs(client: MlflowClient, parent_run_id: str):
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        max_results=1000,
    )


def children_of(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(proc.name))
            except (OSError, ValueError):
                continue
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def run_cli(*args, env_extra=None, timeout=180):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "stageflow", "tune", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def study_of_slow_trials(storage: str, name: str, n_trials: int) -> None:
    """A study whose next trials take about a second each (random forests of 200 trees).

    The second worker is a fresh interpreter that needs seconds to import; with trials
    this slow it is sure to claim some of them, so the test exercises two writers.
    """
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    for _ in range(n_trials):
        study.enqueue_trial(
            {
                "family": "rf",
                "rf.n_estimators": 200,
                "rf.max_depth": 16,
                "rf.min_samples_leaf": 1,
                "rf.max_features": "sqrt",
            }
        )


def assert_every_trial_once(study: optuna.Study, runs, n_trials: int):
    numbers = sorted(t.number for t in study.trials)
    assert numbers == list(range(n_trials))
    assert all(t.state.is_finished() for t in study.trials)
    logged = sorted(int(r.data.tags["optuna.trial.number"]) for r in runs)
    assert logged == numbers  # none lost, none twice
    assert sorted(r.info.run_name for r in runs) == sorted(f"trial-{n}" for n in numbers)


def test_every_trial_is_a_run_nested_under_the_study_run_and_the_best_is_registered(
    tracking_uri, model_name, tmp_path
):
    result = tune(
        "builtin:wine",
        "target",
        4,
        model_name=model_name,
        storage=f"sqlite:///{tmp_path / 'studies.db'}",
        families=("lr", "rf"),
    )

    client = MlflowClient(tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["stageflow.kind"] == "tune"
    assert parent.data.params["study.name"] == result.study_name
    assert parent.data.params["family"] == result.best_params["family"]
    assert parent.data.metrics["best_cv_accuracy"] == pytest.approx(result.best_value)
    assert {"test_accuracy", "val_accuracy", "train_accuracy"} <= set(parent.data.metrics)
    tuning = {f.path for f in client.list_artifacts(result.parent_run_id, "tuning")}
    assert {"tuning/optimization_history.png", "tuning/trials.csv"} <= tuning
    assert "tuning/slice.png" in tuning
    plots = {f.path for f in client.list_artifacts(result.parent_run_id, "plots")}
    assert "plots/confusion_matrix.png" in plots  # the same artifacts as a trained run

    runs = trial_runs(client, result.parent_run_id)
    assert len(runs) == 4
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert run.info.run_name == f"trial-{run.data.tags['optuna.trial.number']}"
        assert run.info.status in {"FINISHED", "KILLED"}
        assert run.data.tags["optuna.trial.state"] in {"COMPLETE", "PRUNED"}
        assert run.data.params["family"] in {"lr", "rf"}
        assert {"cv_accuracy_mean", "cv_accuracy_std", "cv_f1_mean"} <= set(run.data.metrics)

    assert set(result.to_json()) >= {
        "parent_run_id",
        "best_trial",
        "best_value",
        "model_name",
        "version",
    }
    version = client.get_model_version(model_name, result.version)
    assert version.run_id == result.parent_run_id
    assert version.tags["stageflow.kind"] == "tune"
    model = mlflow.pyfunc.load_model(f"models:/{model_name}/{result.version}")
    # The guarded model train registers too: the refit pipeline (skops) behind its contract.
    assert model.metadata.flavors["python_function"]["artifacts"]["pipeline"]["path"].endswith(
        ".skops"
    )
    assert model.unwrap_python_model().contract["task"] == "classification"
    assert len(model.predict(model.input_example)) == len(model.input_example)


def test_a_pruned_trial_is_recorded_as_pruned_and_resuming_adds_trials(
    tracking_uri, model_name, tmp_path
):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(study_name="resumable", storage=storage, direction="maximize")
    for _ in range(5):  # the median pruner's five trials to compare with
        study.enqueue_trial({"family": "lr", "lr.C": 1.0})
    study.enqueue_trial({"family": "lr", "lr.C": 1e-4})  # predicts the majority class only

    first = tune(
        "builtin:breast_cancer",
        "target",
        6,
        model_name=model_name,
        storage=storage,
        study_name="resumable",
        **FAST,
    )
    second = tune(
        "builtin:breast_cancer",
        "target",
        2,
        model_name=model_name,
        storage=storage,
        study_name="resumable",
        **FAST,
    )

    client = MlflowClient(tracking_uri)
    (pruned,) = [r for r in trial_runs(client, first.parent_run_id) if r.info.run_name == "trial-5"]
    assert pruned.data.tags["optuna.trial.state"] == "PRUNED"
    assert pruned.info.status == "KILLED"
    assert pruned.data.metrics["cv_accuracy_mean"] < 0.8  # the folds it did run
    assert first.trials == {"complete": 5, "pruned": 1, "failed": 0, "added": 6}

    study = optuna.load_study(study_name="resumable", storage=storage)
    assert_every_trial_once(
        study,
        trial_runs(client, first.parent_run_id) + trial_runs(client, second.parent_run_id),
        8,
    )
    later = sorted(r.info.run_name for r in trial_runs(client, second.parent_run_id))
    assert later == ["trial-6", "trial-7"]
    assert second.trials["added"] == 2
    assert (first.version, second.version) == ("1", "2")


def test_two_workers_on_sqlite_run_every_trial_exactly_once_under_one_parent(
    tracking_uri, model_name, tmp_path
):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    study_of_slow_trials(storage, "two-workers", 8)
    done = run_cli(
        *("--data", "builtin:breast_cancer", "--target", "target", "--model-name", model_name),
        *("--n-trials", "8", "--workers", "2", "--families", "rf", "--storage", storage),
        *("--study-name", "two-workers", "--json"),
        env_extra={"MLFLOW_TRACKING_URI": tracking_uri, "STAGEFLOW_HOME": str(tmp_path)},
    )

    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)  # stdout is the JSON object and nothing else
    assert "tune [" not in done.stderr  # no progress bar under --json
    assert "database is locked" not in done.stderr
    runs = trial_runs(MlflowClient(tracking_uri), answer["parent_run_id"])
    study = optuna.load_study(study_name="two-workers", storage=storage)
    assert_every_trial_once(study, runs, 8)
    assert {r.data.tags["stageflow.tune.worker"] for r in runs} == {"0", "1"}
    assert answer["version"] == "1"


@pytest.mark.postgres
def test_two_workers_share_one_study_on_postgresql(tracking_uri, model_name, postgres_database):
    study_of_slow_trials(postgres_database, "on-postgres", 6)
    result = tune(
        "builtin:breast_cancer",
        "target",
        6,
        model_name=model_name,
        workers=2,
        storage=postgres_database,
        study_name="on-postgres",
        families=("rf",),
    )

    runs = trial_runs(MlflowClient(tracking_uri), result.parent_run_id)
    study = optuna.load_study(study_name="on-postgres", storage=postgres_database)
    assert_every_trial_once(study, runs, 6)
    assert {r.data.tags["stageflow.tune.worker"] for r in runs} == {"0", "1"}
    assert result.storage.startswith("postgresql+psycopg://")


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("--n-trials", "0"), 2, "--n-trials: must be at least 1"),
        (("--n-trials", "2", "--storage", "redis://localhost/0"), 2, "scheme 'redis'"),
        (
            ("--n-trials", "2", "--storage", "postgresql://u:s3cret@127.0.0.1:1/studies"),
            1,
            "cannot open the study storage",
        ),
        (("--n-trials", "2", "--metric", "rmse"), 2, "does not apply to classification"),
    ],
)
def test_bad_arguments_are_one_clear_line_and_an_exit_code(
    tracking_uri, tmp_path, capsys, args, code, says
):
    # In this interpreter (tests.helpers.in_process): the subject is the message and the code.
    done = in_process(
        capsys,
        *("tune", "--data", "builtin:wine", "--target", "target", *args),
        env={"MLFLOW_TRACKING_URI": tracking_uri, "STAGEFLOW_HOME": str(tmp_path)},
    )
    assert done.returncode == code
    assert says in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "s3cret" not in done.stderr


def test_ctrl_c_keeps_finished_trials_and_leaves_no_run_open_and_no_worker_running(
    tracking_uri, model_name, tmp_path
):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stageflow", "tune", "--data", "builtin:breast_cancer"]
        + ["--target", "target", "--model-name", model_name, "--n-trials", "500"]
        + ["--workers", "2", "--families", "lr", "--storage", storage, "--study-name", "stopped"],
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "STAGEFLOW_HOME": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    client = MlflowClient(tracking_uri)
    try:
        deadline = time.monotonic() + 90
        finished = []
        while len(finished) < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            experiment = client.get_experiment_by_name(model_name)
            if experiment:
                finished = client.search_runs(
                    [experiment.experiment_id], "tags.`optuna.trial.state` = 'COMPLETE'"
                )
        assert len(finished) >= 4, "trials did not start"
        workers = children_of(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    assert proc.returncode == 130, stderr
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    (parent,) = [r for r in runs if r.data.tags.get("stageflow.kind") == "tune"]
    assert parent.info.status == "KILLED"
    study = optuna.load_study(study_name="stopped", storage=storage)
    assert all(t.state.is_finished() for t in study.trials)
    complete = {t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    logged = {
        int(r.data.tags["optuna.trial.number"])
        for r in runs
        if r.data.tags.get("optuna.trial.state") == "COMPLETE"
    }
    assert complete == logged
    assert workers, "no worker process was started"
    time.sleep(1)
    assert not [pid for pid in workers if alive(pid)], "a worker outlived the command"


# `mlflow run -e tune` with two workers, its trials nested under the run MLflow created:
# tests/test_mlproject.py (test_mlflow_run_tune_with_values_needing_quotes_logs_the_study).
