"""``serve --shadow`` for real: Production's answered requests mirrored to the warm Staging
version, its predictions logged beside Production's, compared on labelled live rows by the
monitor and by the gate to Production.

Everything is real: the tracking server, Caddy, ``mlflow models serve`` replicas, the
inference log's segments in the artifact store, ``feedback`` labels, the registry's gates.
"""

from __future__ import annotations

import os
import signal
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests

from experiments import data
from monitoring import feedback, monitor, read_log
from registry import PRODUCTION, STAGING, promote
from registry._stages import move
from serving import inference_log
from serving._mirror import QUEUE_REQUESTS, STATS_PATH
from serving.controller import VERSION_HEADER, SwitchPolicy
from tests.helpers import UNTIMED_LATENCY_YAML

pytestmark = pytest.mark.slow

# Generous: on the shared 2-core machine a cold model server has taken over 90 s to start.
START_TIMEOUT_S = 300.0
LOG_TIMEOUT_S = 120.0
ROWS_PER_REQUEST = 2


@pytest.fixture
def client(tracking_uri):
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@pytest.fixture
def wine():
    frame = data.load("builtin:wine")
    return frame.drop(columns=[data.BUILTIN_TARGET]), frame[data.BUILTIN_TARGET]


def body(frame: pd.DataFrame) -> dict:
    return {"dataframe_split": frame.to_dict(orient="split", index=False)}


def shadow_stats(running) -> dict:
    """The serving Production replica's mirror counts (one replica per version here).

    Asked of the replica itself: the front door routes only what clients need.
    """
    active = running.controller._active
    if active is None:
        return {}
    url = active.replicas[0].url
    return requests.get(url + STATS_PATH, timeout=10).json()["shadow"]


def wait_until(what: str, check, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found is not None and found is not False:
            return found
        time.sleep(0.3)
    pytest.fail(f"{what} within {timeout:.0f}s")


@pytest.fixture
def switch_policy() -> SwitchPolicy:
    return SwitchPolicy()


@pytest.fixture
def shadowing(client, register_versions, model_name, start_serving, switch_policy):
    """v1 in Production, v2 in Staging, served with ``shadow=True`` until v2 is mirrored to."""
    v1, v2 = register_versions(model_name)
    move(client, model_name, v1, PRODUCTION)
    move(client, model_name, v2, STAGING)
    running = start_serving(
        model_name,
        replicas=1,
        shadow=True,
        model_config={"inference_log": {"flush_seconds": 1.0}},
        policy=switch_policy,
    )
    assert running.wait_serving(timeout=START_TIMEOUT_S) == v1
    wait_until(
        f"version {v1}'s replica did not mirror to version {v2}",
        lambda: (shadow_stats(running) or {}).get("shadow_version") == v2,
        START_TIMEOUT_S,
    )
    return running, v1, v2


def send_rows(url: str, features: pd.DataFrame, tag: str, version: str) -> dict[str, list]:
    """Every row, ROWS_PER_REQUEST per request, each request with its own id: id → answer."""
    answers = {}
    with requests.Session() as session:
        for start in range(0, len(features), ROWS_PER_REQUEST):
            request_id = f"{tag}-{start}"
            answer = session.post(
                url + "/invocations",
                json=body(features.iloc[start : start + ROWS_PER_REQUEST]),
                headers={inference_log.REQUEST_ID_HEADER: request_id},
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
            assert answer.headers[VERSION_HEADER] == version
            answers[request_id] = answer.json()["predictions"]
    return answers


def logged(model: str, v1: str, v2: str, expected_rows: int) -> pd.DataFrame:
    """The log of both versions once Production's rows and the shadow's have all arrived."""

    def complete():
        log = read_log(model, since="1h", versions=[v1, v2])
        served = log[(log["version"] == v1) & (log["source"] == inference_log.ONLINE)]
        shadow = log[(log["version"] == v2) & (log["source"] == inference_log.SHADOW)]
        return log if len(served) >= expected_rows and len(shadow) >= expected_rows else None

    return wait_until("the shadow's rows did not reach the log", complete, LOG_TIMEOUT_S)


def test_shadow_predictions_are_logged_beside_production_without_changing_client_answers(
    shadowing, model_name, wine
):
    running, v1, v2 = shadowing
    features, _ = wine
    answers = send_rows(running.url, features, "shadowed", v1)

    # What each client got is Production's own answer, as if there were no shadow.
    production = mlflow.pyfunc.load_model(f"models:/{model_name}/{v1}")
    expected = list(np.asarray(production.predict(features)))
    got = [
        p
        for request_id in sorted(answers, key=lambda r: int(r.split("-")[1]))
        for p in answers[request_id]
    ]
    assert got == expected

    log = logged(model_name, v1, v2, len(features))
    served = log[(log["version"] == v1) & (log["source"] == inference_log.ONLINE)]
    shadow = log[(log["version"] == v2) & (log["source"] == inference_log.SHADOW)]
    # Row for row the same requests: same request id and row index, marked as the shadow
    # of version 1 and answered by version 2's own model.
    key = ["request_id", "row"]
    assert sorted(map(tuple, shadow[key].astype(str).to_numpy())) == sorted(
        map(tuple, served[key].astype(str).to_numpy())
    )
    assert set(shadow[inference_log.SHADOW_OF].astype(str)) == {v1}
    challenger = mlflow.pyfunc.load_model(f"models:/{model_name}/{v2}")
    by_row = shadow.assign(start=shadow["request_id"].str.split("-").str[1].astype(int))
    by_row = by_row.sort_values(["start", "row"])
    assert list(by_row["prediction"].astype(str)) == [str(p) for p in challenger.predict(features)]
    # The shadow's cost was counted: every logged request was mirrored, none lost.
    stats = shadow_stats(running)
    assert stats["mirrored"] >= len(answers)
    assert stats["dropped"] == 0
    assert stats["failed"] == 0


def staging_group(running, version: str) -> int:
    slot = next(s for s in running.controller.slots if s.version == version)
    return slot.replicas[0].proc.pid  # the leader of the replica's process group


# The stopped shadow stays stopped for the whole test: the liveness rule would otherwise
# replace it once silent for replace_after (5 s), which a busy machine's hung phase outlasts.
@pytest.mark.parametrize("switch_policy", [SwitchPolicy(replace_after=3600.0)])
def test_no_client_request_fails_while_the_shadow_is_hung_or_dead(shadowing, wine):
    running, v1, v2 = shadowing
    features, _ = wine
    group = staging_group(running, v2)
    os.killpg(group, signal.SIGSTOP)
    try:
        before = shadow_stats(running)
        # More requests than the mirror's queue holds: the hung shadow answers none of them.
        hung = send_rows(running.url, pd.concat([features] * 4), "hung", v1)
        assert len(hung) > QUEUE_REQUESTS
        while_hung = shadow_stats(running)
        assert while_hung["mirrored"] == before["mirrored"]
        assert while_hung["dropped"] > 0  # bounded: what did not fit was dropped and counted
    finally:
        os.killpg(group, signal.SIGCONT)
    os.killpg(group, signal.SIGKILL)  # now the shadow is down
    dead = send_rows(running.url, features, "dead", v1)
    assert len(dead) == -(-len(features) // ROWS_PER_REQUEST)
    after = shadow_stats(running)
    assert after["failed"] + after["dropped"] > while_hung["failed"] + while_hung["dropped"]


def noisy_labels(target: pd.Series, every: int = 5) -> pd.Series:
    """The true class, except every ``every``-th row labelled as the next class: live
    accuracy (~0.8) then differs from any test-split figure (~0.97)."""
    classes = sorted(target.unique())
    labels = target.copy()
    flip = np.arange(len(target)) % every == 0
    labels[flip] = [classes[(classes.index(c) + 1) % len(classes)] for c in target[flip]]
    return labels


def test_with_labels_the_monitor_and_the_gate_judge_both_versions_on_the_same_live_rows(
    shadowing, model_name, wine, tmp_path
):
    running, v1, v2 = shadowing
    features, target = wine
    send_rows(running.url, features, "live", v1)
    log = logged(model_name, v1, v2, len(features))

    # Labels for every served row, by request id and row index (`stageflow feedback`).
    starts = np.arange(len(features)) // ROWS_PER_REQUEST * ROWS_PER_REQUEST
    truth = noisy_labels(target).to_numpy()
    labels_file = tmp_path / "labels.csv"
    pd.DataFrame(
        {
            "request_id": [f"live-{s}" for s in starts],
            "row": np.arange(len(features)) % ROWS_PER_REQUEST,
            "target": truth,
        }
    ).to_csv(labels_file, index=False)
    feedback(model_name, labels_file)

    # What each version scored on those rows, from the log itself.
    def accuracy(version: str, source: str) -> float:
        rows = log[(log["version"] == version) & (log["source"] == source)]
        rows = rows[rows["request_id"].str.startswith("live-")]
        index = rows["request_id"].str.split("-").str[1].astype(int) + rows["row"].astype(int)
        expected = truth[index.to_numpy()].astype(str)
        return float(np.mean(rows["prediction"].astype(str).to_numpy() == expected))

    champion, challenger = accuracy(v1, "online"), accuracy(v2, "shadow")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        UNTIMED_LATENCY_YAML
        + "comparison:\n  margin: 0.5\n  live: {min_rows: 100, since: 1h}\n"
        + "monitoring:\n  min_rows: 100\n"
    )

    result = monitor(model_name, since="1h", policy=policy, log=False)
    shadow = result.to_json()["shadow"]
    assert (shadow["production"], shadow["shadow"]) == (v1, v2)
    assert shadow["rows"] == len(features)
    assert shadow["production_value"] == pytest.approx(champion, abs=1e-6)
    assert shadow["shadow_value"] == pytest.approx(challenger, abs=1e-6)
    assert shadow["low"] <= shadow["improvement"] <= shadow["high"]
    assert {v["version"] for v in result.to_json()["versions"]} >= {v1, v2}  # keys intact

    # The gates run in this process: serving stops first, so that the offline comparison
    # (mlflow.models.evaluate) does not share the interpreter with the controller's threads.
    running.stop()

    # Too few labelled live rows for the policy: the gate says so and compares offline.
    strict = tmp_path / "strict.yaml"
    strict.write_text(policy.read_text().replace("min_rows: 100, since", "min_rows: 100000, since"))
    offline = promote(model_name, v2, PRODUCTION, dry_run=True, policy_file=str(strict))
    check = next(c for c in offline.checks if c.check == "beats_champion")
    assert check.figures["evidence"] == "offline"
    assert check.figures["live_rows"] == len(features)
    assert "(offline: " in check.detail

    # Enough: the gate judges both on the live rows, and the ledger's report says so.
    live = promote(model_name, v2, PRODUCTION, "live shadow comparison", policy_file=str(policy))
    check = next(c for c in live.checks if c.check == "beats_champion")
    assert check.figures["evidence"] == "live"
    assert check.figures["rows"] == len(features)
    assert check.figures["champion_score"] == pytest.approx(champion, abs=1e-6)
    assert check.figures["challenger_score"] == pytest.approx(challenger, abs=1e-6)
    assert live.changed
    reported = next(c for c in live.report["checks"] if c["check"] == "beats_champion")
    assert reported["figures"]["evidence"] == "live"  # what the ledger's gate report keeps
