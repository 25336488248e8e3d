"""The inference log's writer without servers: buffering, segments, rotation, drops, retention."""

from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from serving import inference_log
from serving.guarded_model import Guard, Rejected, learn_contract
from serving.inference_log import InferenceLog, LogSettings, Request, parse_mode, parse_retention

NUMERIC, CATEGORICAL = ["a", "b"], ["colour"]


def settings(tmp_path, **kwargs) -> LogSettings:
    return LogSettings(model="wine", version="3", directory=str(tmp_path), upload=False, **kwargs)


def answered(request_id: str, rows: int = 2, start: float = 0.0) -> Request:
    request = Request(request_id)
    request.numeric = np.arange(rows * 2, dtype=float).reshape(rows, 2) + start
    request.categorical = [np.array(["red", None] * (rows // 2) + ["red"] * (rows % 2), object)]
    request.predictions = np.arange(rows) % 3
    request.finish(200)
    return request


def segments(tmp_path) -> list:
    return sorted(tmp_path.glob("*.parquet"))


def read(tmp_path) -> pd.DataFrame:
    return pd.concat([pq.read_table(p).to_pandas() for p in segments(tmp_path)], ignore_index=True)


@pytest.fixture
def writers():
    started: list[InferenceLog] = []
    yield started
    for log in started:
        log.close(timeout=5)


def start(writers, log: InferenceLog) -> InferenceLog:
    writers.append(log.start())
    return log


def test_modes_and_retention_parse_and_bad_values_name_the_accepted_forms():
    assert parse_mode("off") == 0.0
    assert parse_mode("all") == 1.0
    assert parse_mode("sample:0.25") == 0.25
    for bad in ("sample:0", "sample:2", "some", "sample:x"):
        with pytest.raises(ValueError, match="sample:FRACTION"):
            parse_mode(bad)
    assert parse_retention("500MB,7d") == (500 * 10**6, 7 * 86400.0)
    assert parse_retention("2h") == (None, 7200.0)
    with pytest.raises(ValueError, match="500MB,7d"):
        parse_retention("forever")


def test_rows_are_written_in_the_contract_schema_with_refusals_and_flags(tmp_path, writers):
    log = start(writers, InferenceLog(settings(tmp_path), NUMERIC, CATEGORICAL))
    accepted = answered("r-1", rows=2)
    accepted.ids = np.array([101, 102], dtype=object)
    accepted.problems = np.array([None, "unknown_category"], dtype=object)
    refused = Request("r-2")
    refused.refuse("above_range", 4)
    refused.finish(400)
    failed = Request("r-3")
    failed.finish(400)  # refused before the guard saw it (a body that is not JSON)
    for request in (accepted, refused, failed):
        assert log.record(request)
    log.flush()

    table = pq.read_table(segments(tmp_path)[0])
    assert table.schema.field("time").type.tz == "UTC"
    assert table.schema.field("prediction").type == "string"
    assert table.schema.field("input.a").type == "double"
    assert table.schema.field("input.colour").type == "string"
    rows = table.to_pandas()
    assert rows.request_id.tolist() == ["r-1", "r-1", "r-2", "r-3"]
    assert rows.row.tolist() == [0, 1, 4, -1]
    assert rows.outcome.tolist() == ["accepted", "flagged", "refused", "refused"]
    assert rows.problem.tolist()[1:] == ["unknown_category", "above_range", "http_400"]
    assert rows.id.tolist()[:2] == ["101", "102"]
    assert rows.prediction.tolist()[:2] == ["0", "1"]
    assert rows["input.a"].tolist()[:2] == [0.0, 2.0]
    assert rows["input.colour"].tolist()[0] == "red"
    assert rows["input.colour"].isna()[1]
    assert rows["input.a"].isna()[2:].all()
    assert (rows.model == "wine").all()
    assert (rows.version == "3").all()
    assert (rows.source == "online").all()
    assert (rows.latency_ms >= 0).all()


def test_buffered_rows_are_flushed_within_the_flush_interval_without_being_asked(tmp_path, writers):
    log = start(writers, InferenceLog(settings(tmp_path, flush_seconds=0.2), NUMERIC, CATEGORICAL))
    log.record(answered("r-1"))
    deadline = time.monotonic() + 30
    while not segments(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(read(tmp_path)) == 2


def test_closing_writes_what_is_buffered(tmp_path):
    log = InferenceLog(settings(tmp_path, flush_seconds=3600), NUMERIC, CATEGORICAL).start()
    log.record(answered("r-1", rows=5))
    log.close()
    assert len(read(tmp_path)) == 5
    assert log.written == 5


def test_segments_rotate_at_the_row_bound_and_names_sort_by_time(tmp_path, writers, monkeypatch):
    monkeypatch.setattr(inference_log, "SEGMENT_ROWS", 4)
    log = start(writers, InferenceLog(settings(tmp_path, flush_seconds=3600), NUMERIC, CATEGORICAL))
    for i in range(6):
        log.record(answered(f"r-{i}", rows=2))
    log.flush()
    names = [p.name for p in segments(tmp_path)]
    assert len(names) == 3
    assert names == sorted(names)
    assert all(f"-online-{os.getpid()}-" in name for name in names)
    assert read(tmp_path).request_id.tolist() == [f"r-{i}" for i in range(6) for _ in range(2)]


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path, caplog):
    log = InferenceLog(settings(tmp_path), NUMERIC, CATEGORICAL, queue_requests=2)  # not started
    results = [log.record(answered(f"r-{i}", rows=3)) for i in range(5)]
    assert results == [True, True, False, False, False]
    assert log.dropped == 9
    assert "dropped 3 row(s) so far" in caplog.text  # said once, not per request


def test_the_row_bound_of_the_queue_drops_large_requests(tmp_path):
    log = InferenceLog(settings(tmp_path), NUMERIC, CATEGORICAL, queue_rows=10)
    assert log.record(answered("small", rows=8))
    assert not log.record(answered("large", rows=8))
    assert log.dropped == 8


def test_an_unwritable_directory_drops_and_counts_and_never_raises(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    log = InferenceLog(
        LogSettings(model="m", version="1", directory=str(blocker / "log"), upload=False),
        NUMERIC,
        CATEGORICAL,
    ).start()
    assert log.record(answered("r-1", rows=3))
    log.flush()
    log.close()
    assert log.dropped == 3
    assert log.written == 0
    assert "dropped 3 row(s)" in caplog.text


def test_retention_deletes_segments_past_the_age_then_the_oldest_past_the_size(tmp_path):
    log = InferenceLog(settings(tmp_path, retention="1kb,1h"), NUMERIC, CATEGORICAL)
    old = tmp_path / "20200101T000000000000Z-online-1-000001.parquet"
    kept = [tmp_path / f"2026120{i}T000000000000Z-online-1-000001.parquet" for i in (1, 2, 3)]
    for path in (old, *kept):
        path.write_bytes(b"\0" * 400)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    log._apply_retention()
    assert not old.exists()
    assert [p.exists() for p in kept] == [False, True, True]  # 1200 bytes > 1 kB: oldest goes


def test_a_segment_deleted_before_upload_counts_its_rows_as_dropped(tmp_path):
    log = InferenceLog(  # not started: the segment waits for an uploader that never runs
        LogSettings(model="m", version="1", directory=str(tmp_path), retention="1b"),
        NUMERIC,
        CATEGORICAL,
    )
    log._write_segment([answered("r-1", rows=4)], 4)
    assert log.written == 4
    log._apply_retention()
    assert segments(tmp_path) == []
    assert log.dropped == 4


def test_sampling_keeps_about_the_fraction_asked():
    log = InferenceLog(LogSettings(model="m", version="1", mode="sample:0.2"), [], [])
    kept = sum(log.sampled() for _ in range(20_000))
    assert 3_000 < kept < 5_000
    assert not any(
        InferenceLog(LogSettings(model="m", version="1", mode="off"), [], []).sampled()
        for _ in range(100)
    )


def test_batch_rows_are_logged_from_a_frame_with_their_file_row_numbers(tmp_path, writers):
    log = start(
        writers,
        InferenceLog(settings(tmp_path, source="batch"), NUMERIC, CATEGORICAL, classify=False),
    )
    frame = pd.DataFrame({"a": [1.0, None], "b": [2.0, 3.0], "colour": ["red", None]})
    log.record_frame(frame, np.array([0.5, 1.5]), request_id="run-1", first_row=100, ids=["x", "y"])
    log.flush()
    rows = read(tmp_path)
    assert rows.row.tolist() == [100, 101]
    assert rows.prediction.tolist() == [0.5, 1.5]
    assert rows.source.unique().tolist() == ["batch"]
    assert rows.latency_ms.isna().all()
    assert rows["input.a"].isna().tolist() == [False, True]
    assert rows.id.tolist() == ["x", "y"]


def test_the_guard_accepts_and_drops_ignored_columns_but_still_refuses_strangers():
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]})
    contract = learn_contract(frame, pd.Series([0, 1]), "classification", ["a", "b"], [])
    guard = Guard(contract, {"unknown_category": "reject", "abnormal_output": "reject"}, ["oid"])
    numeric, _, _ = guard.check(frame.assign(oid=["x", "y"]))
    assert numeric.tolist() == [[1.0, 3.0], [2.0, 4.0]]
    with pytest.raises(Rejected, match="not a column the model was trained on"):
        guard.check(frame.assign(stranger=[1, 2]))
