"""The Production gate in a process whose other threads import (an in-process controller does).

A process's first ``mlflow.models.evaluate`` imports MLflow's evaluators while holding
MLflow's import-hook lock; a thread importing at the same moment holds Python's import
lock and waits for that one. Before ``registry._compare.import_evaluation`` this
deadlocked a promotion to Production made beside ``BackgroundServe`` (whose MLflow
client imports on every registry call), every time.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from registry import PRODUCTION, STAGING, promote
from stageflow import processes

pytestmark = pytest.mark.slow

# Only a timeout: a fresh interpreter importing MLflow, two evaluations and a ledger
# entry take well under a minute on an idle machine; a deadlock takes forever.
PROMOTE_TIMEOUT_S = 600

PROMOTE_BESIDE_AN_IMPORTING_THREAD = textwrap.dedent(
    """
    import importlib, sys, threading, time

    def import_forever():
        while True:
            try:  # a failing import goes through every finder, MLflow's included
                importlib.import_module("stageflow_not_a_module")
            except ImportError:
                pass
            time.sleep(0.001)

    threading.Thread(target=import_forever, daemon=True).start()
    from registry import promote
    result = promote(sys.argv[1], sys.argv[2], "Production", "beside an importing thread")
    print("promoted", result.version, result.changed)
    """
)


def test_promoting_to_production_beside_a_thread_that_imports_does_not_deadlock(
    register_versions, model_name, tracking_uri
):
    v1, v2 = register_versions(model_name)
    promote(model_name, v1, STAGING)
    promote(model_name, v1, PRODUCTION)
    promote(model_name, v2, STAGING)
    # A fresh process: only the first evaluation of a process registers the evaluators.
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROMOTE_BESIDE_AN_IMPORTING_THREAD, model_name, v2],
            capture_output=True,
            text=True,
            env=processes.venv_env({"MLFLOW_TRACKING_URI": tracking_uri}),
            timeout=PROMOTE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the promotion did not finish in {PROMOTE_TIMEOUT_S}s: deadlocked")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"promoted {v2} True" in done.stdout
