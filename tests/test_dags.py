"""The Airflow DAGs (dags/stageflow_jobs.py) run for real with `airflow dags test`.

Airflow lives in its own venv (`make airflow-venv`, see the Makefile for why), on
SQLite in a temporary AIRFLOW_HOME; its tasks call Stageflow's functions against
this session's real tracking server.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mlflow
import pytest

from experiments import data
from registry import PRODUCTION, STAGING, current_version, promote

# One worker runs the module, so `airflow db migrate` (airflow_home) runs once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("airflow")]

REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "dags" / "stageflow_jobs.py"
AIRFLOW = Path(os.environ.get("STAGEFLOW_AIRFLOW_VENV", REPO / ".venv-airflow")) / "bin" / "airflow"
AIRFLOW_TIMEOUT_S = 600


def airflow_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    return env | {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FILE.parent),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    }


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory):
    if not AIRFLOW.is_file():
        pytest.skip(f"Airflow is not installed at {AIRFLOW}; run `make airflow-venv`")
    home = tmp_path_factory.mktemp("airflow-home")
    subprocess.run(
        [str(AIRFLOW), "db", "migrate"],
        env=airflow_env(home),
        check=True,
        capture_output=True,
        timeout=AIRFLOW_TIMEOUT_S,
    )
    return home


def dags_test(home: Path, dag_id: str, conf: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(AIRFLOW), "dags", "test", dag_id, "-f", str(DAG_FILE), "-c", json.dumps(conf)],
        env=airflow_env(home),
        capture_output=True,
        text=True,
        timeout=AIRFLOW_TIMEOUT_S,
    )
    assert "state=success" in done.stdout + done.stderr, (done.stdout + done.stderr)[-4000:]
    return done


@pytest.fixture
def production(register_versions, model_name):
    """The session's wine lr (trained by ``train``, so it has a recipe) in Production,
    under the untimed policy that every retrained candidate of the model also meets."""
    version, _ = register_versions(model_name)
    promote(model_name, version, STAGING, "first")
    promote(model_name, version, PRODUCTION, "first")
    return version


def test_the_daily_dag_scores_the_input_with_the_production_version(
    airflow_home, production, model_name, tracking_uri, tmp_path
):
    features = data.load("builtin:wine").drop(columns=["target"]).head(25)
    source = tmp_path / "today.parquet"
    features.to_parquet(source, index=False)
    out = tmp_path / "scored"
    out.mkdir()
    conf = {
        "model": model_name,
        "tracking_uri": tracking_uri,
        "input": str(source),
        "output_dir": str(out),
    }
    dags_test(airflow_home, "stageflow_score", conf)

    (scored,) = out.glob(f"{model_name}-*.parquet")
    import pandas as pd

    frame = pd.read_parquet(scored)
    assert len(frame) == 25
    assert set(frame["model_version"].astype(str)) == {production}


def test_the_retrain_dag_puts_a_candidate_of_productions_recipe_in_staging(
    airflow_home, production, model_name, tracking_uri, tmp_path
):
    new = tmp_path / "labelled.parquet"
    data.load("builtin:wine").sample(30, random_state=1).to_parquet(new, index=False)
    conf = {"model": model_name, "tracking_uri": tracking_uri, "data": str(new)}
    dags_test(airflow_home, "stageflow_retrain", conf)

    client = mlflow.MlflowClient(tracking_uri)
    candidate = current_version(client, model_name, STAGING)
    assert candidate not in (None, production)
    tags = client.get_model_version(model_name, candidate).tags
    assert tags["stageflow.retrain.trigger"] == "schedule"
    assert tags["stageflow.retrain.parent_version"] == production


def test_a_dag_run_without_a_model_fails_saying_which_param_is_missing(airflow_home):
    done = subprocess.run(
        [str(AIRFLOW), "dags", "test", "stageflow_retrain", "-f", str(DAG_FILE), "-c", "{}"],
        env=airflow_env(airflow_home) | {"MLFLOW_TRACKING_URI": ""},
        capture_output=True,
        text=True,
        timeout=AIRFLOW_TIMEOUT_S,
    )
    output = done.stdout + done.stderr
    assert "state=failed" in output
    assert "param(s) model, tracking_uri are empty" in output
