"""The CLI's argument handling, in-process: a bad value exits 2 with one line naming it.

These run `stageflow.cli.main` in this interpreter (no subprocess, no server); the
command-line tests in test_cli.py check the same contract from outside, end to end.
"""

import pytest

from stageflow.cli import main

TRAIN = ["train", "--data", "builtin:wine", "--target", "target"]
TUNE = ["tune", "--data", "builtin:wine", "--target", "target", "--n-trials", "2"]
PROMOTE = ["promote", "--model", "m", "--to", "Staging"]
SCORE = ["score", "--model", "m", "--input", "in.csv", "--output", "out.csv"]


def run(capsys, args: list[str]) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's way out
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(err: str, *fragments: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("stageflow")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["deploy"], "invalid choice: 'deploy'"),
        (["train", "--target", "y"], "the following arguments are required: --data"),
        ([*TRAIN, "--family", "svm"], "argument --family: invalid choice: 'svm'"),
        ([*TRAIN, "--task", "ranking"], "argument --task: invalid choice: 'ranking'"),
        ([*TRAIN, "--seed", "x"], "argument --seed: invalid int value: 'x'"),
        (TUNE[:-2], "the following arguments are required: --n-trials"),
        ([*TUNE[:-1], "0"], "argument --n-trials: must be at least 1, got 0"),
        ([*TUNE, "--workers", "two"], "argument --workers: 'two' is not a whole number"),
        ([*TUNE, "--timeout", "-5"], "argument --timeout: must be more than 0, got -5"),
        ([*TUNE, "--timeout", "soon"], "argument --timeout: 'soon' is not a number"),
        ([*TUNE, "--folds", "0"], "argument --folds: must be at least 1"),
        ([*PROMOTE, "--version", "x"], "argument --version: 'x' is not a whole number"),
        ([*PROMOTE, "--version", "0"], "argument --version: must be at least 1, got 0"),
        (PROMOTE, "the following arguments are required: --version"),
        (["rollback", "--model", "m", "--to", "0"], "argument --to: must be at least 1"),
        (["rollback"], "the following arguments are required: --model"),
        (["status"], "the following arguments are required: --model"),
        (["history"], "the following arguments are required: --model"),
        (["serve", "--model", "m", "--port", "70000"], "70000 is not a TCP port (1-65535)"),
        (["serve", "--model", "m", "--replicas", "0"], "argument --replicas: must be at least 1"),
        (["serve", "--model", "m", "--max-rows", "0"], "argument --max-rows: must be at least 1"),
        (["serve", "--model", "m", "--max-concurrency", "x"], "'x' is not a whole number"),
        (["serve", "--model", "m", "--metrics-port", "http"], "'http' is not a whole number"),
        (
            ["serve", "--model", "m", "--unknown-category", "allow"],
            "argument --unknown-category: invalid choice: 'allow'",
        ),
        ([*SCORE, "--chunk-rows", "0"], "argument --chunk-rows: must be at least 1, got 0"),
        (
            [*SCORE, "--abnormal-output", "drop"],
            "argument --abnormal-output: invalid choice: 'drop'",
        ),
        (SCORE[:3], "the following arguments are required: --input, --output"),
        (["server"], "the following arguments are required: ACTION"),
        (["server", "start", "--port", "0"], "argument --port: must be at least 1, got 0"),
        (["server", "restart"], "invalid choice: 'restart'"),
        (["policy"], "the following arguments are required: ACTION"),
        (["policy", "set", "--model", "m"], "the following arguments are required: --file"),
        (["demo", "--serve-port", "99999"], "99999 is not a TCP port"),
    ],
)
def test_a_bad_argument_exits_2_with_one_line_naming_it(capsys, args, fragment):
    code, out, err = run(capsys, args)
    assert code == 2
    assert out == ""
    line = assert_one_line(err, fragment)
    assert line.endswith("--help`)")  # and where to read more


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("latency:\n  p99: 3\n", "unknown key latency.p99; valid: single_row_p95_ms"),
        ("latency:\n  repeats: 3\n  repeats: 5\n", "key 'repeats' is given twice"),
        ("comparison:\n  margin: .nan\n", "comparison.margin must be a finite number"),
        ("monitoring:\n  rollback: {cooldown: soon}\n", "'soon' is not a duration like"),
        ("thresholds:\n  accuracy: '=> 0.9'\n", "is not a rule like"),
    ],
)
def test_a_bad_policy_file_is_refused_before_any_server_is_asked(capsys, tmp_path, text, fragment):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    # An address nothing listens on: the file is judged before the server would be asked.
    args = ["policy", "set", "--model", "m", "--file", str(path), "--tracking-uri"]
    code, out, err = run(capsys, [*args, "http://127.0.0.1:9"])
    assert code == 2
    assert out == ""
    assert_one_line(err, f"stageflow policy: policy file {path}", fragment)


def test_a_missing_policy_file_is_named(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    args = ["policy", "set", "--model", "m", "--file", str(missing)]
    code, _, err = run(capsys, [*args, "--tracking-uri", "http://127.0.0.1:9"])
    assert code == 2
    assert_one_line(err, f"policy file {missing} does not exist")
