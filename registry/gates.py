"""Gates: the checks a version must pass before it enters a stage.

A gate is a list of checks; each takes the :class:`GateContext` and returns a
:class:`CheckResult` saying what it measured and whether that passed. Adding a
check means writing one function and listing it in :data:`GATES`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from registry._stages import PRODUCTION, STAGING


@dataclass(frozen=True)
class GateContext:
    client: MlflowClient
    model: str
    version: ModelVersion
    to_stage: str


@dataclass(frozen=True)
class CheckResult:
    check: str
    passed: bool
    detail: str
    figures: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


Check = Callable[[GateContext], CheckResult]


def from_staging(ctx: GateContext) -> CheckResult:
    """Production is entered only from Staging."""
    stage = ctx.version.current_stage
    return CheckResult(
        "from_staging",
        stage == STAGING,
        f"version {ctx.version.version} is in {stage}"
        + ("" if stage == STAGING else "; promote it to Staging first"),
    )


def loads_and_predicts(ctx: GateContext) -> CheckResult:
    """The version loads through pyfunc and predicts its own input example."""
    name = "loads_and_predicts"
    uri = f"models:/{ctx.model}/{ctx.version.version}"
    started = time.perf_counter()
    try:
        model = mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # noqa: BLE001 - any load failure is the verdict
        return CheckResult(name, False, f"{uri} does not load: {_first_line(exc)}")
    load_s = time.perf_counter() - started
    example = model.input_example
    if example is None:
        return CheckResult(name, False, f"{uri} has no input example to predict")
    started = time.perf_counter()
    try:
        predictions = model.predict(example)
    except Exception as exc:  # noqa: BLE001
        return CheckResult(name, False, f"{uri} fails on its input example: {_first_line(exc)}")
    predict_ms = (time.perf_counter() - started) * 1000
    rows = len(example)
    frame = pd.DataFrame(predictions)
    if len(frame) != rows:
        return CheckResult(name, False, f"{uri} returned {len(frame)} predictions for {rows} rows")
    numbers = frame.select_dtypes("number").to_numpy(dtype=float)
    if not np.isfinite(numbers).all():
        return CheckResult(name, False, f"{uri} predicted NaN or infinity on its input example")
    figures = {"load_seconds": round(load_s, 3), "predict_ms": round(predict_ms, 2), "rows": rows}
    return CheckResult(
        name,
        True,
        f"loaded in {load_s:.1f}s, predicted {rows} rows in {predict_ms:.0f} ms",
        figures,
    )


# The checks each target stage runs, cheapest first.
GATES: dict[str, tuple[Check, ...]] = {
    STAGING: (loads_and_predicts,),
    PRODUCTION: (from_staging, loads_and_predicts),
}
# Rollback is the emergency exit: no comparison, but the target must still work.
ROLLBACK_GATE: tuple[Check, ...] = (loads_and_predicts,)


def run(ctx: GateContext, checks: tuple[Check, ...]) -> list[CheckResult]:
    """Run every check (a refusal reports all of them, not only the first failure)."""
    return [check(ctx) for check in checks]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
