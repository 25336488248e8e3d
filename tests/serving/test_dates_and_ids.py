"""A table with a date, an order id and a constant column: trained, served, scored (issue 10).

The model is trained with ``train`` from a CSV file, put in Production, served
through the front door (Caddy in front of ``mlflow models serve``) and scored in
batch, for dates after the training period.
"""

from __future__ import annotations

import json
import uuid

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests

from experiments.train import train
from registry._stages import PRODUCTION, move
from serving.batch import score
from stageflow.contract import ignored_columns
from tests.helpers import serving_in_production

pytestmark = pytest.mark.slow
# The module's model and server are built once, so its tests run on one worker.
SHARED = pytest.mark.xdist_group("orders-model")

SERVE_TIMEOUT_S = 90.0
TRAIN_DAYS = 500


def orders(days: int, start: str, seed: int) -> pd.DataFrame:
    """One order a day: weekend orders are large; an id per order, one shop."""
    rng = np.random.default_rng(seed)
    dates = pd.date_range(start, periods=days, freq="D")
    weekend = dates.day_of_week >= 5
    return pd.DataFrame(
        {
            "date": dates.strftime("%Y/%m/%d"),
            "order_id": [f"ORD-{seed}-{i:06d}" for i in range(days)],
            "shop": "Seoul-1",
            "basket": rng.normal(3.0, 1.0, days).round(2),
            "large": (weekend ^ (rng.random(days) < 0.05)).astype(int),
        }
    )


@pytest.fixture(scope="module")
def orders_model(tracking_server, tmp_path_factory):
    path = tmp_path_factory.mktemp("orders") / "orders 2012.csv"
    frame = orders(TRAIN_DAYS, "2012-01-01", seed=0)
    frame.loc[[7, 8], "large"] = np.nan  # two orders without a label
    frame.to_csv(path, index=False)
    name = f"orders-{uuid.uuid4().hex[:6]}"
    result = train(str(path), "large", name, family="hgb", tracking_uri=tracking_server.uri)
    return name, result


@pytest.fixture(scope="module")
def served(orders_model, tracking_server, tmp_path_factory):
    """``serve`` of the orders model's version, in Production; stopped after the module.

    Shared (its tests only send requests, on one worker: ``SHARED``); one replica.
    """
    name, result = orders_model
    home = tmp_path_factory.mktemp("served-orders")
    with serving_in_production(
        name, result.version, tracking_server.uri, home, SERVE_TIMEOUT_S
    ) as running:
        yield running


def split_body(frame: pd.DataFrame) -> bytes:
    values = frame.astype(object).where(frame.notna(), None)
    body = {"dataframe_split": {"columns": list(frame.columns), "data": values.values.tolist()}}
    return json.dumps(body, ensure_ascii=False).encode()


@SHARED
def test_the_data_check_is_logged_with_the_run_and_returned(tracking_uri, orders_model):
    name, result = orders_model
    assert result.data_check["dates"] == {"date": "%Y/%m/%d"}
    assert result.data_check["dropped"] == {"identifier": ["order_id"], "constant": ["shop"]}
    assert result.data_check["target_missing_rows"] == 2
    client = mlflow.MlflowClient(tracking_uri)
    logged = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"data_check.json", "data_check.md"} <= logged
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/{result.version}")
    # What the schema gate reads: accepted and dropped, so a champion's column among
    # them breaks no client (registry.gates.judge_schema).
    assert ignored_columns(loaded) == {"order_id", "shop"}
    contract = loaded.unwrap_python_model().contract
    assert {c["name"]: c["kind"] for c in contract["columns"]} == {
        "date": "datetime",
        "basket": "numeric",
    }
    assert contract["ignored_columns"] == ["order_id", "shop"]


@SHARED
def test_rest_predicts_dates_after_the_training_period_and_ignores_the_id(served):
    later = orders(28, "2014-06-02", seed=1)  # a year after training ended; new order ids
    answer = requests.post(
        served.url + "/invocations",
        data=split_body(later.drop(columns=["large"])),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    # Only the day of the week tells large orders (weekends) apart; always "not large"
    # would be right on 5 days in 7 (0.71).
    assert np.mean(np.array(predictions) == later["large"].to_numpy()) >= 0.85


@SHARED
def test_rest_refuses_a_date_that_is_not_one_as_wrong_type(served):
    rows = orders(2, "2014-06-02", seed=2).drop(columns=["large"])
    rows.loc[1, "date"] = "SECRET-next tuesday"
    answer = requests.post(
        served.url + "/invocations",
        data=split_body(rows),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()
    assert (error["problem"], error["column"], error["row"]) == ("wrong_type", "date", 1)
    assert "SECRET" not in answer.text


@SHARED
def test_batch_scoring_predicts_later_dates_and_keeps_the_id(tracking_uri, orders_model, tmp_path):
    name, result = orders_model
    move(mlflow.MlflowClient(), name, result.version, PRODUCTION)
    later = orders(30, "2015-01-05", seed=3).drop(columns=["large"])
    source, out = tmp_path / "later orders.csv", tmp_path / "scored.csv"
    later.to_csv(source, index=False)
    score(name, source, out, chunk_rows=8)
    scored = pd.read_csv(out)
    assert scored["order_id"].tolist() == later["order_id"].tolist()
    assert scored["prediction"].notna().all()
