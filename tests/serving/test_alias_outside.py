"""An alias moved outside Stageflow: ``status`` flags the split, ``serve`` does not follow it.

Real tracking server, ``mlflow models serve`` and Caddy. ``status`` and ``serve`` share
one definition of Production (``registry.placements``): stage, alias and the ledger agree.
"""

from __future__ import annotations

import logging

import pytest
from mlflow import MlflowClient

import registry
from registry import ledger
from stageflow import processes
from tests.serving.test_serve import START_TIMEOUT_S, predict, wait_for_version, wine_request

pytestmark = pytest.mark.slow

__all__ = ["wine_request"]  # the fixture, used by name below


def test_status_flags_an_alias_moved_outside_stageflow_and_names_the_fix(
    tracking_uri, register_versions, model_name
):
    name = model_name
    register_versions(name)
    registry.promote(name, 1, "Staging", "first")
    registry.promote(name, 1, "Production", "ship")
    MlflowClient().set_registered_model_alias(name, "champion", "2")  # by hand

    st = registry.status(name)
    assert st.production is None  # no settled Production while it is split
    assert st.aliases["champion"] == "2"
    (split,) = [p for p in st.problems if "@champion" in p]
    assert split.startswith("@champion points at version 2, but version 1 is in Production;")
    assert "serve keeps the version it serves" in split
    assert f"`stageflow status --model {name} --repair`" in split

    registry.repair(name, reason="put it back")
    st = registry.status(name)
    assert (st.production, st.problems) == ("1", [])


def test_status_flags_a_stage_and_alias_both_moved_outside_stageflow(
    tracking_uri, register_versions, model_name
):
    name = model_name
    register_versions(name)
    registry.promote(name, 1, "Staging", "first")
    registry.promote(name, 1, "Production", "ship")
    from registry._stages import move

    move(MlflowClient(), name, "2", "Production")  # both writes, no gate, no ledger entry

    st = registry.status(name)
    assert st.production is None
    (split,) = st.problems
    assert "the ledger last put version 1 there: it was moved outside Stageflow" in split
    assert f"`stageflow rollback --model {name} --to 1`" in split

    result = registry.rollback(name, to=1, reason="version 2 was never gated")
    assert (result.changed, result.archived) == (True, ["2"])
    st = registry.status(name)
    assert (st.production, st.problems) == ("1", [])
    assert ledger.head(MlflowClient(), name).placed["Production"] == "1"


def test_serve_keeps_the_gated_version_when_the_alias_moves_outside_stageflow(
    tracking_uri, register_versions, model_name, wine_request, start_serving, caplog
):
    name = model_name
    register_versions(name)
    registry.promote(name, 1, "Staging", "first")
    registry.promote(name, 1, "Production", "ship")
    running = start_serving(name, replicas=1)
    assert running.wait_serving(timeout=START_TIMEOUT_S) == "1"

    caplog.set_level(logging.WARNING, logger="serving.controller")
    MlflowClient().set_registered_model_alias(name, "champion", "2")  # by hand
    processes.wait_until(
        lambda: any("Production is not settled" in r.getMessage() for r in caplog.records),
        timeout=60,
        what="the controller saying why it does not follow @champion",
    )
    (said,) = [r.getMessage() for r in caplog.records if "not settled" in r.getMessage()]
    assert "@champion points at version 2" in said
    assert "still serving version 1" in said
    assert running.controller.serving_version == "1"
    answer = predict(running.url, wine_request)
    assert (answer.status_code, answer.headers["X-Model-Version"]) == (200, "1")

    # Gated and recorded, version 2 is followed.
    registry.promote(name, 2, "Staging", "next")
    registry.promote(name, 2, "Production", "ship")
    wait_for_version(running.url, wine_request, "2", START_TIMEOUT_S)
