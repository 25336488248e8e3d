"""One model version's server: ``mlflow models serve`` on a slot, and the proof that it works."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import requests
from mlflow.models import Model
from mlflow.models.utils import SERVING_INPUT_PATH, load_serving_example

from serving._slots import Slot
from stageflow import processes
from stageflow.errors import StageflowError

logger = logging.getLogger(__name__)

VERSION_HEADER = "X-Model-Version"
START_TIMEOUT_S = 120.0
EXAMPLE_TIMEOUT_S = 60.0


class Stopping(Exception):  # noqa: N818 - not an error: the controller was asked to stop
    """Raised out of a wait when the controller is asked to stop."""


def model_uri(name: str, version: str) -> str:
    return f"models:/{name}/{version}"


def command(name: str, version: str, slot: Slot) -> list[str]:
    return [
        processes.bin_path("mlflow"),
        "models",
        "serve",
        "-m",
        model_uri(name, version),
        "--env-manager",
        "local",
        "-h",
        slot.address,
        "-p",
        str(slot.port),
        # One worker: uvicorn with more leaves Nagle's algorithm on for keep-alive
        # connections (Kludex/uvicorn#3149), and one version needs one process here.
        "-w",
        "1",
    ]


def environment(tracking_uri: str, version: str) -> dict[str, str]:
    """The child's environment: this venv first on PATH, and the version on every answer.

    ``mlflow models serve`` starts ``uvicorn`` from PATH and hands it its
    environment; uvicorn reads ``UVICORN_*`` variables as options, so
    ``UVICORN_HEADERS`` adds the header to every response of that server.
    """
    return processes.venv_env(
        {
            "MLFLOW_TRACKING_URI": tracking_uri,
            "MLFLOW_REGISTRY_URI": tracking_uri,
            "UVICORN_HEADERS": f"{VERSION_HEADER}:{version}",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
    )


def start(name: str, version: str, slot: Slot, tracking_uri: str, log_path: Path) -> None:
    """Start ``version``'s server on ``slot`` (not routed yet); the slot records the process."""
    slot.version, slot.log_path, slot.routed = version, log_path, False
    slot.proc = processes.spawn(
        command(name, version, slot),
        log_path=log_path,
        env=environment(tracking_uri, version),
    )


def prove_ready(name: str, slot: Slot, stop: threading.Event) -> None:
    """Wait for ``/ping``, then require 200 for the version's own serving input example.

    Raises:
        StageflowError: the server exited, did not answer in time, answered for
            another version, or refused its own input example.
        Stopping: ``stop`` was set meanwhile.
    """
    version = str(slot.version)
    try:
        processes.wait_until(
            lambda: stop.is_set() or _answers_ping(slot, version),
            timeout=START_TIMEOUT_S,
            proc=slot.proc,
            what=f"version {version}'s model server on {slot.url}",
            log_path=slot.log_path,
            interval=0.2,
        )
    except (RuntimeError, TimeoutError) as exc:
        # The caller names the log and shows its last lines.
        raise StageflowError(str(exc).splitlines()[0].split("; its log:")[0]) from None
    if stop.is_set():
        raise Stopping
    example = serving_example(name, version)
    if example is None:
        logger.warning(
            "version %s was logged without an input example; switching on /ping alone", version
        )
        return
    try:
        answer = requests.post(
            slot.url + "/invocations",
            data=example.encode(),
            headers={"Content-Type": "application/json"},
            timeout=EXAMPLE_TIMEOUT_S,
        )
    except requests.RequestException as exc:
        raise StageflowError(
            f"version {version} did not answer its input example: {type(exc).__name__}"
        ) from None
    if answer.status_code != 200:
        raise StageflowError(
            f"version {version} answered its own input example with {answer.status_code}: "
            f"{answer.text[:300]}"
        )


def serving_example(name: str, version: str) -> str | None:
    """The request body MLflow stored with the model (``serving_input_example.json``), or None."""
    uri = model_uri(name, version)
    model = Model.load(uri)
    if not (model.saved_input_example_info or {}).get(SERVING_INPUT_PATH):
        return None
    return load_serving_example(uri)


def _answers_ping(slot: Slot, version: str) -> bool:
    try:
        answer = requests.get(slot.url + "/ping", timeout=1.0)
    except requests.RequestException:
        return False
    served = answer.headers.get(VERSION_HEADER)
    if answer.status_code == 200 and served != version:
        # Something else listens on this slot's port (or UVICORN_HEADERS was ignored):
        # routing here would serve the wrong thing.
        raise StageflowError(
            f"{slot.url} answers /ping as {VERSION_HEADER}={served!r}, expected {version}"
        )
    return answer.status_code == 200


def stop(slot: Slot) -> None:
    """Stop the slot's process group (SIGTERM lets uvicorn finish in-flight requests)."""
    if slot.proc is not None:
        processes.stop_group(slot.proc.pid)
    slot.clear()
