"""The registry lock and the ledger keep their order whatever a promoter's clock says.

Real tracking server; the skewed clock is the promoter's own ``time.time`` (patched in
this process, as if the host's clock were off): the server's stamps and its Date header
decide leases, and the lock's numbering orders the ledger.
"""

from __future__ import annotations

import contextlib
import time

import mlflow
import pytest
from mlflow import MlflowClient

import registry
from registry import _lock, ledger

pytestmark = pytest.mark.slow

REAL_TIME = time.time


@contextlib.contextmanager
def skewed_clock(seconds: float):
    """Inside, this process's wall clock runs ``seconds`` off the server's (monotonic untouched).

    Its own patch context: the test's ``monkeypatch.undo()`` would also undo the fixtures'
    tracking URI, and every later call would then go to the default server.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "time", lambda: REAL_TIME() + seconds)
        yield


def test_a_promoter_whose_clock_runs_three_minutes_ahead_does_not_take_a_held_lock(
    tracking_uri, register_versions, model_name
):
    register_versions(model_name)
    client = MlflowClient()
    held = _lock.acquire(client, model_name, "first@host")
    try:
        with skewed_clock(+180):  # past the 120 s lease, by this promoter's clock
            with pytest.raises(_lock.LockTimeout, match="held by first@host"):
                _lock.acquire(client, model_name, "ahead@host", wait_seconds=3)
    finally:
        held.release()


def test_a_lock_taken_on_a_host_five_minutes_slow_is_still_held_for_its_lease(
    tracking_uri, register_versions, model_name
):
    register_versions(model_name)
    client = MlflowClient()
    with skewed_clock(-300):  # its lease would read as long expired if it set the time
        held = _lock.acquire(client, model_name, "slow@host")
    try:
        assert "slow@host" in registry.status(model_name).lock
        with pytest.raises(_lock.LockTimeout, match="held by slow@host"):
            _lock.acquire(client, model_name, "punctual@host", wait_seconds=3)
    finally:
        held.release()
    assert registry.status(model_name).lock is None


def test_rollback_on_a_host_five_minutes_slow_goes_back_to_the_version_before(
    tracking_uri, register_versions, wine_models, model_name
):
    v1, v2 = register_versions(model_name)
    v3 = mlflow.register_model(wine_models[1], model_name).version  # a copy of v2's model
    for version, skew in ((v1, 0), (v2, -300), (v3, 0)):
        with skewed_clock(skew):
            registry.promote(model_name, version, "Staging", "candidate")
            registry.promote(model_name, version, "Production", "ship it")

    # v2's entries started "before" v1's by their clocks; the ledger's numbers say otherwise.
    history = registry.history(model_name)
    assert [e.version for e in history] == [v1, v1, v2, v2, v3, v3]
    assert [e.seq for e in history] == sorted(e.seq for e in history)

    result = registry.rollback(model_name, reason="v3 is worse")
    assert result.version == v2
    assert registry.status(model_name).production == v2
    problems, note = ledger.verify(
        ledger.entries(MlflowClient(), model_name, include_all=True),
        ledger.head(MlflowClient(), model_name),
    )
    assert (problems, note) == ([], "")
