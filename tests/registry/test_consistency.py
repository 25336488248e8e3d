"""The registry stays consistent under racing promoters and faults mid-transition.

Real servers, real processes: six promoters race on SQLite and on PostgreSQL;
a promoter is killed mid-transition; changes made behind Stageflow's back are
flagged by ``status`` and fixed by ``repair``.
"""

import os
import signal
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

import registry
from registry import _lock, ledger
from registry._stages import move
from stageflow import processes, server
from stageflow.errors import StageflowError
from tests.helpers import assert_one_holder_per_stage
from tests.registry import promoter

pytestmark = pytest.mark.slow

PROMOTERS = 6


def race(uri: str, name: str, versions: list[str], stage: str, barrier: Path) -> list[dict]:
    """Start one promoter process per version, release them together, collect their results."""
    barrier.mkdir()
    procs = [promoter.start(uri, name, v, stage, barrier) for v in versions]
    try:
        processes.wait_until(
            lambda: len(list(barrier.glob("ready-*"))) == len(procs), timeout=120, what="promoters"
        )
        (barrier / "go").touch()
        for p in procs:
            p.join(timeout=240)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0] * len(procs), promoter.errors(barrier)
    return [promoter.result(barrier, v, stage) for v in versions]


def assert_serialised(client: MlflowClient, name: str, results: list[dict], stage: str) -> None:
    """The ledger shows the promotions one after another, each archiving the one before."""
    entries = registry.history(name)
    assert len(entries) == len(results)
    runs = sorted((client.get_run(e.run_id) for e in entries), key=lambda r: r.info.start_time)
    for earlier, later in zip(runs, runs[1:], strict=False):
        assert earlier.info.end_time <= later.info.start_time, "two transitions overlapped"
    by_run = {e.run_id: e for e in entries}
    chain = [by_run[r.info.run_id] for r in runs]
    assert chain[0].archived == []
    for before, after in zip(chain, chain[1:], strict=False):
        assert after.archived == [before.version], (before, after)
    assert assert_one_holder_per_stage(client, name)[stage] == chain[-1].version
    # What is left of the lock is released generations only.
    assert registry.status(name).lock is None


def test_six_concurrent_promoters_on_sqlite_leave_one_staging_version(
    tracking_uri, register_versions, model_name, tmp_path
):
    versions = register_versions(model_name) + register_versions(model_name)
    versions += register_versions(model_name)
    assert len(versions) == PROMOTERS
    results = race(tracking_uri, model_name, versions, "Staging", tmp_path / "barrier")
    assert sorted(r["version"] for r in results) == sorted(versions)
    assert all(r["changed"] for r in results)
    assert_serialised(MlflowClient(), model_name, results, "Staging")


@pytest.mark.postgres
def test_six_concurrent_promoters_on_postgresql_leave_one_staging_version(
    postgres_database, tmp_path, model_name, monkeypatch, untimed_policy
):
    from experiments.train import train

    info = server.start(
        port=processes.free_port(),
        backend_store_uri=postgres_database,
        home=tmp_path / "home",
        tie_to_parent=True,
    )
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", info.uri)
        trained = train("builtin:wine", "target", model_name, family="lr", tracking_uri=info.uri)
        client = MlflowClient(info.uri, info.uri)
        registry.set_policy(model_name, untimed_policy, info.uri)
        source = client.get_model_version(model_name, trained.version).source
        versions = [trained.version] + [
            mlflow.register_model(source, model_name).version for _ in range(PROMOTERS - 1)
        ]
        results = race(info.uri, model_name, versions, "Staging", tmp_path / "barrier")
        assert sorted(r["version"] for r in results) == sorted(versions)
        assert_serialised(client, model_name, results, "Staging")
    finally:
        server.stop(tmp_path / "home")


def test_a_transition_cut_after_the_stage_write_is_explained_and_completed_by_rerunning(
    register_versions, model_name
):
    name = model_name
    register_versions(name)
    client = MlflowClient()
    registry.promote(name, 1, "Staging")
    # The promoter died after the registry moved the stage, before the alias followed.
    lease = _lock.acquire(client, name, "x")
    entry = ledger.begin(
        client, ledger.Entry(name, "1", "Staging", "Production", "promote", "x", ""), lease
    )
    lease.release()
    client.transition_model_version_stage(name, "1", "Production")

    problems = registry.status(name).problems
    assert any("was interrupted" in p and entry.run_id in p for p in problems)
    assert any("Production version 1 has no @champion alias" in p for p in problems)

    again = registry.promote(name, 1, "Production")
    assert not again.changed
    assert any("confirmed by repair" in line for line in again.repaired)
    assert assert_one_holder_per_stage(client, name) == {"Staging": None, "Production": "1"}
    assert registry.status(name).problems == []
    history = registry.history(name)
    assert [(e.action, e.to_stage) for e in history] == [
        ("promote", "Staging"),
        ("promote", "Production"),
        ("repair", "Staging"),  # the @challenger it removed
        ("repair", "Production"),  # the @champion it set
    ]
    assert history[1].run_id == entry.run_id


def test_a_promoter_killed_mid_gate_leaves_no_claim_and_rerunning_completes_it(
    tracking_uri, register_versions, model_name, tmp_path
):
    name = model_name
    register_versions(name)
    client = MlflowClient()
    registry.promote(name, 1, "Staging")
    registry.promote(name, 1, "Production")
    registry.promote(name, 2, "Staging")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    (barrier / "go").touch()
    proc = promoter.start(tracking_uri, name, "2", "Production", barrier)
    try:
        # Kill it once its ledger entry is open, i.e. while it holds the lock and runs gates.
        processes.wait_until(
            lambda: (
                any(
                    e.outcome == ledger.INTERRUPTED
                    for e in ledger.entries(client, name, include_all=True)
                )
                or not proc.is_alive()
            ),
            timeout=120,
            what="the promoter's ledger entry",
        )
        assert proc.is_alive(), f"the promoter ended (code {proc.exitcode}) before it was killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join()

    st = registry.status(name)
    assert any("was interrupted" in p for p in st.problems)
    assert st.lock is None  # its holder is dead, so the lock is free at once
    assert (st.production, st.staging) == ("1", "2")

    rerun = registry.promote(name, 2, "Production", "again")
    assert rerun.changed
    assert rerun.archived == ["1"]
    assert any("nothing happened" in line for line in rerun.repaired)
    everything = ledger.entries(client, name, include_all=True)
    killed = [e for e in everything if e.outcome == ledger.FAILED]
    assert len(killed) == 1
    assert "interrupted before the registry moved it" in killed[0].detail
    assert [(e.version, e.to_stage) for e in registry.history(name)][-1] == ("2", "Production")
    assert assert_one_holder_per_stage(client, name) == {"Staging": None, "Production": "2"}
    assert registry.status(name).problems == []


def test_repair_fixes_changes_made_outside_stageflow_and_records_them(two_in_production):
    name = two_in_production
    assert any("held by versions 1, 2" in p for p in registry.status(name).problems)

    fixed = registry.repair(name, reason="someone used the MLflow UI")

    assert fixed == ["Production: archived version 2 (a second Production holder)"]
    assert registry.status(name).problems == []
    assert assert_one_holder_per_stage(MlflowClient(), name)["Production"] == "1"
    last = registry.history(name)[-1]
    assert (last.action, last.reason) == ("repair", "someone used the MLflow UI")
    assert registry.repair(name) == []


@pytest.fixture
def two_in_production(register_versions, model_name):
    register_versions(model_name)
    client = MlflowClient()
    move(client, model_name, "1", "Production")
    # Behind Stageflow's back: a second Production version, no alias change.
    client.transition_model_version_stage(model_name, "2", "Production")
    return model_name


def test_the_lock_excludes_a_second_holder_until_released(
    tracking_uri, register_versions, model_name
):
    register_versions(model_name)
    client = MlflowClient()
    first = _lock.acquire(client, model_name, "first@test")
    try:
        started = time.monotonic()
        with pytest.raises(_lock.LockTimeout, match="held by first@test"):
            _lock.acquire(client, model_name, "second@test", wait_seconds=1)
        assert time.monotonic() - started < 10
        assert "first@test" in registry.status(model_name).lock
    finally:
        first.release()
    second = _lock.acquire(client, model_name, "second@test", wait_seconds=5)
    second.release()
    assert second.generation == first.generation + 1
    # The holder of a newer generation cleaned up the older one.
    assert [g for g, _ in _lock._generations(client, model_name)] == [second.generation]
    with pytest.raises(StageflowError, match="lost the registry lock"):
        # A holder whose generation was taken over must not write.
        first.ensure()
