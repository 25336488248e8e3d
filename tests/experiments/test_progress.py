"""Tune's progress bar, in-process: it counts the study's trials since it started."""

import io

import optuna
import pytest

from experiments import _study
from experiments._progress import TuneProgress


def finished_trial(study, state, value=None):
    trial = study.ask()
    if state == optuna.trial.TrialState.COMPLETE:
        study.tell(trial, value)
    else:
        study.tell(trial, state=state)


@pytest.fixture
def study_uri(tmp_path):
    uri = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(
        storage=_study.open_storage(uri, heartbeat=False), study_name="s", direction="maximize"
    )
    finished_trial(study, optuna.trial.TrialState.COMPLETE, 0.5)  # before this invocation
    return uri, study


def test_the_bar_counts_this_invocations_trials_and_names_the_best(study_uri):
    uri, study = study_uri
    out = io.StringIO()
    bar = TuneProgress(uri, "s", "accuracy", n_trials=4, interval=60, file=out)
    bar.start()
    try:
        states = optuna.trial.TrialState
        finished_trial(study, states.COMPLETE, 0.9)
        finished_trial(study, states.PRUNED)
        finished_trial(study, states.FAIL)
        bar.draw()
        assert bar.bar.n == 3
    finally:
        bar.stop()
    last = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("tune:")
    assert "3/4" in last
    assert "1 pruned · 1 failed · best accuracy 0.9000 (trial 1)" in last
