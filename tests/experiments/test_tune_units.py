"""Tuning's pieces without servers: storage URIs, the search space, the objective's metric."""

import os
import signal

import optuna
import pytest
from sqlalchemy import event
from threadpoolctl import threadpool_info, threadpool_limits

from experiments import _shield, _study, _workers
from experiments._objective import CrossValidation, FoldScores, choose_metric, estimator_params
from experiments.tune import _create_or_resume, prepare
from stageflow.errors import StageflowError, UsageError


def test_a_postgresql_uri_gets_the_installed_driver_and_keeps_its_password_for_connecting():
    uri = _study.normalize("postgresql://optuna:s3cret@db.internal:5432/studies")
    assert uri == "postgresql+psycopg://optuna:s3cret@db.internal:5432/studies"
    assert _study.mask(uri) == "postgresql+psycopg://optuna:***@db.internal:5432/studies"


@pytest.mark.parametrize("uri", ["redis://localhost:6379", "mysql://u@h/db", "not a uri"])
def test_storage_other_than_sqlite_or_postgresql_is_refused_naming_both(uri):
    with pytest.raises(UsageError, match=r"sqlite:///PATH.*postgresql://"):
        _study.normalize(uri)


def test_unreachable_postgresql_is_one_line_without_the_password():
    uri = _study.normalize("postgresql://optuna:s3cret@127.0.0.1:1/studies")
    with pytest.raises(StageflowError) as caught:
        _study.open_storage(uri)
    message = str(caught.value)
    assert "cannot open the study storage" in message
    assert "s3cret" not in message
    assert "\n" not in message


def test_sqlite_storage_is_created_in_wal_mode_with_immediate_transactions(tmp_path):
    path = tmp_path / "deep" / "studies.db"
    storage = _study.open_storage(f"sqlite:///{path}")
    with storage.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 60_000
    optuna.create_study(storage=storage, study_name="s").optimize(lambda t: 1.0, n_trials=2)
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 2


@pytest.mark.parametrize(
    ("task", "metric", "expected"),
    [
        ("classification", None, ("accuracy", "maximize")),
        ("classification", "log_loss", ("log_loss", "minimize")),
        ("regression", None, ("rmse", "minimize")),
        ("regression", "r2", ("r2", "maximize")),
    ],
)
def test_the_objective_direction_follows_the_metric(task, metric, expected):
    assert choose_metric(task, metric) == expected


def test_a_metric_of_the_other_task_is_refused_with_the_valid_ones():
    with pytest.raises(UsageError, match="rmse, mae, r2"):
        choose_metric("regression", "accuracy")


def test_hyperparameters_exist_only_in_their_family_and_reach_the_estimator():
    X, splits, task = prepare("builtin:wine", "target", None, 0)
    objective = CrossValidation(
        splits.X_train, splits.y_train, task, "accuracy", ("lr", "rf"), folds=3, seed=0
    )
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"family": "rf", "rf.n_estimators": 25, "rf.max_depth": 2})
    study.enqueue_trial({"family": "lr", "lr.C": 0.5})
    study.optimize(lambda trial: objective(trial, FoldScores()), n_trials=2)
    rf, lr = study.trials
    assert {p for p in rf.params if p != "family"} <= {
        "rf.n_estimators",
        "rf.max_depth",
        "rf.min_samples_leaf",
        "rf.max_features",
    }
    assert set(lr.params) == {"family", "lr.C"}
    assert estimator_params(lr.params) == ("lr", {"C": 0.5})
    assert sorted(rf.intermediate_values) == [0, 1, 2]  # one report per fold, for the pruner


def test_fold_scores_summarise_as_mean_and_std():
    scores = FoldScores([{"accuracy": 0.8}, {"accuracy": 1.0}])
    assert scores.summary() == pytest.approx({"cv_accuracy_mean": 0.9, "cv_accuracy_std": 0.1})


def test_resuming_a_study_made_for_other_data_is_refused(tmp_path):
    storage = _study.open_storage(f"sqlite:///{tmp_path / 's.db'}")
    settings = {"data": "builtin:wine", "target": "target", "metric": "accuracy"}
    _create_or_resume(storage, "study", "maximize", settings)
    with pytest.raises(UsageError, match="data='builtin:wine'"):
        _create_or_resume(storage, "study", "maximize", {**settings, "data": "builtin:iris"})
    with pytest.raises(UsageError, match="set to maximize"):
        _create_or_resume(storage, "study", "minimize", settings)


def test_ctrl_c_inside_a_storage_write_waits_for_the_write_and_the_trial_is_told_failed(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(_shield, "STATE", _shield.InterruptState())
    storage = _study.open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=storage, study_name="s")

    def ctrl_c(*_):
        os.kill(os.getpid(), signal.SIGINT)  # its handler runs inside the SQL statement

    def objective(trial):
        with _shield.interruptible():
            shielded = _shield.ShieldedTrial(trial)
            shielded.suggest_float("x", 0.0, 1.0)
            event.listen(storage.engine, "before_cursor_execute", ctrl_c, once=True)
            shielded.report(0.5, 0)
            pytest.fail("the interrupt was not raised once the write had finished")

    with _shield.deferred_interrupts(), pytest.raises(KeyboardInterrupt):
        study.optimize(objective, n_trials=1)
    [trial] = study.get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL
    assert trial.intermediate_values == {0: 0.5}


def test_trials_run_with_one_blas_thread_and_the_workers_share_of_openmp(tmp_path, monkeypatch):
    seen = []

    class Recorded(CrossValidation):
        def __call__(self, trial, scores):
            seen.extend((p["user_api"], p["num_threads"]) for p in threadpool_info())
            return super().__call__(trial, scores)

    monkeypatch.setattr(_workers, "CrossValidation", Recorded)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(study_name="s", storage=_study.open_storage(storage))
    job = _workers.StudyJob(
        source="builtin:wine",
        target="target",
        task="classification",
        metric="accuracy",
        families=("lr",),
        folds=2,
        seed=0,
        storage_uri=storage,
        study_name="s",
        tracking_uri="",
        experiment_id="",
        parent_run_id="",
        threads=3,
    )
    with threadpool_limits(limits=2):  # what the libraries would use left alone
        _workers.run_trials(job, 0, 1, log_trials=False)
        after = {(p["user_api"], p["num_threads"]) for p in threadpool_info()}
    assert ("blas", 1) in seen
    assert ("openmp", 3) in seen
    assert {n for api, n in seen if api == "blas"} == {1}, seen
    assert after == {("blas", 2), ("openmp", 2)}, "the limits outlived the trials"
