"""One MLflow run per Optuna trial, nested under the study's run, logged off the hot path.

Runs are written by trial number and parent run id (never through the fluent API's
process-global active run), so any number of worker processes can log trials under
one parent: the parent is a tag (``mlflow.parentRunId``), not a stack. This is what
optuna-integration's callback cannot do with ``n_jobs > 1`` (optuna/optuna#4088)
or outside the parent's process (optuna/optuna#5148).

A trial's run is written when the trial ends, in three tracking calls made by one
background thread in order, so a trial never waits for the tracking server:

1. ``runs/create``: name ``trial-N``, the trial's start time and every tag, its final
   Optuna state and error included;
2. ``runs/log-batch``: params and metrics (fold summary, ``fold_<metric>`` per step,
   ``trial_seconds``);
3. ``runs/update``: status FINISHED/KILLED/FAILED and the end time.

Three is the least MLflow's REST API allows (a run is created RUNNING, params and
metrics have no place in ``runs/create``, and only ``runs/update`` sets a status),
and it has no call that spans runs, so trials are not merged into fewer calls.
Nothing exists on the server while a trial runs, so a worker killed mid-trial
leaves no run RUNNING; :meth:`TrialRuns.close` waits until every call is through.

The calls cost the tracking server ~45 ms of CPU per trial, on the same cores as the
study (BENCHMARKS.md, "Tuning"), so the client side is kept lean: for an HTTP(S)
tracking server they are plain JSON requests on one keep-alive ``requests`` session
whose headers, credentials, proxies and TLS settings are resolved once
(:class:`_RestCalls`): ~6 ms of client CPU per trial, against ~16 ms through
``MlflowClient``, which resolves its request headers (probing for Databricks) on
every call. Any other tracking URI, or an auth plugin MLflow would load, goes
through ``MlflowClient`` (:class:`_ClientCalls`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor

import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_BACKOFF_JITTER,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
    MLFLOW_WORKSPACE,
)
from mlflow.tracking.request_header.registry import resolve_request_headers
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

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
ERROR_TAG = "stageflow.error"
KIND_TAG = "stageflow.kind"
TRIAL_KIND = "trial"
MAX_TAG_CHARS = 5000
# What MLflow's own client retries (mlflow.utils.request_utils), with its back-off settings.
RETRY_CODES = (408, 429, 500, 502, 503, 504)


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
        self.calls = tracking_calls(tracking_uri)
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.study_name, self.metric, self.worker = study_name, metric, worker
        # background=False runs each call in the caller (benchmarks/tuning_overhead.py).
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="trial-runs")
            if background
            else _Inline()
        )
        self._pending: list[Future] = []

    def started(self, number: int) -> int:
        """The trial's start time (ms), for :meth:`finished`: its run is written at the end."""
        return int(time.time() * 1000)

    def finished(
        self,
        started_ms: int,
        number: int,
        state: str,
        params: dict,
        scores: FoldScores,
        seconds: float,
        error: str = "",
    ) -> None:
        """Queue the trial's run: created with its tags, params and metrics, then closed."""
        end_ms = int(time.time() * 1000)
        self._submit(self._log, number, state, params, scores, seconds, error, started_ms, end_ms)

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

    def _tags(self, number: int, state: str, error: str) -> dict[str, str]:
        tags = {
            MLFLOW_PARENT_RUN_ID: self.parent_run_id,
            KIND_TAG: TRIAL_KIND,
            NUMBER_TAG: str(number),
            STUDY_TAG: self.study_name,
            WORKER_TAG: str(self.worker),
            STATE_TAG: state,
        }
        if error:
            tags[ERROR_TAG] = error[:MAX_TAG_CHARS]
        return tags

    def _metrics(self, scores: FoldScores, seconds: float) -> list[tuple[str, float, int]]:
        """(key, value, step): the fold summary, the optimised metric fold by fold, the time."""
        metrics = [(key, value, 0) for key, value in scores.summary().items()]
        # The metric optimised, fold by fold: the curve the pruner judged.
        metrics += [
            (f"fold_{self.metric}", fold[self.metric], step)
            for step, fold in enumerate(scores.folds)
            if self.metric in fold
        ]
        metrics.append(("trial_seconds", seconds, 0))
        return metrics

    def _log(self, number, state, params, scores, seconds, error, start_ms, end_ms) -> None:
        try:
            run_id = self.calls.create_run(
                self.experiment_id,
                trial_run_name(number),
                start_ms,
                self._tags(number, state, error),
            )
        except Exception as exc:  # noqa: BLE001 - the study goes on; the trial is in Optuna
            logger.warning("could not create the MLflow run of trial %d: %s", number, exc)
            return
        try:
            params = {key: str(value) for key, value in params.items()}
            self.calls.log_batch(run_id, params, self._metrics(scores, seconds), end_ms)
        except Exception as exc:  # noqa: BLE001 - still close the run below
            logger.warning("could not log trial %d to run %s: %s", number, run_id, exc)
        try:
            self.calls.update_run(run_id, RUN_STATUS[state], end_ms)
        except Exception as exc:  # noqa: BLE001 - the study goes on; the trial is in Optuna
            logger.warning("could not close the run %s of trial %d: %s", run_id, number, exc)


def tracking_calls(tracking_uri: str) -> _RestCalls | _ClientCalls:
    """The lean REST client for a plain HTTP(S) server, else ``MlflowClient``.

    ``MlflowClient`` is kept for what only it handles: non-HTTP tracking URIs
    (``file:``, ``sqlite:``, ``databricks``), auth plugins (``MLFLOW_TRACKING_AUTH``),
    AWS SigV4 signing and workspaces.
    """
    if tracking_uri.startswith(("http://", "https://")) and not MLFLOW_WORKSPACE.get():
        creds = get_default_host_creds(tracking_uri)
        if not creds.auth and not creds.aws_sigv4:
            return _RestCalls(tracking_uri, creds)
    return _ClientCalls(tracking_uri)


class TrackingCallFailed(Exception):
    """The tracking server answered a call with an error."""


class _RestCalls:
    """The three calls of a trial as JSON requests on one keep-alive ``requests`` session.

    Everything ``MlflowClient`` works out on each request is worked out once here:
    request headers (``User-Agent`` and any header plugins), basic or bearer auth
    (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, ``MLFLOW_TRACKING_TOKEN``, or
    ``~/.mlflow/credentials``, else ``.netrc``), TLS settings
    (``MLFLOW_TRACKING_INSECURE_TLS``, ``..._SERVER_CERT_PATH``, ``..._CLIENT_CERT_PATH``,
    ``REQUESTS_CA_BUNDLE``) and proxies. Transient errors are retried as MLflow does.
    """

    def __init__(self, tracking_uri: str, creds):
        self.base = tracking_uri.rstrip("/") + "/api/2.0/mlflow/"
        self.timeout = MLFLOW_HTTP_REQUEST_TIMEOUT.get()
        session = requests.Session()
        retries = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()
        retry = Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            status_forcelist=RETRY_CODES,
            backoff_factor=MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get(),
            backoff_jitter=MLFLOW_HTTP_REQUEST_BACKOFF_JITTER.get(),
            allowed_methods=None,  # POST included, as MLflow's client does
            raise_on_status=False,  # the last answer is raised below, with its message
        )
        adapter = HTTPAdapter(max_retries=retry)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers.update(resolve_request_headers())
        session.headers["Content-Type"] = "application/json"
        if creds.username and creds.password:
            session.auth = (creds.username, creds.password)
        elif creds.token:
            session.headers["Authorization"] = f"Bearer {creds.token}"
        else:
            session.auth = requests.utils.get_netrc_auth(self.base)
        verify = False if creds.ignore_tls_verification else creds.server_cert_path
        env = session.merge_environment_settings(
            self.base, {}, None, verify, creds.client_cert_path
        )
        session.proxies, session.verify, session.cert = env["proxies"], env["verify"], env["cert"]
        session.trust_env = False  # resolved above, not again on every request
        self.session = session

    def _post(self, endpoint: str, body: dict) -> dict:
        answer = self.session.post(
            self.base + endpoint, data=json.dumps(body), timeout=self.timeout
        )
        if answer.status_code != 200:
            raise TrackingCallFailed(f"{endpoint}: HTTP {answer.status_code}: {answer.text[:500]}")
        return answer.json()

    def create_run(self, experiment_id: str, name: str, start_ms: int, tags: dict) -> str:
        body = {
            "experiment_id": str(experiment_id),
            "user_id": "unknown",  # what MlflowClient sends without an mlflow.user tag
            "run_name": name,
            "start_time": start_ms,
            "tags": [{"key": key, "value": value} for key, value in tags.items()],
        }
        return self._post("runs/create", body)["run"]["info"]["run_id"]

    def log_batch(self, run_id: str, params: dict, metrics: list, timestamp_ms: int) -> None:
        body = {
            "run_id": run_id,
            "params": [{"key": key, "value": value} for key, value in params.items()],
            "metrics": [
                {"key": key, "value": _json_double(value), "timestamp": timestamp_ms, "step": step}
                for key, value, step in metrics
            ],
        }
        self._post("runs/log-batch", body)

    def update_run(self, run_id: str, status: str, end_ms: int) -> None:
        self._post("runs/update", {"run_id": run_id, "status": status, "end_time": end_ms})


def _json_double(value) -> float | str:
    """A metric value as protobuf's JSON mapping has it: NaN and infinities as strings."""
    value = float(value)
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


class _ClientCalls:
    """The same three calls through ``MlflowClient``, for any tracking URI it supports."""

    def __init__(self, tracking_uri: str):
        self.client = MlflowClient(tracking_uri)

    def create_run(self, experiment_id: str, name: str, start_ms: int, tags: dict) -> str:
        run = self.client.create_run(experiment_id, start_time=start_ms, run_name=name, tags=tags)
        return run.info.run_id

    def log_batch(self, run_id: str, params: dict, metrics: list, timestamp_ms: int) -> None:
        self.client.log_batch(
            run_id,
            metrics=[Metric(key, value, timestamp_ms, step) for key, value, step in metrics],
            params=[Param(key, value) for key, value in params.items()],
        )

    def update_run(self, run_id: str, status: str, end_ms: int) -> None:
        self.client.set_terminated(run_id, status, end_time=end_ms)


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
