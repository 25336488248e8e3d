"""Where the tracking server is, and whether it answers.

Nothing here runs at import time: every function resolves the URI when it is
called (argument, then ``MLFLOW_TRACKING_URI``, then the embedded default).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import requests
from mlflow import MlflowClient

from stageflow.errors import StageflowError, TrackingServerUnreachable

DEFAULT_PORT = 5000
DEFAULT_HOST = "127.0.0.1"
HOME_ENV = "STAGEFLOW_HOME"
# One cheap API route any authenticated user may call: it proves the server's API answers us.
API_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"


def home() -> Path:
    """The folder that holds Stageflow's local state (``STAGEFLOW_HOME`` or ``./.stageflow``)."""
    return Path(os.environ.get(HOME_ENV, ".stageflow")).resolve()


def default_uri() -> str:
    return f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"


def resolve_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def credentials() -> tuple[str, str] | None:
    """MLflow's own basic-auth variables (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``)."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    return (user, password) if user and password else None


def require_server(uri: str | None = None, timeout: float = 5.0) -> str:
    """Resolve the tracking URI, check that the server answers its API, and make it current.

    ``/health`` answers even where every real call fails (MLflow exempts it from host
    checks and authentication), so the check also asks one API route, as the user.

    Returns:
        The resolved URI, also set as MLflow's tracking URI for this process.

    Raises:
        TrackingServerUnreachable: one line naming the URI and how to start a server.
        StageflowError: the server answers but refuses us (credentials, host name).
    """
    uri = resolve_uri(uri)
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        try:
            answer = requests.get(base + "/health", timeout=timeout)
            if answer.status_code == 200:
                answer = requests.get(
                    base + API_PROBE, auth=credentials(), timeout=max(timeout, 10.0)
                )
        except requests.RequestException as exc:
            raise TrackingServerUnreachable(uri, type(exc).__name__) from None
        if answer.status_code == 401:
            raise StageflowError(
                f"tracking server {uri} asks for credentials"
                + (" and refused the ones given" if credentials() else "")
                + "; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            )
        if answer.status_code == 403:
            host = urlparse(uri).netloc
            raise StageflowError(
                f"tracking server {uri} refused this client (403); if it was started with "
                f"--allowed-hosts, add {host} to them, else ask its admin for permissions"
            )
        if answer.status_code != 200:
            raise TrackingServerUnreachable(uri, f"answered {answer.status_code}")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def client(uri: str | None = None) -> MlflowClient:
    """An ``MlflowClient`` for a server that answered :func:`require_server`."""
    uri = require_server(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)
