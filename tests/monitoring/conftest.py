"""A model trained once on a synthetic table whose distribution the tests control."""

from __future__ import annotations

import uuid

import mlflow
import numpy as np
import pandas as pd
import pytest

from tests.serving.conftest import start_serving  # noqa: F401 - serving for the end-to-end test

COLOURS = ["red", "green", "blue"]
FEATURES = ["a", "b", "c", "colour"]


def draw(n: int, seed: int, shifted: bool = False) -> pd.DataFrame:
    """Rows of the training distribution, or with ``a`` and ``colour`` shifted; label from them."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "a": rng.normal(1.5 if shifted else 0.0, 1, n),
            "b": rng.normal(5, 2, n),
            "c": rng.uniform(0, 10, n),
            "colour": rng.choice(COLOURS, n, p=[0.1, 0.2, 0.7] if shifted else [0.5, 0.3, 0.2]),
        }
    )
    score = (
        frame["a"]
        + 0.5 * (frame["b"] - 5)
        - 0.3 * (frame["c"] - 5)
        + frame["colour"].map({"red": 0.5, "green": 0.0, "blue": -0.5})
        + rng.normal(0, 0.5, n)
    )
    frame["label"] = np.where(score > 0, "yes", "no")
    return frame


@pytest.fixture(scope="session")
def synthetic_model(tracking_server, tmp_path_factory):
    """``(model source, loaded pyfunc)`` of an lr model trained on 3,000 drawn rows."""
    from experiments.train import train

    path = tmp_path_factory.mktemp("synthetic") / "synthetic.csv"
    draw(3000, seed=1).to_parquet(path.with_suffix(".parquet"))
    name = f"session-synthetic-{uuid.uuid4().hex[:6]}"
    result = train(
        str(path.with_suffix(".parquet")),
        "label",
        model_name=name,
        family="lr",
        tracking_uri=tracking_server.uri,
    )
    client = mlflow.MlflowClient(tracking_server.uri)
    source = client.get_model_version(name, result.version).source
    return source, mlflow.pyfunc.load_model(f"models:/{name}/{result.version}")


@pytest.fixture
def synthetic_version(tracking_uri, synthetic_model, model_name):
    """``(name, version, model)``: the synthetic model registered under this test's name."""
    source, model = synthetic_model
    version = mlflow.register_model(source, model_name).version
    return model_name, str(version), model
