"""The ledger's chain: a missing, altered or older entry is found and said in one line.

The first tests check :func:`registry.ledger.verify` on entries built here (no server);
the rest delete and edit ledger runs on a real tracking server, as a user could.
"""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

import registry
from registry import ledger
from registry.status import checked_history


def chained(count: int) -> tuple[list[ledger.Entry], ledger.Head]:
    """``count`` closed entries chained as the ledger writes them, and their head."""
    entries, prev = [], ""
    for seq in range(1, count + 1):
        entry = ledger.Entry("m", str(seq), "Staging", "Production", "promote", "a", "r")
        entry.run_id, entry.seq, entry.prev = f"run{seq}", seq, prev
        entry.digest = ledger.digest(entry.run_id, ledger._tags(entry), seq, prev)
        entry.recomputed = entry.digest
        entries.append(entry)
        prev = entry.digest
    top = entries[-1]
    return entries, ledger.Head(top.seq, top.digest, top.run_id)


def test_an_intact_chain_has_no_problems():
    entries, head = chained(3)
    assert ledger.verify(entries, head) == ([], "")


def test_a_deleted_entry_in_the_middle_is_named_by_its_number():
    entries, head = chained(3)
    problems, _ = ledger.verify([entries[0], entries[2]], head)
    assert problems == [
        "ledger entry 2 before entry 3 (ledger run run3) is missing (its run was deleted); "
        "see `stageflow history`"
    ]


def test_a_deleted_last_entry_is_found_through_the_head():
    entries, head = chained(3)
    problems, _ = ledger.verify(entries[:2], head)
    assert len(problems) == 1
    assert "ledger entry 3 after entry 2 is missing" in problems[0]


def test_an_altered_entry_is_found_by_its_digest():
    entries, head = chained(3)
    entries[1].recomputed = "0" * 64  # its tags no longer hash to what was written
    problems, _ = ledger.verify(entries, head)
    assert problems == [
        "entry 2 (ledger run run2) was altered after it was written (its digest does not match)"
    ]


def test_entries_older_than_the_chain_are_read_and_said_to_be_unchecked():
    old = ledger.Entry("m", "1", "None", "Staging", "promote", "a", "r", run_id="old")
    entries, head = chained(1)
    problems, note = ledger.verify([old, *entries], head)
    assert problems == []
    assert note == (
        "1 ledger entry predates the chain and cannot be checked; it starts at entry 1 "
        "(ledger run run1)"
    )


# -- on a real tracking server -------------------------------------------------------


@pytest.fixture
def three_entries(tracking_uri, register_versions, model_name) -> str:
    register_versions(model_name)
    registry.promote(model_name, 1, "Staging", "first")
    registry.promote(model_name, 1, "Production", "ship")
    registry.promote(model_name, 2, "Staging", "next")
    assert registry.status(model_name).problems == []
    return model_name


@pytest.mark.slow
def test_a_deleted_ledger_run_is_reported_by_status_and_history(three_entries):
    name = three_entries
    client = MlflowClient()
    middle = registry.history(name)[1]
    client.delete_run(middle.run_id)

    problems = registry.status(name).problems
    assert [p for p in problems if "missing" in p] == [
        f"ledger entry {middle.seq} before entry {middle.seq + 1} (ledger run "
        f"{registry.history(name)[1].run_id}) is missing (its run was deleted); "
        "see `stageflow history`"
    ]
    entries, chain_problems, _ = checked_history(name)
    assert len(entries) == 2
    assert chain_problems == [p for p in problems if "missing" in p]


@pytest.mark.slow
def test_a_deleted_last_ledger_run_and_an_edited_one_are_reported(three_entries):
    name = three_entries
    client = MlflowClient()
    first, _, last = registry.history(name)
    client.set_tag(first.run_id, "stageflow.reason", "nobody shipped this")
    client.delete_run(last.run_id)

    problems = registry.status(name).problems
    assert any(f"entry 1 (ledger run {first.run_id}) was altered" in p for p in problems)
    assert any("ledger entry 3 after entry 2 is missing" in p for p in problems)


@pytest.mark.slow
def test_a_ledger_older_than_the_chain_still_reads_and_the_chain_starts_after_it(
    tracking_uri, register_versions, model_name
):
    name = model_name
    register_versions(name)
    client = MlflowClient()
    registry.promote(name, 1, "Staging", "first")
    registry.promote(name, 1, "Production", "ship")
    # As an older Stageflow wrote them: no number, no digests, no head on the model.
    for entry in ledger.entries(client, name, include_all=True):
        for key in ("seq", "prev", "digest", "server_time", "lock_generation"):
            client.delete_tag(entry.run_id, f"stageflow.{key}")
    client.delete_registered_model_tag(name, ledger.HEAD_TAG)
    st = registry.status(name)
    assert st.problems == []
    assert st.notes == [
        "2 ledger entries predate the chain and cannot be checked; it starts at the next transition"
    ]
    assert st.production == "1"

    registry.promote(name, 2, "Staging", "next")
    history = registry.history(name)
    assert [(e.version, e.seq) for e in history] == [("1", 0), ("1", 0), ("2", 1)]
    st = registry.status(name)
    assert st.problems == []
    assert st.notes == [
        "2 ledger entries predate the chain and cannot be checked; it starts at entry 1 "
        f"(ledger run {history[-1].run_id})"
    ]
