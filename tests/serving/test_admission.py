"""What a replica admits, decided on given bodies (``serving/_admission.py``); no server."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from serving._admission import (
    CSV,
    JSON,
    MAX_DECODED_BYTES,
    PARQUET,
    Refusal,
    count_rows,
    is_stageflow_error,
    replacement,
    shorten,
)


def parquet(frame: pd.DataFrame, **options) -> bytes:
    out = io.BytesIO()
    frame.to_parquet(out, index=False, **options)
    return out.getvalue()


def refused(body: bytes, content_type: str, max_rows: int = 100) -> Refusal:
    with pytest.raises(Refusal) as caught:
        count_rows(body, content_type, max_rows)
    return caught.value


@pytest.mark.parametrize(
    ("body", "rows"),
    [
        ({"dataframe_split": {"columns": ["a"], "data": [[1], [2], [3]]}}, 3),
        ({"dataframe_records": [{"a": 1}, {"a": 2}]}, 2),
        ({"instances": [{"a": 1}]}, 1),
        ({"inputs": {"a": [1, 2, 3, 4], "b": [1, 2, 3, 4]}}, 4),
        ({"inputs": {"a": 1}}, 1),
    ],
)
def test_json_rows_are_counted_in_every_request_format(body, rows):
    assert count_rows(json.dumps(body).encode(), JSON) == rows


def test_more_rows_than_the_cap_are_refused_413_pointing_at_batch_scoring():
    body = json.dumps({"dataframe_split": {"columns": ["a"], "data": [[1]] * 101}}).encode()

    refusal = refused(body, JSON, max_rows=100)

    assert refusal.status == 413
    assert refusal.body["error_code"] == "TOO_MANY_ROWS"
    assert "101 rows" in refusal.body["message"]
    assert "stageflow score" in refusal.body["message"]


def test_csv_rows_are_its_lines_under_the_header():
    assert count_rows(b"a,b\n1,2\n3,4\n", CSV) == 2
    assert count_rows(b"a,b\n1,2\n3,4", CSV) == 2
    assert refused(b"a\n" + b"1\n" * 101, CSV).status == 413


def test_a_small_parquet_body_that_decodes_to_a_million_rows_is_refused_from_its_footer():
    body = parquet(pd.DataFrame({"a": np.zeros(1_000_000)}), compression="zstd")
    assert len(body) < 64 * 1024  # it is the small file of the issue

    refusal = refused(body, PARQUET, max_rows=10_000)

    assert (refusal.status, refusal.body["problem"]) == (413, "too_many_rows")
    assert "1000000 rows" in refusal.body["message"]


def test_a_parquet_dictionary_of_one_long_value_on_every_row_is_refused_as_too_large():
    # 2,000 rows of one 64 KiB text: a few KB of file, 128 MiB once decoded.
    body = parquet(pd.DataFrame({"a": ["x" * 65536] * 2000}), compression="zstd")
    assert len(body) < MAX_DECODED_BYTES // 1000

    refusal = refused(body, PARQUET, max_rows=10_000)

    assert (refusal.status, refusal.body["problem"]) == (413, "decodes_too_large")


def test_an_ordinary_parquet_request_passes_with_its_rows():
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0], "region": ["a", "b", "a"]})
    assert count_rows(parquet(frame), PARQUET) == 3


@pytest.mark.parametrize(
    ("body", "content_type", "problem"),
    [
        (b"[" * 5000 + b"]" * 5000, JSON, "too_deeply_nested"),
        (b"{not json", JSON, "not_json"),
        (b"\xff\xfe\xfa", JSON, "not_json"),
        (b"[1, 2]", JSON, "wrong_shape"),
        (b'{"rows": [1]}', JSON, "wrong_shape"),
        (b'{"inputs": [1], "instances": [1]}', JSON, "wrong_shape"),
        (b"PAR1 not really", PARQUET, "not_parquet"),
    ],
)
def test_an_unreadable_body_is_refused_400_without_quoting_it(body, content_type, problem):
    refusal = refused(body, content_type)

    assert (refusal.status, refusal.body["problem"]) == (400, problem)
    assert body.decode("latin-1")[:8] not in refusal.body["message"]


def test_error_answers_not_in_stageflows_shape_are_told_apart_and_replaced():
    guard = {"error_code": "INVALID_INPUT", "message": "row 0 ...", "problem": "wrong_type"}
    assert is_stageflow_error(json.dumps(guard).encode())
    mlflow_echo = {"error_code": "BAD_REQUEST", "message": "Input: \nSECRET"}
    assert not is_stageflow_error(json.dumps(mlflow_echo).encode())
    assert not is_stageflow_error(b"Internal Server Error")

    for status in (400, 415, 500, 504):
        assert is_stageflow_error(replacement(status))


def test_a_long_name_is_shortened_for_a_message():
    assert shorten("a" * 10_000) == "a" * 63 + "…"
    assert shorten("나이") == "나이"
