"""End to end through the CLI: train, promote, serve, switch, roll back, score.

``stageflow serve`` runs as the process a user starts (its clean stop on SIGTERM is
asserted); the short commands run ``stageflow.cli.main`` in this interpreter
(``tests.helpers.in_process``): the same parsing, handlers and output, without the
~3 s of importing MLflow each ``python -m stageflow`` costs.
"""

import json
import signal
import sys
import time

import pandas as pd
import pytest
import requests

from experiments import data
from stageflow import processes
from tests.helpers import in_process, processes_mentioning

pytestmark = pytest.mark.slow

# Generous, and only waits: on a machine busy with other work a cold start took several
# times its ~15 s (and each CLI call, while it was a Python start importing MLflow and
# scikit-learn, minutes). The whole life (ten CLI calls, three switches) gets 30 min.
SWITCH_TIMEOUT_S = 240.0
LIFE_TIMEOUT_S = 1800


def cli(capsys, *args, env):
    result = in_process(capsys, *args, env=env)
    assert result.returncode == 0, f"stageflow {' '.join(args)}:\n{result.stderr[-3000:]}"
    return result.stdout


def post(url, payload, **kwargs):
    return requests.post(url, json=payload, timeout=30, **kwargs)


def wait_for_version(url, payload, version: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < SWITCH_TIMEOUT_S:
        try:
            answer = post(url, payload)
            if answer.status_code == 200 and answer.headers.get("X-Model-Version") == version:
                return time.monotonic() - started
        except requests.RequestException:
            pass
        time.sleep(0.2)
    pytest.fail(f"the front door never served version {version}")


@pytest.mark.timeout(LIFE_TIMEOUT_S)
def test_a_model_lives_its_whole_life_through_the_cli(
    tracking_uri, model_name, tmp_path, untimed_policy, capsys
):
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "STAGEFLOW_HOME": str(tmp_path / "home")}
    versions = []
    for family in ("lr", "rf"):
        out = cli(
            capsys,
            "train",
            "--data",
            "builtin:wine",
            "--target",
            "target",
            "--family",
            family,
            "--model-name",
            model_name,
            "--json",
            env=env,
        )
        versions.append(json.loads(out)["version"])
    assert versions == ["1", "2"]
    # Promotion speed is not this test's subject (tests/conftest.py, UNTIMED_LATENCY_YAML).
    cli(capsys, "policy", "set", "--model", model_name, "--file", str(untimed_policy), env=env)
    cli(capsys, "promote", "--model", model_name, "--version", "1", "--to", "Staging", env=env)
    cli(capsys, "promote", "--model", model_name, "--version", "1", "--to", "Production", env=env)

    port = processes.free_port()
    serve = processes.spawn(
        # One replica per version: replicas are tests/serving's subject; this one is the life.
        [sys.executable, "-m", "stageflow", "serve", "--model", model_name, "--port", str(port)]
        + ["--replicas", "1"],
        log_path=tmp_path / "serve.log",
        env=processes.venv_env(env),
    )
    url = f"http://127.0.0.1:{port}/invocations"
    features = data.load("builtin:wine").drop(columns=["target"]).head(4)
    split = {"dataframe_split": features.to_dict(orient="split", index=False)}
    try:
        wait_for_version(url, split, "1")

        # MLflow's request formats work unchanged through the front door.
        expected = post(url, split).json()["predictions"]
        records = {"dataframe_records": features.to_dict(orient="records")}
        assert post(url, records).json()["predictions"] == expected
        inputs = {"inputs": features.to_dict(orient="list")}
        assert post(url, inputs).json()["predictions"] == expected
        csv = requests.post(
            url, data=features.to_csv(index=False), headers={"Content-Type": "text/csv"}, timeout=30
        )
        assert csv.json()["predictions"] == expected
        bad = requests.post(
            url, data="{not json", headers={"Content-Type": "application/json"}, timeout=30
        )
        assert bad.status_code == 400

        cli(capsys, "promote", "--model", model_name, "--version", "2", "--to", "Staging", env=env)
        cli(
            capsys,
            "promote",
            "--model",
            model_name,
            "--version",
            "2",
            "--to",
            "Production",
            env=env,
        )
        wait_for_version(url, split, "2")

        rolled = json.loads(cli(capsys, "rollback", "--model", model_name, "--json", env=env))
        assert (rolled["version"], rolled["archived"]) == ("1", ["2"])
        wait_for_version(url, split, "1")
        served = post(url, split).json()["predictions"]

        # Batch scoring uses the same Production version and gives the same answers.
        batch_in, batch_out = tmp_path / "batch.parquet", tmp_path / "scored.parquet"
        features.to_parquet(batch_in)
        scored = json.loads(
            cli(
                capsys,
                "score",
                "--model",
                model_name,
                "--input",
                str(batch_in),
                "--output",
                str(batch_out),
                "--json",
                env=env,
            )
        )
        assert (scored["version"], scored["rows"]) == ("1", 4)
        frame = pd.read_parquet(batch_out)
        assert frame["model_version"].tolist() == [1, 1, 1, 1]
        assert frame["prediction"].tolist() == served

        history = json.loads(cli(capsys, "history", "--model", model_name, "--json", env=env))[
            "entries"
        ]
        assert [(e["action"], e["version"], e["to_stage"]) for e in history] == [
            ("promote", "1", "Staging"),
            ("promote", "1", "Production"),
            ("promote", "2", "Staging"),
            ("promote", "2", "Production"),
            ("rollback", "1", "Production"),
        ]
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(timeout=60)
    assert code == 0, processes.tail(tmp_path / "serve.log")
    assert not processes.port_in_use("127.0.0.1", port)
    assert processes_mentioning(f"models:/{model_name}/") == []
    assert processes_mentioning(str(tmp_path / "home")) == []
