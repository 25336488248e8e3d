"""The guarded model for real: its data contract, abnormal inputs and outputs, REST and batch.

Models are trained with ``train`` against the session's tracking server and
loaded back from the registry; requests go through ``serve`` (Caddy in front of
``mlflow models serve``), as clients send them.
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
from serving.controller import BackgroundServe
from serving.frontdoor import FrontDoorLimits
from stageflow import processes
from stageflow.errors import UsageError

pytestmark = pytest.mark.slow

COLUMNS = ["나이", "소득", "지역"]
TARGET = "이탈"
REGIONS = ["대구", "부산", "서울"]
# A cold start is ~15 s idle, several times that on a busy machine.
SERVE_TIMEOUT_S = 240.0


def korean_table(rows: int, seed: int) -> pd.DataFrame:
    """Customers with Korean column names; income and region have gaps, age has none."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "나이": rng.integers(20, 80, rows).astype(float),
            "소득": rng.normal(300.0, 60.0, rows).round(1),
            "지역": rng.choice(REGIONS, rows).astype(object),
        }
    )
    frame[TARGET] = ((frame["나이"] > 50) ^ (rng.random(rows) < 0.1)).astype(int)
    frame.loc[rng.random(rows) < 0.15, "소득"] = np.nan
    frame.loc[rng.random(rows) < 0.15, "지역"] = np.nan
    return frame


@pytest.fixture(scope="module")
def korean_model(tracking_server, tmp_path_factory):
    """A logistic regression trained on ``korean_table`` from a UTF-8 CSV file."""
    path = tmp_path_factory.mktemp("korean") / "고객.csv"
    korean_table(400, seed=0).to_csv(path, index=False)
    name = f"guarded-korean-{uuid.uuid4().hex[:6]}"
    result = train(str(path), TARGET, name, family="lr", tracking_uri=tracking_server.uri)
    return name, result.version


@pytest.fixture
def load(tracking_uri, korean_model):
    name, version = korean_model

    def load(config: dict | None = None):
        return mlflow.pyfunc.load_model(f"models:/{name}/{version}", model_config=config)

    return load


def refusal(call) -> dict:
    """The JSON body the guarded model answers with for what ``call`` does."""
    with pytest.raises(mlflow.exceptions.MlflowException) as caught:
        call()
    return json.loads(caught.value.serialize_as_json()) | {
        "status": caught.value.get_http_status_code()
    }


def test_the_contract_is_learned_from_a_korean_csv_with_missing_values(load):
    model = load()
    contract = model.unwrap_python_model().contract
    columns = {c["name"]: c for c in contract["columns"]}

    assert list(columns) == COLUMNS
    assert columns["나이"]["kind"] == "numeric"
    assert not columns["나이"]["nullable"]
    assert 20 <= columns["나이"]["min"] < columns["나이"]["max"] <= 79
    assert columns["소득"]["kind"] == "numeric"
    assert columns["소득"]["nullable"]
    assert columns["지역"] == {
        "name": "지역",
        "kind": "categorical",
        "type": "string",
        "nullable": True,
        "categories": REGIONS,
    }
    assert contract["target"] == {"classes": [0, 1]}
    # The contract checks inputs; no signature makes the server enforce a schema again.
    assert model.metadata.get_input_schema() is None
    assert contract["fast_path"] is True

    # Gaps where training had gaps are accepted (JSON null arrives as None), and the
    # fast path answers what the pipeline itself answers.
    # The reference is the pipeline on the training data's own gaps (NaN).
    rows = korean_table(60, seed=1).drop(columns=[TARGET])
    assert rows[["소득", "지역"]].isna().any().all()
    guarded = model.unwrap_python_model()
    expected = guarded.estimator.classes_[guarded.predict_pipeline(rows).argmax(axis=1)]
    as_json = rows.assign(지역=rows["지역"].astype(object).where(rows["지역"].notna(), None))
    assert model.predict(as_json).tolist() == expected.tolist()


@pytest.mark.parametrize(
    ("change", "column", "problem"),
    [
        (lambda f: f.drop(columns=["소득"]), "소득", "missing_column"),
        (lambda f: f.assign(extra=1.0), "extra", "unexpected_column"),
        (lambda f: f.assign(나이="마흔"), "나이", "wrong_type"),
        (lambda f: f.assign(나이=np.nan), "나이", "missing_value"),
        (lambda f: f.assign(소득=np.inf), "소득", "not_finite"),
        (lambda f: f.assign(나이=1e12), "나이", "above_range"),
        (lambda f: f.assign(지역="제주"), "지역", "unknown_category"),
        (lambda f: f.assign(지역=7), "지역", "wrong_type"),
    ],
)
def test_an_input_outside_the_contract_is_refused_naming_the_column(load, change, column, problem):
    rows = korean_table(5, seed=2).drop(columns=[TARGET]).fillna({"지역": "서울"})

    body = refusal(lambda: load().predict(change(rows)))

    assert body["status"] == 400
    assert body["error_code"] == "INVALID_INPUT"
    assert (body["column"], body["problem"]) == (column, problem)
    assert column in body["message"]


def test_the_flag_policy_accepts_an_unknown_category_and_counts_it(load):
    rows = korean_table(4, seed=3).drop(columns=[TARGET]).assign(지역="제주")
    model = load({"unknown_category": "flag"})

    predictions = model.predict(rows)

    assert len(predictions) == 4
    assert model.unwrap_python_model().guard.counts["unknown_category"] == 1


def test_abnormal_outputs_are_caught_and_answered_per_policy(tracking_uri, model_name, load):
    # Classification: class probabilities that are not numbers.
    classifier = load()
    classifier.unwrap_python_model().estimator.coef_[:] = np.nan
    rows = korean_table(3, seed=4).drop(columns=[TARGET])
    body = refusal(lambda: classifier.predict(rows))
    assert (body["status"], body["error_code"], body["problem"]) == (
        422,
        "ABNORMAL_OUTPUT",
        "not_finite",
    )

    # Regression: predictions far outside the training target's range.
    version = train("builtin:diabetes", "target", model_name, family="lr").version
    features = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}").input_example
    for policy in ("reject", "clip"):
        model = mlflow.pyfunc.load_model(
            f"models:/{model_name}/{version}", model_config={"abnormal_output": policy}
        )
        guarded = model.unwrap_python_model()
        guarded.estimator.intercept_ = guarded.estimator.intercept_ + 1e6
        if policy == "reject":
            body = refusal(lambda m=model: m.predict(features))
            assert (body["status"], body["problem"]) == (422, "out_of_range")
        else:
            clipped = model.predict(features)
            assert np.allclose(clipped, guarded.high)
        assert guarded.guard.counts["abnormal_output"] == 1


@pytest.fixture(scope="module")
def served(korean_model, tracking_server, tmp_path_factory):
    """``serve`` of the Korean model's version, in Production; stopped after the module.

    Shared: the tests that use it only send requests (a cold start is ~15 s or more).
    """
    name, version = korean_model
    move(mlflow.MlflowClient(tracking_server.uri), name, version, PRODUCTION)
    # Replicas are test_serve's subject; one starts faster.
    running = BackgroundServe(
        name,
        processes.free_port(),
        tracking_uri=tracking_server.uri,
        home=tmp_path_factory.mktemp("served-korean"),
        poll_interval=0.5,
        replicas=1,
    ).start()
    try:
        assert running.wait_serving(timeout=SERVE_TIMEOUT_S) == version
        yield running
    finally:
        running.stop()


def split_body(frame: pd.DataFrame) -> str:
    """``dataframe_split`` JSON as a client writes it: gaps are ``null``."""
    values = frame.astype(object).where(frame.notna(), None)
    return json.dumps(
        {"dataframe_split": {"columns": list(frame.columns), "data": values.values.tolist()}},
        ensure_ascii=False,
    )


def malformed_corpus() -> dict[str, tuple[bytes, str]]:
    """Name → (body, content type) of requests no model should answer 2xx."""
    good = korean_table(2, seed=5).drop(columns=[TARGET]).fillna({"소득": 250.0, "지역": "서울"})
    as_json = "application/json"

    def body(frame: pd.DataFrame) -> tuple[bytes, str]:
        return split_body(frame).encode(), as_json

    return {
        "empty body": (b"", as_json),
        "not JSON": (b"{this is not json", as_json),
        "a JSON list": (b"[1, 2, 3]", as_json),
        "no known input key": (b'{"rows": [[1, 2, 3]]}', as_json),
        "ragged dataframe_split": (
            b'{"dataframe_split": {"columns": ["a"], "data": [[1, 2]]}}',
            as_json,
        ),
        "unnamed inputs": (b'{"inputs": [[40.0, 300.0, "x"]]}', as_json),
        "missing column": body(good.drop(columns=["지역"])),
        "extra column": body(good.assign(비밀="x")),
        "mistyped column": body(good.assign(소득="많음")),
        "NaN literal": (
            '{"dataframe_split": {"columns": ["나이", "소득", "지역"], '
            '"data": [[NaN, 300.0, "서울"]]}}'.encode(),
            as_json,
        ),
        "Infinity literal": (
            json.dumps(
                {"dataframe_split": {"columns": COLUMNS, "data": [[float("inf"), 1.0, "서울"]]}}
            ).encode(),
            as_json,
        ),
        "huge value": body(good.assign(소득=1e300)),
        "unknown category": body(good.assign(지역="SECRET-제주")),
        "wrong content type": ("나이,소득,지역\n40,300,서울\n".encode(), "text/plain"),
        "oversized body": (b" " * (FrontDoorLimits().max_body_bytes + 1), as_json),
    }


@pytest.mark.xdist_group("served-korean")  # one shared server, one worker
def test_malformed_requests_get_a_stable_4xx_and_the_server_stays_healthy(served):
    url = served.url + "/invocations"
    pids = list(served.controller.started_pids)
    with requests.Session() as session:  # one keep-alive client, as real clients hold them
        for name, (body, content_type) in malformed_corpus().items():
            answer = session.post(url, data=body, headers={"Content-Type": content_type})

            assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text[:300])
            assert answer.headers["Content-Type"].startswith("application/json"), name
            error = answer.json()
            assert isinstance(error["error_code"], str)
            assert isinstance(error["message"], str)
            if error["error_code"] == "INVALID_INPUT":  # the guard's own: names the problem
                assert error["problem"]
                assert error.get("column", "") in error["message"]
            assert "SECRET" not in answer.text, f"{name}: the payload was echoed"

        good = korean_table(3, seed=6).drop(columns=[TARGET])
        answer = session.post(
            url, data=split_body(good).encode(), headers={"Content-Type": "application/json"}
        )
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["predictions"]) == 3
    # No model server died or was restarted on the way.
    assert served.controller.started_pids == pids


@pytest.mark.xdist_group("served-korean")  # one shared server, one worker
def test_rest_and_batch_scoring_give_identical_predictions(
    tracking_uri, served, korean_model, tmp_path
):
    name, version = korean_model
    rows = korean_table(50, seed=7).drop(columns=[TARGET])
    source, out = tmp_path / "입력.csv", tmp_path / "결과.csv"
    rows.to_csv(source, index=False)

    score(name, source, out, chunk_rows=16)
    answer = requests.post(
        served.url + "/invocations",
        data=split_body(pd.read_csv(source)).encode(),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )

    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == pd.read_csv(out)["prediction"].tolist()


def test_batch_scoring_names_the_file_row_the_contract_refuses(
    tracking_uri, korean_model, tmp_path
):
    name, version = korean_model
    move(mlflow.MlflowClient(), name, version, PRODUCTION)
    rows = korean_table(30, seed=8).drop(columns=[TARGET])
    rows.loc[22, "지역"] = "제주"
    source, out = tmp_path / "in.csv", tmp_path / "out.csv"
    rows.to_csv(source, index=False)

    with pytest.raises(UsageError, match=r"row 23: column '지역': .*\(unknown_category\)"):
        score(name, source, out, chunk_rows=10)
    assert not out.exists()
