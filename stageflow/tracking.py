"""Where the tracking server is, and whether it answers.

Nothing here runs at import time: every function resolves the URI when it is
called (argument, then ``MLFLOW_TRACKING_URI``, then the embedded default).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import requests
from mlflow import MlflowClient

from stageflow.errors import StageflowError, TrackingServerUnreachable, UsageError

logger = logging.getLogger(__name__)

DEFAULT_PORT = 5000
DEFAULT_HOST = "127.0.0.1"
HOME_ENV = "STAGEFLOW_HOME"
# The tag `mlflow run` puts on the run it creates and logs the entry point's params on.
# (Its MLFLOW_RUN_ID variable is no signal: `mlflow.start_run` deletes it as it resumes.)
PROJECT_ENTRY_POINT_TAG = "mlflow.project.entryPoint"
# The keys the project runner logged, shell-quoted, on the run (a JSON list).
RUNNER_PARAMS_TAG = "stageflow.runner_params"
# Where a value of ours that differs from the runner's (e.g. a resolved path) is kept.
RESOLVED_PARAM_TAG_PREFIX = "stageflow.param."
# One cheap API route any authenticated user may call: it proves the server's API answers us.
API_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"


def home() -> Path:
    """The folder that holds Stageflow's local state (``STAGEFLOW_HOME`` or ``./.stageflow``)."""
    return Path(os.environ.get(HOME_ENV, ".stageflow")).resolve()


def default_uri() -> str:
    return f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"


def resolve_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def tls_verify() -> bool | str:
    """How to check an ``https://`` tracking server's certificate, as MLflow's client does.

    ``MLFLOW_TRACKING_SERVER_CERT_PATH`` names a CA bundle (e.g. the root of the internal
    CA that ``stageflow server start --tls`` prints); ``MLFLOW_TRACKING_INSECURE_TLS=true``
    turns the check off; otherwise the system's trust store decides.
    """
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return False
    return os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True


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
            verify = tls_verify()
            answer = requests.get(base + "/health", timeout=timeout, verify=verify)
            if answer.status_code == 200:
                answer = requests.get(
                    base + API_PROBE,
                    auth=credentials(),
                    timeout=max(timeout, 10.0),
                    verify=verify,
                )
        except requests.exceptions.SSLError:
            raise StageflowError(
                f"tracking server {uri} has a certificate this client does not trust; set "
                "MLFLOW_TRACKING_SERVER_CERT_PATH to its CA (`stageflow server start --tls` "
                "prints it)"
            ) from None
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


def filter_value(text: str) -> str:
    """``text`` as a string literal of an MLflow search filter, quotes included.

    Every ``search_runs`` / ``search_model_versions`` / ``search_registered_models``
    filter of Stageflow's quotes its values here. MLflow's filter parser takes a literal
    between single or double quotes and undoes no escape (``'it\\'s'`` searches for a
    backslash), so a value holding ``'`` goes between double quotes.

    Example:
        >>> print("name = " + filter_value("bob's model"))
        name = "bob's model"

    Raises:
        UsageError: ``text`` holds both ``'`` and ``"``, which no MLflow filter can match.
    """
    text = str(text)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise UsageError(
        f"the name {text[:80]!r} holds both ' and \"; MLflow's searches cannot find such a "
        "name: choose one without one of them"
    )


def _runner_quote(value: str) -> str:
    # Exactly how MLflow's project runner quotes a parameter value before logging it
    # (mlflow/projects/_project_spec.py, EntryPoint._sanitize_value_dict).
    from mlflow.utils.string_utils import quote  # noqa: PLC0415 - MLflow's own quoting

    return quote(value)


def log_params(params: dict) -> None:
    """Log ``params`` on the active run, in harmony with ``mlflow run``'s own record.

    ``mlflow run`` logs each entry point parameter on the run it creates, shell-quoted
    (``target`` = ``'이름 열'``), and a param's value can never change, so logging the
    plain value again is refused (issue 10). Inside the runner's run, the keys it logged
    are listed in the ``stageflow.runner_params`` tag (:func:`plain_params` undoes their
    quoting) and left as they are; a value of ours that is not what the runner was given
    (a path we resolved) is kept in a ``stageflow.param.KEY`` tag. Outside ``mlflow run``
    this is ``mlflow.log_params``.
    """
    run = mlflow.active_run()
    if run is None or PROJECT_ENTRY_POINT_TAG not in run.data.tags:
        mlflow.log_params(params)
        return
    logged = MlflowClient().get_run(run.info.run_id).data
    tags = {}
    if RUNNER_PARAMS_TAG in logged.tags:
        runner = set(json.loads(logged.tags[RUNNER_PARAMS_TAG]))
    else:  # the first call: every param on the run so far is the runner's
        runner = set(logged.params)
        tags[RUNNER_PARAMS_TAG] = json.dumps(sorted(runner), ensure_ascii=False)
    fresh = {}
    for key, value in params.items():
        text, before = str(value), logged.params.get(key)
        if before is None:
            fresh[key] = value
        elif key in runner and _runner_quote(text) != before:
            logger.debug("param %s: mlflow run logged %r, Stageflow used %r", key, before, text)
            tags[RESOLVED_PARAM_TAG_PREFIX + key] = text
        elif key not in runner and before != text:
            fresh[key] = value  # ours, changed: let MLflow refuse it as it would anywhere
    if tags:
        mlflow.set_tags(tags)
    if fresh:
        mlflow.log_params(fresh)


def plain_params(run) -> dict[str, str]:
    """A run's params as Stageflow used them: the runner's quoting undone, our resolved values.

    Read params of a run back through this, not ``run.data.params``, wherever the value
    matters (a retrain reading ``data`` and ``target``): under ``mlflow run`` they may be
    shell-quoted (see :func:`log_params`).
    """
    params = dict(run.data.params)
    tags = run.data.tags
    for key in json.loads(tags.get(RUNNER_PARAMS_TAG, "[]")):
        if key in params:
            tokens = shlex.split(params[key])
            params[key] = tokens[0] if len(tokens) == 1 else params[key]
    for tag, value in tags.items():
        if tag.startswith(RESOLVED_PARAM_TAG_PREFIX):
            params[tag.removeprefix(RESOLVED_PARAM_TAG_PREFIX)] = value
    return params
