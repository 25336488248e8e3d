"""The inference log for real: ``serve`` (Caddy, ``mlflow models serve``) writing segments
that reach the tracking server's artifact store.

Assertions read the segments back through ``MlflowClient`` (the artifact store), as a
monitor on another machine would.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow.parquet as pq
import pytest
import requests

from experiments import data
from registry._stages import PRODUCTION, move
from serving import inference_log
from serving.controller import VERSION_HEADER
from stageflow import processes

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 90.0
SWITCH_TIMEOUT_S = 90.0
ID_COLUMN = "order_id"


@pytest.fixture
def client(tracking_uri):
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@pytest.fixture
def features():
    return data.load("builtin:wine").drop(columns=[data.BUILTIN_TARGET]).head(3)


def body(frame: pd.DataFrame) -> dict:
    return {"dataframe_split": frame.to_dict(orient="split", index=False)}


def post(url: str, frame: pd.DataFrame, request_id: str | None = None) -> requests.Response:
    headers = {inference_log.REQUEST_ID_HEADER: request_id} if request_id else {}
    return requests.post(url + "/invocations", json=body(frame), headers=headers, timeout=30)


def serve_until(url: str, frame: pd.DataFrame, version: str) -> None:
    deadline = time.monotonic() + SWITCH_TIMEOUT_S
    while time.monotonic() < deadline:
        answer = post(url, frame, request_id=f"wait-{uuid.uuid4().hex[:8]}")
        if answer.status_code == 200 and answer.headers[VERSION_HEADER] == version:
            return
        time.sleep(0.2)
    pytest.fail(f"version {version} was not served within {SWITCH_TIMEOUT_S:.0f}s")


def logged(client, name: str, version: str, tmp_path: Path) -> pd.DataFrame:
    """Every row the artifact store holds for ``name`` version ``version``."""
    experiment = client.get_experiment_by_name(inference_log.EXPERIMENT)
    if experiment is None:
        return pd.DataFrame()
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"tags.`{inference_log.TAG_MODEL}` = '{name}' and "
            f"tags.`{inference_log.TAG_VERSION}` = '{version}'"
        ),
    )
    assert len(runs) <= 1, "one run per model version"
    if not runs:
        return pd.DataFrame()
    run = runs[0]
    assert run.data.tags[inference_log.TAG_KIND] == inference_log.KIND
    assert run.info.run_name == f"inference-{name}-v{version}"
    out = tmp_path / f"download-{version}-{uuid.uuid4().hex[:6]}"
    out.mkdir()
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id,
        artifact_path=inference_log.SEGMENTS_DIR,
        dst_path=str(out),
        tracking_uri=client.tracking_uri,
    )
    paths = sorted(Path(local).glob("*.parquet"))
    return pd.concat([pq.read_table(p).to_pandas() for p in paths], ignore_index=True)


def replica_logs(home: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (home / "serve").rglob("*.log"))


def test_requests_are_logged_under_the_version_that_answered_them_through_a_rollback(
    client, register_versions, model_name, features, start_serving, tmp_path
):
    v1, v2 = register_versions(model_name)
    move(client, model_name, v1, PRODUCTION)
    running = start_serving(
        model_name,
        replicas=1,
        model_config={"inference_log": {"id_column": ID_COLUMN, "flush_seconds": 1.0}},
    )
    assert running.wait_serving(timeout=START_TIMEOUT_S) == v1

    answered: dict[str, str] = {}  # request id -> version that answered
    own = post(running.url, features, request_id="client-own-1")
    assert own.status_code == 200
    assert own.headers[inference_log.REQUEST_ID_HEADER] == "client-own-1"
    answered["client-own-1"] = own.headers[VERSION_HEADER]
    generated = post(running.url, features)
    generated_id = generated.headers[inference_log.REQUEST_ID_HEADER]
    assert generated.status_code == 200
    assert generated_id
    answered[generated_id] = generated.headers[VERSION_HEADER]

    # The client's own key rides along: never fed to the model, never refused, logged.
    with_ids = features.assign(**{ID_COLUMN: ["A-1", "A-2", "A-3"]})
    keyed = post(running.url, with_ids, request_id="with-ids")
    assert keyed.status_code == 200, keyed.text
    assert keyed.json()["predictions"] == own.json()["predictions"]
    answered["with-ids"] = keyed.headers[VERSION_HEADER]

    refused = post(running.url, features.assign(alcohol=1e6), request_id="refused-1")
    assert refused.status_code == 400
    assert refused.headers[inference_log.REQUEST_ID_HEADER] == "refused-1"

    # Promotion, then a rollback mid-stream: each answer names its version.
    # While a switch completes both versions answer (the new one is routed before the old
    # one leaves), so each tagged request is checked against whichever version answered it.
    for version, tag in ((v2, "on-v2"), (v1, "back-on-v1")):
        move(client, model_name, version, PRODUCTION)
        serve_until(running.url, features, version)
        by_new = 0
        for i in range(50):
            answer = post(running.url, features, request_id=f"{tag}-{i}")
            assert answer.status_code == 200
            answered[f"{tag}-{i}"] = answer.headers[VERSION_HEADER]
            by_new += answer.headers[VERSION_HEADER] == version
            if by_new == 3:
                break
        assert by_new == 3, f"version {version} answered {by_new} of {i + 1} requests"

    running.stop()  # flushes and uploads what is buffered

    rows = pd.concat([logged(client, model_name, v, tmp_path) for v in (v1, v2)])
    assert set(rows.columns) >= {
        "time", "model", "version", "source", "request_id", "row", "id", "outcome",
        "problem", "latency_ms", "prediction",
    } | {f"input.{c}" for c in features.columns}  # fmt: skip
    assert f"input.{ID_COLUMN}" not in rows.columns
    for request_id, version in answered.items():
        mine = rows[rows.request_id == request_id]
        assert len(mine) == 3, f"{request_id}: {len(mine)} rows logged"
        assert set(mine.version) == {version}, request_id
        assert sorted(mine.row) == [0, 1, 2]
    assert (rows.model == model_name).all()
    assert (rows.source == "online").all()
    keyed_rows = rows[rows.request_id == "with-ids"].sort_values("row")
    assert keyed_rows.id.tolist() == ["A-1", "A-2", "A-3"]
    assert keyed_rows.prediction.tolist() == [str(p) for p in keyed.json()["predictions"]]
    assert keyed_rows["input.alcohol"].tolist() == features.alcohol.tolist()
    refusal = rows[rows.request_id == "refused-1"]
    assert len(refusal) == 1
    assert refusal.iloc[0].outcome == "refused"
    assert refusal.iloc[0].problem == "above_range"
    assert pd.isna(refusal.iloc[0]["input.alcohol"])
    assert (rows[rows.outcome == "accepted"].latency_ms > 0).all()
    # Only what clients sent: the controller's own proof requests are not traffic.
    sent = set(answered) | {"refused-1"}
    assert all(rid in sent or rid.startswith("wait-") for rid in rows.request_id)


def test_an_unwritable_log_directory_leaves_serving_up_and_counts_the_dropped_rows(
    client, register_versions, model_name, features, start_serving, tmp_path
):
    v1, _ = register_versions(model_name)
    move(client, model_name, v1, PRODUCTION)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log folder should be")
    running = start_serving(
        model_name,
        replicas=1,
        model_config={"inference_log": {"directory": str(blocker / "log"), "flush_seconds": 0.5}},
    )
    assert running.wait_serving(timeout=START_TIMEOUT_S) == v1
    for i in range(5):
        assert post(running.url, features, request_id=f"r{i}").status_code == 200
    processes.wait_until(
        lambda: "dropped" in replica_logs(tmp_path), timeout=30, what="a drop warning"
    )
    assert post(running.url, features).status_code == 200
    assert "inference log of" in replica_logs(tmp_path)
    running.stop()
    assert logged(client, model_name, v1, tmp_path).empty


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (root only): a full disk for the log."""
    path = tmp_path / "tiny"
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    (path / "filler").write_bytes(b"\0" * 60 * 1024)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_leaves_serving_up_and_counts_the_dropped_rows(
    client, register_versions, model_name, features, start_serving, tmp_path, tiny_disk
):
    v1, _ = register_versions(model_name)
    move(client, model_name, v1, PRODUCTION)
    running = start_serving(
        model_name,
        replicas=1,
        model_config={"inference_log": {"directory": str(tiny_disk), "flush_seconds": 0.5}},
    )
    assert running.wait_serving(timeout=START_TIMEOUT_S) == v1
    big = pd.concat([features] * 300, ignore_index=True)
    for _ in range(5):
        assert post(running.url, big).status_code == 200
    processes.wait_until(
        lambda: "dropped" in replica_logs(tmp_path), timeout=30, what="a drop warning"
    )
    assert post(running.url, features).status_code == 200
    running.stop()


def test_off_logs_nothing_and_sample_logs_a_fraction_both_answering_with_request_ids(
    client, register_versions, model_name, features, start_serving, tmp_path
):
    v1, _ = register_versions(model_name)
    move(client, model_name, v1, PRODUCTION)
    sent = 60
    for mode in ("off", "sample:0.5"):
        running = start_serving(
            model_name,
            replicas=1,
            model_config={"inference_log": {"mode": mode, "flush_seconds": 0.5}},
        )
        assert running.wait_serving(timeout=START_TIMEOUT_S) == v1
        with requests.Session() as session:
            for i in range(sent):
                answer = session.post(
                    running.url + "/invocations",
                    json=body(features),
                    headers={inference_log.REQUEST_ID_HEADER: f"{mode}-{i}"},
                    timeout=30,
                )
                assert answer.status_code == 200
                assert answer.headers[inference_log.REQUEST_ID_HEADER] == f"{mode}-{i}"
        running.stop()
    rows = logged(client, model_name, v1, tmp_path)
    assert not rows.request_id.str.startswith("off-").any()
    sampled = rows[rows.request_id.str.startswith("sample:0.5-")].request_id.nunique()
    # P(0 or all 60 of 60 at 0.5) is 2**-59: this fails only if sampling is broken.
    assert 0 < sampled < sent


def test_batch_scoring_logs_batch_rows_under_its_run_id_with_the_file_row_numbers(
    client, register_versions, model_name, features, tmp_path
):
    from serving.batch import score

    v1, _ = register_versions(model_name)
    move(client, model_name, v1, PRODUCTION)
    wine = data.load("builtin:wine").drop(columns=[data.BUILTIN_TARGET])
    source = tmp_path / "in.csv"
    wine.to_csv(source, index=False)

    result = score(model_name, source, tmp_path / "out.csv", chunk_rows=50)

    rows = logged(client, model_name, v1, tmp_path)
    assert set(rows.source) == {"batch"}
    assert set(rows.request_id) == {result.run_id}
    assert sorted(rows.row) == list(range(len(wine)))
    scored = pd.read_csv(tmp_path / "out.csv")
    by_row = rows.sort_values("row")
    assert by_row.prediction.tolist() == scored.prediction.astype(str).tolist()
    assert by_row["input.proline"].tolist() == wine.proline.tolist()
    assert by_row.latency_ms.isna().all()
