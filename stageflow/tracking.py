"""Where the tracking server is, and whether it answers.

Nothing here runs at import time: every function resolves the URI when it is
called (argument, then ``MLFLOW_TRACKING_URI``, then the embedded default).
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import requests
from mlflow import MlflowClient

from stageflow.errors import TrackingServerUnreachable

DEFAULT_PORT = 5000
DEFAULT_HOST = "127.0.0.1"
HOME_ENV = "STAGEFLOW_HOME"


def home() -> Path:
    """The folder that holds Stageflow's local state (``STAGEFLOW_HOME`` or ``./.stageflow``)."""
    return Path(os.environ.get(HOME_ENV, ".stageflow")).resolve()


def default_uri() -> str:
    return f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"


def resolve_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def require_server(uri: str | None = None, timeout: float = 5.0) -> str:
    """Resolve the tracking URI, check that the server answers, and make it current.

    Returns:
        The resolved URI, also set as MLflow's tracking URI for this process.

    Raises:
        TrackingServerUnreachable: one line naming the URI and how to start a server.
    """
    uri = resolve_uri(uri)
    if uri.startswith(("http://", "https://")):
        try:
            answer = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as exc:
            raise TrackingServerUnreachable(uri, type(exc).__name__) from None
        if answer.status_code != 200:
            raise TrackingServerUnreachable(uri, f"/health answered {answer.status_code}")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def client(uri: str | None = None) -> MlflowClient:
    """An ``MlflowClient`` for a server that answered :func:`require_server`."""
    uri = require_server(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)
