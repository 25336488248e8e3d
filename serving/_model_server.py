"""One model server: ``mlflow models serve`` as one replica of a version, and its proof of work."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import requests
from mlflow.models import Model
from mlflow.models.utils import SERVING_INPUT_PATH, load_serving_example

# The variable MLflow's scoring server reads (JSON) and hands to the pyfunc's
# load_model as model_config; imported, so a rename in MLflow fails loudly here.
from mlflow.pyfunc.scoring_server import SERVING_MODEL_CONFIG

from serving._hold_answers import PROTOCOL
from serving._slots import Replica, Slot
from stageflow import processes
from stageflow.errors import StageflowError

logger = logging.getLogger(__name__)

VERSION_HEADER = "X-Model-Version"
# The proof request is the controller's own, not traffic: the inference log skips it.
PROBE_HEADER = "X-Stageflow-Probe"
INFERENCE_LOG = "inference_log"
START_TIMEOUT_S = 120.0
EXAMPLE_TIMEOUT_S = 60.0
PING_TIMEOUT_S = 1.0
# One thread per process for the math libraries: on single-row requests, OpenMP's
# thread start-up in HistGradientBoosting cost more than the prediction itself.
# Replicas give the parallelism instead.
SINGLE_THREADED = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def command(model_dir: Path, replica: Replica) -> list[str]:
    """``mlflow models serve`` of a verified local copy (``stageflow.manifest.local_copy``)."""
    return [
        processes.bin_path("mlflow"),
        "models",
        "serve",
        "-m",
        str(model_dir),
        "--env-manager",
        "local",
        "-h",
        replica.address,
        "-p",
        str(replica.port),
        # One worker per replica: uvicorn with more leaves Nagle's algorithm on for
        # keep-alive connections (Kludex/uvicorn#3149); the controller runs replicas
        # as separate processes, each on its own address, instead.
        "-w",
        "1",
    ]


def environment(
    tracking_uri: str,
    version: str,
    model_config: dict[str, Any] | None = None,
    access_log: bool = False,
) -> dict[str, str]:
    """The child's environment: this venv first on PATH, and the version on every answer.

    ``mlflow models serve`` starts ``uvicorn`` from PATH and hands it its
    environment; uvicorn reads ``UVICORN_*`` variables as options, so
    ``UVICORN_HEADERS`` adds the header to every response of that server, and
    ``UVICORN_HTTP`` makes it write each answer in one piece, so a replica killed
    mid-answer sends nothing and the front door retries on a sibling
    (``serving/_hold_answers.py``).
    ``model_config`` reaches the pyfunc's ``load_model`` through MLflow's
    ``SERVING_MODEL_CONFIG``. ``UVICORN_ACCESS_LOG`` keeps uvicorn's line per
    request out of the replica's log unless ``access_log`` asks for it.
    """
    extra = {
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_REGISTRY_URI": tracking_uri,
        "UVICORN_HEADERS": f"{VERSION_HEADER}:{version}",
        "UVICORN_HTTP": PROTOCOL,
        "UVICORN_ACCESS_LOG": "true" if access_log else "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        **SINGLE_THREADED,
    }
    if model_config is not None:
        extra[SERVING_MODEL_CONFIG] = json.dumps(model_config)
    return processes.venv_env(extra)


def start(
    name: str,
    version: str,
    replica: Replica,
    tracking_uri: str,
    log_path: Path,
    model_dir: Path,
    model_config: dict[str, Any] | None = None,
    access_log: bool = False,
) -> None:
    """Start ``version``'s server as ``replica``, not ready until proved; the replica records it.

    It serves ``model_dir``, the version's verified local copy: it neither downloads
    the model nor reads the artifact store, so it starts while the tracking server is away.
    """
    replica.log_path, replica.ready = log_path, False
    replica.started_at = time.monotonic()
    if model_config and model_config.get(INFERENCE_LOG) is not None:
        # Each replica logs under the version it serves (so a rollback's rows land
        # under the version that answered them), to the tracking server it loads from.
        log = {"tracking_uri": tracking_uri, **model_config[INFERENCE_LOG]}
        model_config = {**model_config, INFERENCE_LOG: {**log, "model": name, "version": version}}
    replica.proc = processes.spawn(
        command(model_dir, replica),
        log_path=log_path,
        env=environment(tracking_uri, version, model_config, access_log),
    )


def prove_ready(replica: Replica, version: str, example: str | None) -> bool:
    """One step of proving a starting replica: ``/ping``, then the version's own input example.

    Does not wait: the supervisor (``serving._supervisor``) calls it on every
    poll until it returns True; a version is routed once one replica of its slot has.

    Returns:
        False while the server does not answer ``/ping`` yet; True once it
        answered the example with 200 (the replica is then marked ready).

    Raises:
        StageflowError: the server exited, did not answer within ``START_TIMEOUT_S``,
            answered as another version, or refused its own input example.
    """
    what = f"version {version}'s model server on {replica.url}"
    if not replica.alive():
        raise StageflowError(f"{what} exited with code {replica.exit_code()} before it was ready")
    if not _answers_ping(replica, version):
        if time.monotonic() - replica.started_at > START_TIMEOUT_S:
            raise StageflowError(f"{what} did not answer /ping within {START_TIMEOUT_S:.0f}s")
        return False
    if example is not None:
        try:
            answer = requests.post(
                replica.url + "/invocations",
                data=example.encode(),
                headers={"Content-Type": "application/json", PROBE_HEADER: "1"},
                timeout=EXAMPLE_TIMEOUT_S,
            )
        except requests.RequestException as exc:
            raise StageflowError(
                f"{what} did not answer its input example: {type(exc).__name__}"
            ) from None
        if answer.status_code != 200:
            raise StageflowError(
                f"{what} answered its own input example with {answer.status_code}: "
                f"{answer.text[:300]}"
            )
    replica.ready, replica.answered_at, replica.missed_pings = True, time.monotonic(), 0
    return True


def serving_example(model_dir: Path) -> str | None:
    """The request body MLflow stored with the model (``serving_input_example.json``), or None."""
    uri = str(model_dir)
    model = Model.load(uri)
    if not (model.saved_input_example_info or {}).get(SERVING_INPUT_PATH):
        return None
    return load_serving_example(uri)


def _answers_ping(replica: Replica, version: str) -> bool:
    try:
        answer = requests.get(replica.url + "/ping", timeout=PING_TIMEOUT_S)
    except requests.RequestException:
        return False
    served = answer.headers.get(VERSION_HEADER)
    if answer.status_code == 200 and served != version:
        # Something else listens on this replica's port (or UVICORN_HEADERS was
        # ignored): routing here would serve the wrong thing.
        raise StageflowError(
            f"{replica.url} answers /ping as {VERSION_HEADER}={served!r}, expected {version}"
        )
    return answer.status_code == 200


def stop_replica(replica: Replica) -> None:
    """Stop one replica's process group (SIGTERM lets uvicorn finish in-flight requests)."""
    if replica.proc is not None:
        _end_group(replica.proc)
    replica.clear()


def stop(slot: Slot) -> None:
    """Stop every replica of ``slot`` at once, wait for each, and free the slot."""
    live = [replica.proc for replica in slot.replicas if replica.proc is not None]
    for proc in live:  # all told first, so they shut down side by side
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in live:
        _end_group(proc)
    slot.clear()


def _end_group(proc: subprocess.Popen) -> None:
    # spawn() makes each server the leader of its own process group: group id == pid.
    # The leader (the `mlflow` CLI) often exits on SIGTERM before uvicorn, its child,
    # has written and uploaded its inference log: the group gets its grace all the
    # same (killing it at once lost the last rows of every stopped replica).
    processes.stop_group(proc.pid)
    proc.poll()
