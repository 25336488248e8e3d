"""Batch scoring's pure parts: the input digest of a directory, the Spark engine's checks."""

from __future__ import annotations

import os

import numpy as np
import pytest

from serving import _spark
from serving.batch import _runs, data_files, input_digest
from stageflow.errors import UsageError
from stageflow.files import file_digest


def parts(folder, sizes):
    folder.mkdir(exist_ok=True)
    for i, size in enumerate(sizes):
        (folder / f"part-{i:05d}.parquet").write_bytes(b"x" * size)
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-00000.parquet.crc").write_text("checksum")
    return folder


def test_a_file_digest_is_the_sha256_of_its_bytes(tmp_path):
    source = tmp_path / "in.csv"
    source.write_text("a\n1\n")
    assert input_digest(source) == file_digest(source)


def test_a_directory_digest_follows_its_data_files_names_and_sizes(tmp_path):
    first = input_digest(parts(tmp_path / "a", [10, 20]))
    assert input_digest(parts(tmp_path / "b", [10, 20])) == first  # same listing
    assert input_digest(parts(tmp_path / "c", [10, 21])) != first  # a part grew
    assert input_digest(parts(tmp_path / "d", [10, 20, 5])) != first  # a part more
    (tmp_path / "a" / "_SUCCESS").write_text("markers are not data")
    assert input_digest(tmp_path / "a") == first


def test_data_files_skip_markers_and_hidden_files(tmp_path):
    folder = parts(tmp_path / "in", [1, 1])
    assert [p.name for p in data_files(folder)] == ["part-00000.parquet", "part-00001.parquet"]


def test_spark_inputs_must_be_one_format_and_outputs_new_directories(tmp_path):
    folder = parts(tmp_path / "in", [1])
    (folder / "extra.csv").write_text("a\n1\n")
    with pytest.raises(
        UsageError, match=r"must be \.csv or \.parquet files \(found \.csv, \.parquet"
    ):
        _spark.check_paths(folder, tmp_path / "out")
    (folder / "extra.csv").unlink()
    with pytest.raises(UsageError, match="Spark writes a directory of Parquet parts"):
        _spark.check_paths(folder, tmp_path / "out.csv")
    (tmp_path / "taken").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        _spark.check_paths(folder, tmp_path / "taken")
    with pytest.raises(UsageError, match="holds no data files"):
        _spark.check_paths(parts(tmp_path / "empty", []), tmp_path / "out")


@pytest.mark.parametrize(
    ("task", "target", "types"),
    [
        ("regression", {"min": 0.0, "max": 1.0}, ("double", "double")),
        ("classification", {"classes": [0, 1, 2]}, ("double", "long")),
        ("classification", {"classes": [False, True]}, ("double", "boolean")),
        ("classification", {"classes": ["no", "yes"]}, ("string", "string")),
    ],
)
def test_predictions_keep_their_type_through_the_udf(task, target, types):
    assert _spark._prediction_types({"task": task, "target": target}) == types


def test_java_home_wins_over_path_as_spark_submit_does(tmp_path, monkeypatch):
    java = tmp_path / "bin" / "java"
    java.parent.mkdir()
    java.write_text("#!/bin/sh\n")
    os.chmod(java, 0o755)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    assert _spark.java_executable() == str(java)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "nothing"))
    assert _spark.java_executable() is None


def test_runs_of_accepted_rows_keep_their_row_numbers():
    mask = np.array([True, True, False, True, False, False, True])
    assert [(int(a), int(b)) for a, b in _runs(mask)] == [(0, 2), (3, 4), (6, 7)]
    assert _runs(np.array([False, False])) == []
