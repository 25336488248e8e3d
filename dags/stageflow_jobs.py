"""Stageflow's periodic jobs as Airflow 3 DAGs: score daily, monitor hourly, retrain on alarm.

Not named ``stageflow.py``: Airflow puts the DAGs folder on ``sys.path``, where a
``stageflow`` module would hide the ``stageflow`` package the tasks import.

Put this file in Airflow's DAGs folder (or point ``AIRFLOW__CORE__DAGS_FOLDER`` at
this repository's ``dags/``) in an environment with ``pip install 'stageflow[airflow]'``.
Every DAG takes the same params (trigger form, ``airflow dags trigger -c`` or
``dags test -c``); their defaults come from the environment of the scheduler:

| param | env default | used by |
|---|---|---|
| ``model`` | ``STAGEFLOW_MODEL`` | all |
| ``tracking_uri`` | ``MLFLOW_TRACKING_URI`` | all |
| ``input`` | ``STAGEFLOW_SCORE_INPUT`` | score: the file to score |
| ``output_dir`` | ``STAGEFLOW_SCORE_OUTPUT_DIR`` | score: ``<model>-<date>.parquet`` goes here |
| ``since`` | ``1h`` | monitor: the window |
| ``act`` | ``rollback,retrain`` | monitor: what the watch may do about an alarm |
| ``data`` | ``""`` | retrain: labelled rows instead of the inference log's |

- ``stageflow_score`` (``@daily``): ``serving.batch.score`` with the Production version.
- ``stageflow_monitor`` (``@hourly``): ``monitoring.monitor``; if it raised an
  alarm, ``monitoring.watch`` acts on it per the model's policy (auto-rollback,
  retrain on drift), as actor ``stageflow-watch``, with the ledger entries that go with it.
- ``stageflow_retrain`` (no schedule: triggered, or set one): ``experiments.retrain``.

The tasks call Stageflow's own functions (the same ones the CLI calls), imported
when a task runs so the scheduler parses this file without loading scikit-learn.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import Param, dag, get_current_context, task

START = datetime(2026, 1, 1)


def _params() -> dict:
    return {
        "model": Param(os.environ.get("STAGEFLOW_MODEL", ""), type="string"),
        "tracking_uri": Param(os.environ.get("MLFLOW_TRACKING_URI", ""), type="string"),
        "input": Param(os.environ.get("STAGEFLOW_SCORE_INPUT", ""), type="string"),
        "output_dir": Param(os.environ.get("STAGEFLOW_SCORE_OUTPUT_DIR", ""), type="string"),
        "since": Param("1h", type="string"),
        "act": Param("rollback,retrain", type="string"),
        "data": Param("", type="string"),
    }


def _given(params: dict, *names: str) -> None:
    missing = [n for n in names if not str(params.get(n) or "").strip()]
    if missing:
        raise ValueError(
            f"stageflow DAG: param(s) {', '.join(missing)} are empty; pass them with -c "
            "'{\"model\": ...}' or set STAGEFLOW_MODEL / MLFLOW_TRACKING_URI / "
            "STAGEFLOW_SCORE_INPUT / STAGEFLOW_SCORE_OUTPUT_DIR for the scheduler"
        )


@dag(
    dag_id="stageflow_score",
    schedule="@daily",
    start_date=START,
    catchup=False,
    params=_params(),
    tags=["stageflow"],
    doc_md="Score the day's input with the Production version (`stageflow score`).",
)
def score_daily():
    @task
    def score() -> dict:
        from pathlib import Path  # noqa: PLC0415

        from serving.batch import score as batch_score  # noqa: PLC0415

        context = get_current_context()
        params = context["params"]
        _given(params, "model", "tracking_uri", "input", "output_dir")
        output = Path(params["output_dir"]) / f"{params['model']}-{context['ds']}.parquet"
        result = batch_score(params["model"], params["input"], output, params["tracking_uri"])
        return result.to_json()

    score()


@dag(
    dag_id="stageflow_monitor",
    schedule="@hourly",
    start_date=START,
    catchup=False,
    params=_params(),
    tags=["stageflow"],
    doc_md="Monitor the last hour; on an alarm, act per the policy (`stageflow watch --once`).",
)
def monitor_hourly():
    @task
    def monitor() -> dict:
        import monitoring  # noqa: PLC0415

        params = get_current_context()["params"]
        _given(params, "model", "tracking_uri")
        result = monitoring.monitor(
            params["model"], since=params["since"], tracking_uri=params["tracking_uri"]
        )
        return result.to_json()

    @task.short_circuit
    def alarmed(result: dict) -> bool:
        return any(v.get("alarms") for v in result.get("versions", []))

    @task
    def act(result: dict) -> dict:
        from monitoring.watch import watch_once  # noqa: PLC0415

        params = get_current_context()["params"]
        report = watch_once(
            params["model"],
            params["since"],
            params["act"],
            tracking_uri=params["tracking_uri"],
            monitor=lambda *args, **kwargs: result,
            retrain_data=params["data"] or None,
        )
        return report.to_json()

    result = monitor()
    alarmed(result) >> act(result)


@dag(
    dag_id="stageflow_retrain",
    schedule=None,
    start_date=START,
    catchup=False,
    params=_params(),
    tags=["stageflow"],
    doc_md="Retrain Production's recipe on new labelled rows (`stageflow retrain`).",
)
def retrain_on_demand():
    @task
    def retrain() -> dict:
        from experiments.retrain import retrain as run_retrain  # noqa: PLC0415

        params = get_current_context()["params"]
        _given(params, "model", "tracking_uri")
        result = run_retrain(
            params["model"],
            params["data"] or None,
            trigger="schedule",
            tracking_uri=params["tracking_uri"],
        )
        return result.to_json()

    retrain()


score_daily()
monitor_hourly()
retrain_on_demand()
