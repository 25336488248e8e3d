"""Errors that reach the user as one line and an exit code (DESIGN.md, "Interface contract")."""


class StageflowError(Exception):
    """Something was refused or failed (a gate said no, a server is down): exit 1."""

    exit_code = 1


class UsageError(StageflowError):
    """Bad usage or bad input (a missing file, an unknown column): exit 2."""

    exit_code = 2


class TrackingServerUnreachable(StageflowError):
    """The MLflow tracking server did not answer."""

    def __init__(self, uri: str, detail: str = ""):
        self.uri = uri
        why = f" ({detail})" if detail else ""
        super().__init__(
            f"tracking server {uri} is not reachable{why}; start one with "
            "`stageflow server start --detach` or set --tracking-uri / MLFLOW_TRACKING_URI"
        )
