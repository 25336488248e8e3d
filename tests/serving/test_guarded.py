"""The guarded model for real: its data contract, abnormal inputs and outputs, REST and batch.

Models are trained with ``train`` against the session's tracking server and
loaded back from the registry; requests go through ``serve`` (Caddy in front of
``mlflow models serve``), as clients send them.
"""

from __future__ import annotations

import io
import json
import socket
import time
import uuid

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from experiments.train import train
from registry._stages import PRODUCTION, move
from serving._admission import MAX_CONCURRENCY, MAX_ROWS
from serving.batch import score
from serving.frontdoor import FrontDoorLimits
from stageflow.errors import UsageError
from tests.helpers import serving_in_production

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
    home = tmp_path_factory.mktemp("served-korean")
    with serving_in_production(
        name, version, tracking_server.uri, home, SERVE_TIMEOUT_S
    ) as running:
        yield running


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
        # ~2 KB, deeper than Python's recursion limit: was a 500 and a traceback.
        "deeply nested JSON": (b'{"inputs": ' + b"[" * 1000 + b"]" * 1000 + b"}", as_json),
        # Answers quote a name cut short: the end of this one never comes back.
        "a 100 KB column name": body(good.assign(**{"x" * 100_000 + "SECRET": 1.0})),
        "a charset MLflow refuses": (split_body(good).encode(), as_json + "; charset=latin-1"),
        "CSV that is not CSV": (b'"SECRET\n\x00\xff', "text/csv"),
        "Parquet that is not Parquet": (b"PAR1SECRETPAR1", "application/vnd.apache.parquet"),
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
            assert len(answer.content) < 1024, f"{name}: {len(answer.content)} bytes answered"

        good = korean_table(3, seed=6).drop(columns=[TARGET])
        answer = session.post(
            url, data=split_body(good).encode(), headers={"Content-Type": "application/json"}
        )
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["predictions"]) == 3
    # No model server died or was restarted on the way.
    assert served.controller.started_pids == pids


# -- generated malformed requests ---------------------------------------------------------

MARK = "SECRET"
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
# Names may come back (cut short) in an error; the values, marked, never may.
names = st.one_of(st.sampled_from(COLUMNS), st.text(max_size=300))
cells = json_scalars.map(lambda v: v + MARK if isinstance(v, str) else v) | json_values


@st.composite
def hostile_requests(draw) -> tuple[bytes, str]:
    """A request body no model should answer with a 5xx or an echo, and its content type."""
    as_json = "application/json"
    kind = draw(st.sampled_from(["bytes", "json", "nested", "split", "records", "columns", "csv"]))
    if kind == "bytes":
        return MARK.encode() + draw(st.binary(max_size=200)), draw(
            st.sampled_from([as_json, "text/csv", "application/vnd.apache.parquet"])
        )
    if kind == "json":
        key = draw(st.sampled_from(["dataframe_split", "dataframe_records", "inputs", "instances"]))
        value = draw(json_values)
        return json.dumps({key: value, MARK: value}).encode(), as_json
    if kind == "nested":  # nesting around (or beyond) Python's recursion limit
        depth = draw(st.integers(min_value=50, max_value=5000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        return (
            b'{"inputs": ' + opener * depth + b'"' + MARK.encode() + b'"' + closer * depth + b"}",
            as_json,
        )
    columns = draw(st.lists(names, min_size=1, max_size=4))
    rows = draw(
        st.lists(st.lists(cells, min_size=len(columns), max_size=len(columns) + 1), max_size=4)
    )
    if kind == "split":
        body = {"dataframe_split": {"columns": columns, "data": rows}}
    elif kind == "records":
        body = {"dataframe_records": [dict(zip(columns, row, strict=False)) for row in rows]}
    elif kind == "columns":
        body = {"inputs": {c: draw(st.lists(cells, max_size=3)) for c in columns}}
    else:
        lines = [",".join(columns)] + [",".join(str(v) for v in row) for row in rows]
        return "\n".join(lines).encode(), "text/csv"
    return json.dumps(body, ensure_ascii=draw(st.booleans())).encode(), as_json


@pytest.mark.xdist_group("served-korean")  # one shared server, one worker
def test_generated_malformed_requests_get_a_json_4xx_without_echo_or_traceback(served):
    url = served.url + "/invocations"
    (replica,) = [r for slot in served.controller.slots if slot.routed for r in slot.replicas]
    log_start = replica.log_path.stat().st_size
    session = requests.Session()  # one keep-alive client, as real clients hold them

    # Bounded by examples, not by time: each is one request to a warm replica.
    @settings(
        max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(hostile_requests())
    def answers_without_5xx_or_echo(request):
        body, content_type = request
        answer = session.post(url, data=body, headers={"Content-Type": content_type}, timeout=60)

        assert answer.status_code < 500, (answer.status_code, answer.text[:300], body[:200])
        assert answer.headers["Content-Type"].startswith("application/json")
        assert MARK not in answer.text, ("echoed", answer.text[:300], body[:200])
        if answer.status_code >= 400:
            error = answer.json()
            assert isinstance(error["error_code"], str)
            assert isinstance(error["message"], str)
            assert len(answer.content) < 1024, "an error quotes at most a short name"
            assert isinstance(error.get("problem", ""), str)

    with session:
        answers_without_5xx_or_echo()
    with replica.log_path.open("rb") as log:
        log.seek(log_start)
        written = log.read().decode("utf-8", "replace")
    assert "Traceback" not in written, written[-3000:]


# -- what a replica admits (serving/_admission.py, its defaults) ---------------------------


def korean_features(rows: int) -> pd.DataFrame:
    return korean_table(rows, seed=9).drop(columns=[TARGET]).fillna({"소득": 250.0, "지역": "서울"})


def parquet_body(frame: pd.DataFrame) -> bytes:
    out = io.BytesIO()
    frame.to_parquet(out, index=False, compression="zstd")
    return out.getvalue()


@pytest.mark.xdist_group("served-korean")  # one shared server, one worker
def test_a_request_over_the_row_cap_is_refused_413_in_every_format(served):
    over = korean_features(MAX_ROWS + 1)
    too_many = {
        "JSON": (split_body(over).encode(), "application/json"),
        "CSV": (over.to_csv(index=False).encode(), "text/csv"),
        # A few KiB on the wire, a million rows once decoded: refused from its footer.
        "Parquet": (
            parquet_body(
                pd.DataFrame({"나이": np.full(1_000_000, 40.0), "소득": 250.0, "지역": "서울"})
            ),
            "application/vnd.apache.parquet",
        ),
    }
    with requests.Session() as session:
        for name, (body, content_type) in too_many.items():
            answer = session.post(
                served.url + "/invocations", data=body, headers={"Content-Type": content_type}
            )

            assert answer.status_code == 413, (name, answer.status_code, answer.text[:300])
            assert answer.headers["Content-Type"].startswith("application/json"), name
            error = answer.json()
            assert (error["error_code"], error["problem"]) == ("TOO_MANY_ROWS", "too_many_rows")
            assert f"{MAX_ROWS} per request" in error["message"], name
            assert "stageflow score" in error["message"], name
            assert answer.headers["X-Request-Id"], name

        at_cap = split_body(korean_features(MAX_ROWS)).encode()
        answer = session.post(
            served.url + "/invocations", data=at_cap, headers={"Content-Type": "application/json"}
        )
    assert answer.status_code == 200, answer.text[:300]
    assert len(answer.json()["predictions"]) == MAX_ROWS


@pytest.mark.xdist_group("served-korean")  # its model, on the group's worker
def test_a_replica_at_its_concurrency_bound_answers_503_with_retry_after(
    korean_model, start_serving
):
    # A server of its own: this test fills every place of the replica. On the shared
    # one it failed in full `make test` runs only (the held requests never made a 200
    # into a 503 within a minute), and passed alone and under CPU load; not explained.
    name, version = korean_model
    move(mlflow.MlflowClient(), name, version, PRODUCTION)
    served = start_serving(name, replicas=1)
    assert served.wait_serving(timeout=SERVE_TIMEOUT_S) == version
    (replica,) = [r for slot in served.controller.slots if slot.routed for r in slot.replicas]
    one_row = split_body(korean_features(1)).encode()
    head = (
        b"POST /invocations HTTP/1.1\r\nHost: replica\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(one_row)
    )
    # Requests that hold every place of the replica: headers and half a body each, sent
    # straight to it (the front door waits for a whole body before it sends one on).
    held = [
        socket.create_connection((replica.address, replica.port), timeout=30)
        for _ in range(MAX_CONCURRENCY)
    ]
    try:
        for connection in held:
            connection.sendall(head + one_row[: len(one_row) // 2])
        busy = first_answer(served.url, one_row, lambda a: a.status_code != 200)

        assert busy.status_code == 503, (
            busy.text[:300],
            replica.url,
            served.controller.started_pids,
            replica.log_path.read_text(errors="replace")[-3000:],
        )
        assert busy.headers["Retry-After"] == "1"
        error = busy.json()
        assert (error["error_code"], error["problem"]) == ("SERVICE_UNAVAILABLE", "busy")
        assert "--max-concurrency" in error["message"]

        for connection in held:
            connection.sendall(one_row[len(one_row) // 2 :])
        for connection in held:
            assert connection.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for connection in held:
            connection.close()
    # Every place is free again.
    assert first_answer(served.url, one_row, lambda a: a.status_code == 200).status_code == 200


def first_answer(url: str, body: bytes, wanted) -> requests.Response:
    """The first front-door answer ``wanted`` accepts, asking for up to a minute (a timeout)."""
    deadline = time.monotonic() + 60.0
    while True:
        answer = requests.post(
            url + "/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        if wanted(answer) or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


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
