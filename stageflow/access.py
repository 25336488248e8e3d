"""Who may do what on a tracking server started with ``--auth``: Stageflow's three roles.

MLflow's basic-auth app grants permissions per experiment and per registered model
(READ < USE < EDIT < MANAGE); a new user starts with none (``server start --auth``
sets ``default_permission = NO_PERMISSIONS``). A Stageflow role is the set of grants
its commands need for one model:

- ``reader``: READ on the model and its experiments, and on the ledger
  (``status``, ``history``, the MLflow UI).
- ``operator`` (``serve``, ``score``, ``monitor``): a reader, plus EDIT on the batch,
  inference-log and monitoring experiments it writes to.
- ``promoter`` (``promote``, ``rollback``, ``policy set``): a reader, plus MANAGE on
  the model (stages and tags need EDIT; moving an alias off a version is a delete, which
  MLflow grants only with MANAGE) and EDIT on the ledger (its runs and gate reports), and a
  member of the ``stageflow-promoters`` role, which may READ every registered model:
  the registry lock is a registered model each promoter creates (and so manages), and
  the others must see it to take turns (``registry/_lock.py``). MLflow's role patterns
  are an id or ``*``, not a prefix, hence every model.

Creating experiments and registered models needs no grant (whoever creates one manages
it), so a user who trains a new model owns it. Granting is the admin's call: the
caller's ``MLFLOW_TRACKING_USERNAME`` must be an admin.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from mlflow import MlflowClient

from stageflow import tracking
from stageflow.catalog import (
    BATCH_EXPERIMENT,
    INFERENCE_EXPERIMENT,
    LEDGER_EXPERIMENT,
    MONITORING_EXPERIMENT,
)
from stageflow.errors import StageflowError, UsageError

logger = logging.getLogger(__name__)

ROLES = ("reader", "operator", "promoter")
PROMOTERS_ROLE = "stageflow-promoters"
USER_PASSWORD_ENV = "STAGEFLOW_USER_PASSWORD"
EXPERIMENT, REGISTERED_MODEL = "experiment", "registered_model"  # MLflow's resource types
READ, EDIT, MANAGE = "READ", "EDIT", "MANAGE"


@dataclass
class Grant:
    resource_type: str
    resource: str  # experiment id or registered model name
    name: str  # what a person reads: the experiment's or model's name
    permission: str


def plan_grants(role: str, model: str, model_experiments: dict[str, str], shared: dict) -> list:
    """The grants ``role`` needs on ``model`` (pure: names and ids in, grants out).

    Args:
        role: one of :data:`ROLES`.
        model: the registered model's name.
        model_experiments: ``{experiment id: name}`` of the model's runs.
        shared: ``{name: experiment id}`` of Stageflow's own experiments.
    """
    if role not in ROLES:
        raise UsageError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    model_permission = MANAGE if role == "promoter" else READ
    grants = [Grant(REGISTERED_MODEL, model, model, model_permission)]
    grants += [Grant(EXPERIMENT, eid, name, READ) for eid, name in model_experiments.items()]
    ledger = EDIT if role == "promoter" else READ
    grants.append(Grant(EXPERIMENT, shared[LEDGER_EXPERIMENT], LEDGER_EXPERIMENT, ledger))
    if role == "operator":
        for name in (BATCH_EXPERIMENT, INFERENCE_EXPERIMENT, MONITORING_EXPERIMENT):
            grants.append(Grant(EXPERIMENT, shared[name], name, EDIT))
    return grants


def add_user(username: str, role: str, model: str, tracking_uri: str | None = None) -> list[Grant]:
    """Create ``username`` (password from ``STAGEFLOW_USER_PASSWORD``) with ``role`` on ``model``.

    An existing user keeps its password and gets the grants. Returns the grants made.

    Raises:
        UsageError: no password given, an unknown role, a model that does not exist.
        StageflowError: the server refused (the caller is not an admin).
    """
    from mlflow.exceptions import MlflowException, RestException  # noqa: PLC0415
    from mlflow.server import get_app_client  # noqa: PLC0415

    uri = tracking.require_server(tracking_uri)
    client = MlflowClient(uri, uri)
    try:
        client.get_registered_model(model)
    except MlflowException:
        raise UsageError(
            f"registered model {model!r} does not exist on {uri}; train it first"
        ) from None
    experiments = {}
    for version in client.search_model_versions(f"name = {tracking.filter_value(model)}"):
        if version.run_id:
            run = client.get_run(version.run_id)
            eid = run.info.experiment_id
            experiments.setdefault(eid, client.get_experiment(eid).name)
    shared = {}
    for name in (LEDGER_EXPERIMENT, BATCH_EXPERIMENT, INFERENCE_EXPERIMENT, MONITORING_EXPERIMENT):
        found = client.get_experiment_by_name(name)
        shared[name] = found.experiment_id if found else client.create_experiment(name)
    grants = plan_grants(role, model, experiments, shared)

    auth = get_app_client("basic-auth", tracking_uri=uri)
    try:
        auth.get_user(username)
    except RestException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise _refused(exc, uri) from None
        password = os.environ.get(USER_PASSWORD_ENV)
        if not password:
            raise UsageError(
                f"a new user needs a password in {USER_PASSWORD_ENV} (never on the command line)"
            ) from None
        try:
            auth.create_user(username, password)
        except RestException as exc2:
            raise _refused(exc2, uri) from None
    try:
        for grant in grants:
            _grant(auth, username, grant)
        if role == "promoter":
            _join_promoters(auth, username)
    except RestException as exc:
        raise _refused(exc, uri) from None
    logger.info("%s is now a %s of %s (%d grants)", username, role, model, len(grants))
    return grants


def _grant(auth, username: str, grant: Grant) -> None:
    """Grant, replacing a different grant the user already has on the same resource."""
    from mlflow.exceptions import RestException  # noqa: PLC0415

    args = (username, grant.resource_type, grant.resource)
    try:
        auth.grant_user_permission(*args, grant.permission)
    except RestException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(*args)
        auth.grant_user_permission(*args, grant.permission)


def _join_promoters(auth, username: str) -> None:
    """Put ``username`` in the role that lets promoters see each other's registry locks."""
    from mlflow.utils.workspace_utils import DEFAULT_WORKSPACE_NAME  # noqa: PLC0415

    role = next((r for r in auth.list_all_roles() if r.name == PROMOTERS_ROLE), None)
    if role is None:
        role = auth.create_role(
            DEFAULT_WORKSPACE_NAME, PROMOTERS_ROLE, "Stageflow promoters: see the registry locks"
        )
        auth.add_role_permission(role.id, REGISTERED_MODEL, "*", READ)
    if all(r.id != role.id for r in auth.list_user_roles(username)):
        auth.assign_role(username, role.id)


def _refused(exc, uri: str) -> StageflowError:
    return StageflowError(
        f"{uri} refused: {exc.error_code}: {str(exc).splitlines()[0][:200]} "
        "(granting needs an admin: set MLFLOW_TRACKING_USERNAME/PASSWORD to one)"
    )
