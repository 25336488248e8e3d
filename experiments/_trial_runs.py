"""One MLflow run per Optuna trial, nested under the study's run, logged off the hot path.

Runs are written with an ``MlflowClient`` (never the fluent API's process-global
active run), so any number of worker processes can log trials under one parent:
the parent is a tag (``mlflow.parentRunId``), not a stack. This is what
optuna-integration's callback cannot do with ``n_jobs > 1`` (optuna/optuna#4088)
or outside the parent's process (optuna/optuna#5148).

Each trial costs three tracking calls (create, one ``log_batch``, terminate), made
by one background thread in order, so a trial never waits for the tracking
server; :meth:`TrialRuns.close` waits until all of them are through.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from experiments._objective import FoldScores

logger = logging.getLogger(__name__)

COMPLETE, PRUNED, FAIL, INTERRUPTED = "COMPLETE", "PRUNED", "FAIL", "INTERRUPTED"
# How each outcome shows in the MLflow UI's status column; the exact Optuna state is a tag.
RUN_STATUS = {
    COMPLETE: RunStatus.to_string(RunStatus.FINISHED),
    PRUNED: RunStatus.to_string(RunStatus.KILLED),
    FAIL: RunStatus.to_string(RunStatus.FAILED),
    INTERRUPTED: RunStatus.to_string(RunStatus.KILLED),
}
STATE_TAG = "optuna.trial.state"
NUMBER_TAG = "optuna.trial.number"
STUDY_TAG = "optuna.study.name"
WORKER_TAG = "stageflow.tune.worker"
KIND_TAG = "stageflow.kind"
TRIAL_KIND = "trial"
MAX_TAG_CHARS = 5000


def trial_run_name(number: int) -> str:
    return f"trial-{number}"


class TrialRuns:
    """Logs the trials of one worker as child runs of ``parent_run_id``."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        study_name: str,
        metric: str,
        worker: int = 0,
        background: bool = True,
    ):
        self.client = MlflowClient(tracking_uri)
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.study_name, self.metric, self.worker = study_name, metric, worker
        # background=False runs each call in the caller (benchmarks/tuning_overhead.py).
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="trial-runs")
            if background
            else _Inline()
        )
        self._pending: list[Future] = []

    def started(self, number: int) -> Future:
        """Create the trial's run (RUNNING) in the background; the future holds its id."""
        start_ms = int(time.time() * 1000)
        return self._submit(self._create, number, start_ms)

    def finished(
        self,
        run: Future,
        number: int,
        state: str,
        params: dict,
        scores: FoldScores,
        seconds: float,
        error: str = "",
    ) -> None:
        """Log the trial's params, fold metrics and state, and close its run."""
        end_ms = int(time.time() * 1000)
        self._submit(self._finish, run, number, state, params, scores, seconds, error, end_ms)

    def close(self, timeout: float = 60.0) -> None:
        """Wait until every queued call reached the tracking server (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        for future in self._pending:
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - already logged where it happened
                logger.debug("trial logging call failed: %s", exc)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _submit(self, fn, *args) -> Future:
        future = self._pool.submit(fn, *args)
        self._pending.append(future)
        return future

    def _create(self, number: int, start_ms: int) -> str:
        run = self.client.create_run(
            self.experiment_id,
            start_time=start_ms,
            run_name=trial_run_name(number),
            tags={
                MLFLOW_PARENT_RUN_ID: self.parent_run_id,
                KIND_TAG: TRIAL_KIND,
                NUMBER_TAG: str(number),
                STUDY_TAG: self.study_name,
                WORKER_TAG: str(self.worker),
                STATE_TAG: "RUNNING",
            },
        )
        return run.info.run_id

    def _finish(self, run, number, state, params, scores, seconds, error, end_ms) -> None:
        try:
            run_id = run.result()
        except Exception as exc:  # noqa: BLE001 - the study goes on; the trial is in Optuna
            logger.warning("could not create the MLflow run of trial %d: %s", number, exc)
            return
        metrics = [Metric(k, v, end_ms, 0) for k, v in scores.summary().items()]
        # The metric optimised, fold by fold: the curve the pruner judged.
        metrics += [
            Metric(f"fold_{self.metric}", fold[self.metric], end_ms, step)
            for step, fold in enumerate(scores.folds)
            if self.metric in fold
        ]
        metrics.append(Metric("trial_seconds", seconds, end_ms, 0))
        tags = [RunTag(STATE_TAG, state)]
        if error:
            tags.append(RunTag("stageflow.error", error[:MAX_TAG_CHARS]))
        try:
            self.client.log_batch(
                run_id,
                metrics=metrics,
                params=[Param(k, str(v)) for k, v in params.items()],
                tags=tags,
            )
        except Exception as exc:  # noqa: BLE001 - still close the run below
            logger.warning("could not log trial %d to run %s: %s", number, run_id, exc)
        try:
            self.client.set_terminated(run_id, RUN_STATUS[state], end_time=end_ms)
        except Exception as exc:  # noqa: BLE001 - the study goes on; the trial is in Optuna
            logger.warning("could not close the run %s of trial %d: %s", run_id, number, exc)


class _Inline:
    """An executor that runs each call at once, in the caller's thread."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - kept in the future, as a pool would
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass
