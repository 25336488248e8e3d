"""The command line as users meet it: exit codes, one-line errors, --json on stdout.

The tests of usage, --help and an unreachable server run ``python -m stageflow`` itself;
those against a real server run the same ``stageflow.cli.main`` in this interpreter
(``tests.helpers.in_process``): their subject is each command's behaviour, not the start
of a process, which costs ~3 s of importing MLflow per call.
"""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from stageflow import processes
from stageflow.cli.status import version_line
from tests.helpers import in_process


def stageflow(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "stageflow", *args],
        capture_output=True,
        text=True,
        env=processes.venv_env(env or {}),
        timeout=timeout,
    )


def assert_one_line_error(result, code: int, *fragments: str):
    # In-process too, a traceback is never swallowed: an exception main() lets out fails
    # the test where it is raised, and a logged one reaches the captured stderr.
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("stageflow")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["train", "--target", "y"], "--data"),
        (
            ["train", "--data", "builtin:wine", "--target", "target", "--family", "svm"],
            "invalid choice",
        ),
        (["promote", "--model", "m", "--version", "x", "--to", "Staging"], "not a whole number"),
        (["promote", "--model", "m", "--version", "0", "--to", "Staging"], "at least 1"),
        (["serve", "--model", "m", "--port", "70000"], "not a TCP port"),
        (["serve", "--model", "m", "--inference-log", "sample:2"], "sample:FRACTION"),
        (["serve", "--model", "m", "--log-retention", "forever"], "500MB,7d"),
        (["tune", "--data", "builtin:wine"], "--target"),
        (["deploy"], "invalid choice"),
    ],
)
def test_bad_usage_exits_2_with_one_line(args, fragment):
    assert_one_line_error(stageflow(*args), 2, fragment)


# Checked in a fresh interpreter by stageflow.cli.main, which then reports what it imported.
_IMPORTED_AFTER = """
import json, sys
from stageflow.cli import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as exit_:
    code = exit_.code
print(json.dumps({"code": code, "heavy": sorted({"mlflow", "pandas"} & set(sys.modules))}))
"""


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["monitor", "--model", "m", "--since", "5q"], "--since"),
        (["watch", "--model", "m", "--every", "15min"], "--every"),
        (["serve", "--model", "m", "--inference-log", "sample:2"], "--inference-log"),
        (["serve", "--model", "m", "--log-retention", "forever"], "--log-retention"),
    ],
)
def test_a_bad_period_or_log_setting_is_refused_before_mlflow_is_imported(args, fragment):
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTED_AFTER, json.dumps(args)],
        capture_output=True,
        text=True,
        env=processes.venv_env({}),
        timeout=120,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"code": 2, "heavy": []}, done.stderr
    assert fragment in done.stderr


def test_help_teaches_the_commands():
    result = stageflow("--help")
    assert result.returncode == 0
    for command in (
        "server",
        "train",
        "promote",
        "rollback",
        "status",
        "history",
        "serve",
        "score",
    ):
        assert command in result.stdout
    train_help = stageflow("train", "--help").stdout
    assert "builtin:breast_cancer" in train_help
    assert "--param KEY=VALUE" in train_help


def test_an_unreachable_tracking_server_names_the_uri_and_the_fix(capsys):
    port = processes.free_port()
    uri = f"http://127.0.0.1:{port}"
    for args in (
        ["status", "--model", "m"],
        ["train", "--data", "builtin:wine", "--target", "target"],
        ["promote", "--model", "m", "--version", "1", "--to", "Staging"],
    ):
        result = in_process(capsys, *args, "--tracking-uri", uri, env={})
        assert_one_line_error(result, 1, uri, "stageflow server start")
    # The environment variable is honoured the same way.
    result = in_process(capsys, "history", "--model", "m", env={"MLFLOW_TRACKING_URI": uri})
    assert_one_line_error(result, 1, uri)


def test_status_indents_a_descriptions_later_lines_under_its_version():
    description = "random forest trained on wine\ngates: accuracy ok\n\nschema ok"
    lines = version_line({"version": "12", "stage": "Staging", "description": description})
    assert lines.splitlines() == [
        "      12  Staging     random forest trained on wine",
        "                      gates: accuracy ok",
        "",
        "                      schema ok",
    ]
    assert version_line({"version": "3", "stage": "None", "description": ""}) == "       3  None"


@pytest.mark.slow
class TestAgainstARealServer:
    @pytest.fixture(autouse=True)
    def _server(self, tracking_uri, capsys):
        self.env = {"MLFLOW_TRACKING_URI": tracking_uri}
        self.capsys = capsys

    def run(self, *args):
        return in_process(self.capsys, *args, env=self.env)

    def test_train_errors_are_usage_errors(self, tmp_path):
        assert_one_line_error(
            self.run("train", "--data", "builtin:wine", "--target", "nope"),
            2,
            "target column 'nope' is not in the data",
            "alcohol",
        )
        assert_one_line_error(
            self.run("train", "--data", str(tmp_path / "gone.csv"), "--target", "y"),
            2,
            "does not exist",
        )
        assert_one_line_error(
            self.run("train", "--data", "builtin:nope", "--target", "y"), 2, "unknown built-in"
        )
        assert_one_line_error(
            self.run("train", "--data", "builtin:wine", "--target", "target", "--param", "depth=3"),
            2,
            "unknown parameter(s) depth",
        )

    def test_train_json_is_one_object_on_stdout(self, model_name):
        result = self.run(
            "train",
            "--data",
            "builtin:diabetes",
            "--target",
            "target",
            "--family",
            "lr",
            "--model-name",
            model_name,
            "--json",
        )
        assert result.returncode == 0, result.stderr
        payload = json.loads(result.stdout)
        assert {"run_id", "model_name", "version", "metrics"} <= set(payload)
        assert payload["model_name"] == model_name
        assert payload["version"] == "1"
        assert payload["metrics"]["test_rmse"] > 0

    def test_train_reports_the_data_check_and_strict_refuses_leakage(self, tmp_path, model_name):
        rng = np.random.default_rng(0)
        rows = 400
        x = rng.normal(size=rows)
        frame = pd.DataFrame(
            {
                "주문 번호": [f"A-{i:05d}" for i in range(rows)],
                "x": x,
                "label": (x + rng.normal(scale=0.7, size=rows) > 0).astype(int),
            }
        )
        frame["copy"] = frame["label"].map({0: "no", 1: "yes"})
        path = tmp_path / "orders.csv"
        frame.to_csv(path, index=False)
        common = ("train", "--data", str(path), "--target", "label", "--family", "lr")
        common += ("--model-name", model_name)

        refused = self.run(*common, "--strict")
        assert_one_line_error(refused, 2, "--strict", "'copy' alone scores")

        trained = self.run(*common, "--id-column", "x", "--json")
        assert trained.returncode == 0, trained.stderr
        report = json.loads(trained.stdout)["data_check"]
        assert report["dropped"]["identifier"] == ["주문 번호", "x"]
        assert report["declared_identifiers"] == ["x"]
        assert [leak["column"] for leak in report["leakage"]] == ["copy"]
        assert "'주문 번호'" in trained.stderr  # the warning names the dropped column

        prose = self.run(*common)
        assert prose.returncode == 0, prose.stderr
        assert "data check: identifier(s) '주문 번호' dropped" in prose.stdout

        assert_one_line_error(self.run(*common, "--id-column", "nope"), 2, "'nope' is not in")

    def test_registry_commands_and_their_errors(self, register_versions, model_name):
        register_versions(model_name)
        assert_one_line_error(
            self.run("promote", "--model", "absent-model", "--version", "1", "--to", "Staging"),
            2,
            "no registered model named 'absent-model'",
        )
        assert_one_line_error(
            self.run("promote", "--model", model_name, "--version", "9", "--to", "Staging"),
            2,
            "has no version 9",
        )
        assert_one_line_error(
            self.run("promote", "--model", model_name, "--version", "1", "--to", "Prod"),
            2,
            "unknown stage 'Prod'",
        )
        assert_one_line_error(
            self.run("promote", "--model", model_name, "--version", "1", "--to", "Production"),
            1,
            "refused",
            "promote it to Staging first",
        )
        assert_one_line_error(
            self.run("rollback", "--model", model_name), 1, "no Production version"
        )

        staged = self.run(
            "promote", "--model", model_name, "--version", "1", "--to", "Staging", "--json"
        )
        assert staged.returncode == 0, staged.stderr
        assert json.loads(staged.stdout)["to_stage"] == "Staging"
        shipped = self.run(
            "promote",
            "--model",
            model_name,
            "--version",
            "1",
            "--to",
            "Production",
            "--reason",
            "ship it",
        )
        assert shipped.returncode == 0, shipped.stderr
        assert "Staging → Production" in shipped.stdout

        status = json.loads(self.run("status", "--model", model_name, "--json").stdout)
        assert (status["production"], status["aliases"]["champion"]) == ("1", "1")
        history = json.loads(self.run("history", "--model", model_name, "--json").stdout)
        assert [e["to_stage"] for e in history["entries"]] == ["Staging", "Production"]
        assert history["entries"][-1]["reason"] == "ship it"

        human = self.run("status", "--model", model_name)
        assert "Production: version 1" in human.stdout

    def test_score_errors(self, tmp_path, register_versions, model_name):
        register_versions(model_name)
        good = tmp_path / "in.csv"
        good.write_text("a\n1\n")
        assert_one_line_error(
            self.run(
                "score",
                "--model",
                model_name,
                "--input",
                str(tmp_path / "x.csv"),
                "--output",
                str(tmp_path / "o.csv"),
            ),
            2,
            "does not exist",
        )
        assert_one_line_error(
            self.run(
                "score",
                "--model",
                model_name,
                "--input",
                str(good),
                "--output",
                str(tmp_path / "o.json"),
            ),
            2,
            ".csv or .parquet",
        )
        assert_one_line_error(
            self.run(
                "score",
                "--model",
                model_name,
                "--input",
                str(good),
                "--output",
                str(tmp_path / "o.csv"),
            ),
            1,
            "has no Production version",
        )


@pytest.mark.slow
def test_a_command_run_in_process_leaves_this_interpreter_as_it_found_it(
    tracking_uri, model_name, capsys
):
    """What ``in_process`` promises the tests above: a call's changes end with it, as a
    process's would (MLflow's URIs and experiment, the variables MLflow exports for them,
    logging, warning filters)."""
    import logging
    import os
    import warnings

    import mlflow
    from mlflow.tracking import fluent

    def state():
        loggers = logging.Logger.manager.loggerDict.items()
        return (
            dict(os.environ),
            mlflow.get_tracking_uri(),
            mlflow.get_registry_uri(),
            fluent._active_experiment_id,
            list(logging.getLogger().handlers),
            # Set levels: the loggers of modules first imported in the call are unset.
            {n: lg.level for n, lg in loggers if isinstance(lg, logging.Logger) and lg.level},
            list(warnings.filters),
        )

    before = state()
    # Another spelling of the same server, so that MLflow's URI visibly changes in the call.
    env = {"MLFLOW_TRACKING_URI": tracking_uri + "/"}
    trained = in_process(
        capsys, "train", "--data", "builtin:wine", "--target", "target", "--family", "lr",
        "--model-name", model_name, "--json", env=env,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["model_name"] == model_name
    assert state() == before
