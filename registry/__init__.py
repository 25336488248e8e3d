"""The model registry as Stageflow users see it: stages mirrored by aliases, gates, a ledger.

Public surface:
    promote, rollback, status, history, repair -- the commands' functions;
    set_policy, show_policy, Policy -- the promotion policy of a model (``registry.policy``);
    current_version -- which version the registry names for a stage;
    placements, Placement -- where each stage stands, settled or split (what serving
        and ``status`` both follow);
    require_model -- a clear error when a registered model does not exist;
    paired_bootstrap -- the interval of one model's improvement over another on the same rows
        (the champion gate's rule, which the monitor's shadow comparison shares);
    stage and alias names.
"""

from registry._compare import paired_bootstrap
from registry._stages import (
    ARCHIVED,
    CHALLENGER,
    CHAMPION,
    NONE,
    PRODUCTION,
    STAGING,
    Placement,
    current_version,
    placements,
    require_model,
)
from registry._transition import Refused, TransitionResult
from registry.ledger import Entry
from registry.policy import Policy, set_policy, show_policy
from registry.promote import promote
from registry.repair import repair
from registry.rollback import rollback
from registry.status import Status, history, status

__all__ = [
    "ARCHIVED",
    "CHALLENGER",
    "CHAMPION",
    "NONE",
    "PRODUCTION",
    "STAGING",
    "Entry",
    "Placement",
    "Policy",
    "Refused",
    "Status",
    "TransitionResult",
    "current_version",
    "history",
    "paired_bootstrap",
    "placements",
    "promote",
    "repair",
    "require_model",
    "rollback",
    "set_policy",
    "show_policy",
    "status",
]
