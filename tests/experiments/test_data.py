"""Data sources, task detection and splits (no server needed)."""

import numpy as np
import pandas as pd
import pytest

from experiments import data
from stageflow.errors import UsageError


@pytest.mark.parametrize(
    ("name", "task"),
    [("breast_cancer", "classification"), ("wine", "classification"), ("diabetes", "regression")],
)
def test_builtin_sets_load_with_a_target_column_and_their_task(name, task):
    frame = data.load(f"builtin:{name}")
    X, y, detected = data.features_and_target(frame, "target")
    assert detected == task
    assert "target" not in X.columns
    assert len(X) == len(y) > 100


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(UsageError, match="choose one of: breast_cancer, diabetes"):
        data.load("builtin:nope")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        data.load(str(tmp_path / "absent.csv"))


def test_unsupported_suffix_is_refused(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(UsageError, match=r"neither builtin:NAME nor a \.csv or \.parquet"):
        data.load(str(path))


def test_unreadable_parquet_is_a_usage_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_text("not parquet")
    with pytest.raises(UsageError, match="cannot read"):
        data.load(str(path))


def test_missing_target_lists_the_columns():
    frame = pd.DataFrame({"a": [1, 2], "b c": [3, 4]})
    with pytest.raises(UsageError, match="its columns are: a, b c"):
        data.features_and_target(frame, "y")


def test_rows_without_a_target_are_dropped():
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "y": [0, None, 1, 0]})
    X, y, _ = data.features_and_target(frame, "y")
    assert len(X) == 3
    assert y.notna().all()


@pytest.mark.parametrize(
    ("values", "task"),
    [
        (["a", "b", "a"], "classification"),
        ([True, False, True], "classification"),
        ([0, 1, 2, 1], "classification"),
        ([0.5, 1.25, 3.0, 7.5], "regression"),
        (list(range(100)), "regression"),
    ],
)
def test_task_follows_the_target(values, task):
    assert data.detect_task(pd.Series(values)) == task


def test_regression_on_a_string_target_is_refused():
    frame = pd.DataFrame({"x": [1.0, 2.0], "y": ["a", "b"]})
    with pytest.raises(UsageError, match="regression needs a numeric target"):
        data.features_and_target(frame, "y", task="regression")


def test_split_is_deterministic_for_a_seed_and_disjoint():
    X, y, task = data.features_and_target(data.load("builtin:wine"), "target")
    first, again = data.split(X, y, task, seed=7), data.split(X, y, task, seed=7)
    other = data.split(X, y, task, seed=8)
    assert first.X_test.index.equals(again.X_test.index)
    assert not first.X_test.index.equals(other.X_test.index)
    parts = [set(first.X_train.index), set(first.X_val.index), set(first.X_test.index)]
    assert sum(map(len, parts)) == len(X)
    assert not parts[0] & parts[1]
    assert not parts[0] & parts[2]
    assert not parts[1] & parts[2]


def test_digest_changes_with_content_not_with_index():
    frame = pd.DataFrame({"a": np.arange(5.0), "b": list("vwxyz")})
    assert data.digest(frame) == data.digest(frame.set_axis(range(10, 15)))
    changed = frame.copy()
    changed.loc[0, "a"] = 99.0
    assert data.digest(changed) != data.digest(frame)
