"""Batch scoring on Spark for real (``local[2]``): parity with local and REST, marked refusals,
the batch run's records, directories of parts, a caller's running session used and left
running, and the engine's missing-dependency errors.

The in-process tests score on one module-wide SparkSession (started as ``score`` starts its
own), as a notebook would: one JVM for all of them. The CLI test starts Spark of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
from mlflow import MlflowClient

from experiments.train import train
from monitoring import read_log
from registry._stages import PRODUCTION, move
from serving import _spark
from serving.batch import BATCH_EXPERIMENT, input_digest, score
from stageflow.errors import UsageError
from stageflow.files import file_digest
from tests.serving.test_guarded import SERVE_TIMEOUT_S, TARGET, korean_table, split_body

ROOT = Path(__file__).resolve().parents[2]
MASTER = "local[2]"
ID = "고객번호"

pytestmark = pytest.mark.slow
needs_spark = pytest.mark.skipif(
    _spark.java_executable() is None, reason="Spark needs Java: no `java` on PATH, no JAVA_HOME"
)
# The tests of korean_model and the module's SparkSession: both built once, on one worker.
SPARK_GROUP = pytest.mark.xdist_group("spark")
# What a Stageflow-started session puts in the environment while it runs (serving/_spark.py).
SESSION_ENV = ("SPARK_LOCAL_IP", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "SPARK_CONF_DIR")


@pytest.fixture(scope="module", autouse=True)
def _pyspark_installed():
    pytest.importorskip("pyspark", reason="the spark extra is not installed (make test does)")


@pytest.fixture(scope="module")
def korean_model(tracking_server, tmp_path_factory):
    """A logistic regression on Korean columns with gaps and categories, in Production."""
    path = tmp_path_factory.mktemp("korean") / "고객.csv"
    korean_table(400, seed=0).to_csv(path, index=False)
    name = f"spark-korean-{uuid.uuid4().hex[:6]}"
    result = train(str(path), TARGET, name, family="lr", tracking_uri=tracking_server.uri)
    move(MlflowClient(tracking_server.uri), name, result.version, PRODUCTION)
    return name, result.version


@pytest.fixture(scope="module")
def spark():
    """The module's SparkSession on ``local[2]``, started (loopback, quiet, this Python for its
    workers) and stopped by the code ``score`` starts its own with; ``score`` runs on it.

    On teardown the JVM it started must be gone: a session Stageflow starts, it stops.
    """
    from pyspark import SparkContext

    with _spark.session(MASTER) as session:
        jvm = SparkContext._gateway.proc
        yield session
    assert SparkContext._active_spark_context is None
    assert jvm.poll() is not None, f"the JVM (pid {jvm.pid}) outlived its session"


def outside_spark(env) -> dict:
    """``env`` without what the module's SparkSession set in it: a CLI sets its own."""
    return {k: v for k, v in env.items() if k not in SESSION_ENV}


def customers(rows: int, seed: int) -> pd.DataFrame:
    frame = korean_table(rows, seed=seed).drop(columns=[TARGET])
    frame.insert(0, ID, [f"c{seed:02d}-{i:05d}" for i in range(rows)])
    return frame


def by_id(frame: pd.DataFrame, ids) -> pd.DataFrame:
    return frame.set_index(ID).loc[list(ids)]


@needs_spark
@SPARK_GROUP
def test_spark_local_and_rest_give_identical_predictions(
    tracking_uri, korean_model, spark, start_serving, tmp_path
):
    name, version = korean_model
    rows = customers(150, seed=11)
    assert rows["소득"].isna().any()  # gaps in a numeric column
    assert rows["지역"].isna().any()  # and in a categorical one
    source = tmp_path / "입력.csv"
    rows.to_csv(source, index=False)
    # The server's cold start runs while both engines score; it answers once it serves.
    serving = start_serving(name, replicas=1)

    local = score(name, source, tmp_path / "local.parquet", chunk_rows=40, id_column=ID)
    on_spark = score(
        name, source, tmp_path / "spark-out", engine="spark", spark_master=MASTER, id_column=ID
    )
    assert serving.wait_serving(timeout=SERVE_TIMEOUT_S) == version
    answer = requests.post(
        serving.url + "/invocations",
        data=split_body(pd.read_csv(source).drop(columns=[ID])).encode(),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )

    assert answer.status_code == 200, answer.text
    local_out = pd.read_parquet(tmp_path / "local.parquet")
    spark_out = pd.read_parquet(tmp_path / "spark-out")
    assert list(spark_out.columns) == [
        *rows.columns,
        "prediction",
        "model_version",
        "guard_problem",
    ]
    assert on_spark.rows == local.rows == len(rows)
    assert on_spark.refused == {}
    assert spark_out["guard_problem"].isna().all()
    assert (spark_out["model_version"] == int(version)).all()
    spark_predictions = by_id(spark_out, rows[ID])["prediction"].tolist()
    assert answer.json()["predictions"] == local_out["prediction"].tolist() == spark_predictions


@needs_spark
@SPARK_GROUP
def test_refused_rows_are_marked_as_locally_and_the_batch_run_counts_them(
    tracking_uri, korean_model, spark, tmp_path
):
    name, version = korean_model
    rows = customers(60, seed=12).astype({"소득": object})
    faults = {
        3: ("나이", 1e9, "above_range"),
        7: ("지역", "제주", "unknown_category"),
        8: ("지역", "부산 ", "unknown_category"),
        20: ("나이", None, "missing_value"),
        31: ("소득", "많음", "wrong_type"),
        44: ("나이", -1e9, "below_range"),
    }
    for row, (column, value, _) in faults.items():
        rows.loc[row, column] = value
    source = tmp_path / "faults.csv"
    rows.to_csv(source, index=False)

    local = score(
        name, source, tmp_path / "local.csv", chunk_rows=25, on_invalid="mark", id_column=ID
    )
    on_spark = score(name, source, tmp_path / "out", engine="spark", spark_master=MASTER)

    spark_out = by_id(pd.read_parquet(tmp_path / "out"), rows[ID])
    local_out = pd.read_csv(tmp_path / "local.csv", dtype={ID: str})
    expected = [faults[i][2] if i in faults else None for i in range(len(rows))]
    assert [None if pd.isna(p) else p for p in spark_out["guard_problem"]] == expected
    assert [None if pd.isna(p) else p for p in local_out["guard_problem"]] == expected
    refused = spark_out["guard_problem"].notna().to_numpy()
    assert spark_out["prediction"][refused].isna().all()
    assert spark_out["prediction"][~refused].tolist() == local_out["prediction"][~refused].tolist()
    counts = {"above_range": 1, "below_range": 1, "missing_value": 1}
    counts |= {"unknown_category": 2, "wrong_type": 1}
    assert on_spark.refused == local.refused == counts

    run = MlflowClient().get_run(on_spark.run_id)
    assert MlflowClient().get_experiment(run.info.experiment_id).name == BATCH_EXPERIMENT
    assert run.data.tags["stageflow.engine"] == "spark"
    assert run.data.params["engine"] == "spark"
    assert run.data.params["version"] == version
    assert run.data.params["on_invalid"] == "mark"
    assert run.data.params["spark_master"] == MASTER
    assert run.data.params["input_sha256"] == file_digest(source)
    assert run.data.metrics["rows"] == len(rows)
    assert run.data.metrics["refused_rows"] == len(faults)
    assert run.data.metrics["seconds"] > 0
    for problem, n in counts.items():
        assert run.data.metrics[f"refused_rows.{problem}"] == n

    # Both runs' accepted rows reached the inference log as batch rows, by their row numbers.
    logged = read_log(name, tracking_uri=tracking_uri, versions=[version])
    accepted = {i for i in range(len(rows)) if i not in faults}
    for result in (local, on_spark):
        mine = logged[logged["request_id"] == result.run_id]
        assert set(mine["source"]) == {"batch"}
        assert set(mine["row"]) == accepted
    local_ids = logged[logged["request_id"] == local.run_id].set_index("row")["id"]
    assert local_ids.loc[sorted(accepted)].tolist() == rows[ID].iloc[sorted(accepted)].tolist()


@needs_spark
@SPARK_GROUP
def test_a_running_spark_session_is_scored_on_and_left_running(
    tracking_uri, korean_model, spark, tmp_path
):
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    name, version = korean_model
    rows = customers(20, seed=13)
    source = tmp_path / "in.csv"
    rows.to_csv(source, index=False)
    jvm = SparkContext._gateway.proc.pid
    # The caller's own setting, which the job (it scores in UTC) must not change.
    spark.conf.set("spark.sql.session.timeZone", "Asia/Seoul")
    try:
        # No master named: the caller's session's (local[2]), not a new local[*] one.
        on_spark = score(name, source, tmp_path / "out", engine="spark", id_column=ID)

        # Still the process's session, not the job's. (Not getActiveSession(): it is per JVM
        # thread, and in some runs it was None on this thread while the session ran.)
        assert SparkSession.active() is spark
        assert spark.range(3).count() == 3  # still running
        assert SparkContext._gateway.proc.pid == jvm  # no JVM of its own
        assert spark.conf.get("spark.sql.session.timeZone") == "Asia/Seoul"
    finally:
        spark.conf.set("spark.sql.session.timeZone", "UTC")
    run = MlflowClient().get_run(on_spark.run_id)
    assert run.data.params["spark_master"] == spark.conf.get("spark.master") == MASTER
    assert on_spark.rows == len(rows)
    scored = by_id(pd.read_parquet(tmp_path / "out"), rows[ID])
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    assert scored["prediction"].tolist() == list(model.predict(rows.drop(columns=[ID])))


@needs_spark
@SPARK_GROUP
def test_a_master_other_than_the_running_sessions_is_refused(
    tracking_uri, korean_model, spark, tmp_path
):
    name, _ = korean_model
    source = tmp_path / "in.csv"
    customers(5, seed=14).to_csv(source, index=False)

    with pytest.raises(UsageError, match=r"already runs a SparkSession on local\[2\]"):
        score(name, source, tmp_path / "out", engine="spark", spark_master="local[1]")

    assert spark.range(3).count() == 3
    assert not (tmp_path / "out").exists()


# Last of the group, so the in-process tests run back to back on the module session's warm
# Python workers (Spark reaps idle ones while a long test runs).
@needs_spark
@SPARK_GROUP
def test_a_directory_of_parquet_parts_is_scored_into_parquet_parts_by_the_cli(
    tracking_uri, korean_model, tmp_path
):
    name, version = korean_model
    source = tmp_path / "nightly"
    source.mkdir()
    parts = [customers(n, seed=20 + i) for i, n in enumerate((70, 45, 90))]
    for i, part in enumerate(parts):
        part.to_parquet(source / f"part-{i:05d}.parquet", index=False)
    (source / "_SUCCESS").write_text("")
    out = tmp_path / "scored"

    done = subprocess.run(
        [sys.executable, "-m", "stageflow", "score", "--model", name, "--engine", "spark"]
        + ["--spark-master", MASTER, "--input", str(source), "--output", str(out)]
        + ["--id-column", ID, "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**outside_spark(os.environ), "MLFLOW_TRACKING_URI": tracking_uri},
    )

    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    everything = pd.concat(parts, ignore_index=True)
    assert result["rows"] == len(everything)
    written = sorted(p.name for p in out.glob("part-*.parquet"))
    assert written, f"no Parquet parts in {sorted(os.listdir(out))}"
    scored = by_id(pd.read_parquet(out), everything[ID])
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    assert scored["prediction"].tolist() == list(model.predict(everything.drop(columns=[ID])))
    run = MlflowClient().get_run(result["run_id"])
    assert run.data.params["input_sha256"] == input_digest(source)
    assert not list(tmp_path.glob(".*partial"))


def run_cli_score(env: dict, tmp_path: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """``stageflow score --engine spark`` in a fresh interpreter, ``prelude`` run first."""
    source = tmp_path / "in.csv"
    customers(5, seed=1).to_csv(source, index=False)
    code = f"{prelude}\nimport sys\nfrom stageflow.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "score", "--model", "m", "--engine", "spark"]
        + ["--input", str(source), "--output", str(tmp_path / "out")]
        + ["--tracking-uri", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )


def without_java(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    env["PATH"] = str(Path(sys.executable).parent)  # the venv's tools, and no java
    return env | extra


@pytest.mark.parametrize(
    ("java_home", "says"),
    [(None, "no `java` on PATH, no JAVA_HOME"), ("/nonexistent-jdk", "has no bin/java")],
)
def test_spark_without_java_says_so_in_one_line(tmp_path, java_home, says):
    env = without_java(**({"JAVA_HOME": java_home} if java_home else {}))
    done = run_cli_score(env, tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Spark needs Java 17 or newer" in lines[0]
    assert says in lines[0]


BLOCK_PYSPARK = """
import importlib.abc, sys
class NoPyspark(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pyspark" or name.startswith("pyspark."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoPyspark())
"""


def test_spark_without_pyspark_says_how_to_install_it_in_one_line(tmp_path):
    done = run_cli_score(dict(os.environ), tmp_path, prelude=BLOCK_PYSPARK)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "needs pyspark" in lines[0]
    assert "pip install 'stageflow[spark]'" in lines[0]
