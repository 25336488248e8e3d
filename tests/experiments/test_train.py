"""Training against a real tracking server: what a run and a registered version hold."""

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from experiments.artifacts import ALLOWED_TRUSTED_TYPES
from experiments.train import train
from stageflow.contract import input_columns

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("source", "family", "metrics", "plots"),
    [
        (
            "builtin:breast_cancer",
            "lr",
            {"accuracy", "f1", "roc_auc", "log_loss"},
            {"confusion_matrix.png", "roc_curve.png", "feature_importance.png"},
        ),
        (
            "builtin:wine",
            "rf",
            {"accuracy", "f1", "roc_auc", "log_loss"},
            {"confusion_matrix.png", "roc_curve.png", "feature_importance.png"},
        ),
        (
            "builtin:diabetes",
            "hgb",
            {"rmse", "mae", "r2"},
            {"predicted_vs_actual.png", "residuals.png", "feature_importance.png"},
        ),
    ],
)
def test_training_logs_a_reviewable_run_and_registers_a_version(
    tracking_uri, model_name, source, family, metrics, plots
):
    result = train(
        source, "target", model_name=model_name, family=family, tracking_uri=tracking_uri
    )

    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.params["family"] == family
    assert run.data.params["data"] == source
    for split in ("train", "val", "test"):
        assert {f"{split}_{m}" for m in metrics} <= set(run.data.metrics)
    assert run.data.tags["stageflow.package.mlflow"] == mlflow.__version__
    contexts = {
        tag.value
        for dataset_input in run.inputs.dataset_inputs
        for tag in dataset_input.tags
        if tag.key == "mlflow.data.context"
    }
    assert contexts == {"train", "validation", "test"}
    logged = {f.path for f in client.list_artifacts(result.run_id, "plots")}
    assert {f"plots/{p}" for p in plots} == logged
    assert [f.path for f in client.list_artifacts(result.run_id, "data")] == ["data/test.parquet"]

    version = client.get_model_version(model_name, result.version)
    assert version.run_id == result.run_id
    assert version.tags["stageflow.family"] == family
    model = mlflow.pyfunc.load_model(f"models:/{model_name}/{result.version}")
    # Stageflow's guarded model: a model from code around the pipeline, stored with skops.
    pyfunc = model.metadata.flavors["python_function"]
    assert pyfunc["artifacts"]["pipeline"]["path"].endswith(".skops")
    trusted = model.unwrap_python_model().contract["skops_trusted_types"]
    assert set(trusted) <= ALLOWED_TRUSTED_TYPES  # exact types, never blanket pickle
    assert len(model.predict(model.input_example)) == len(model.input_example)


def test_same_seed_gives_the_same_model(tracking_uri, model_name):
    first = train("builtin:wine", "target", model_name=model_name, family="rf", seed=3)
    second = train("builtin:wine", "target", model_name=model_name, family="rf", seed=3)
    assert first.metrics == second.metrics
    assert (first.version, second.version) == ("1", "2")


def test_korean_columns_with_categories_and_gaps_go_through_to_the_registered_model(
    tracking_uri, model_name, tmp_path
):
    rng = np.random.default_rng(1)
    n = 240
    frame = pd.DataFrame(
        {
            "나이": rng.integers(18, 80, n),
            "도시 이름": rng.choice(["서울", "부산", "대구"], n),
            "월 소득": rng.normal(300, 50, n),
        }
    )
    frame["구매 여부"] = np.where(frame["월 소득"] + rng.normal(0, 20, n) > 300, "예", "아니오")
    frame.loc[::9, "나이"] = None
    frame.loc[::13, "도시 이름"] = None
    path = tmp_path / "고객.csv"
    frame.to_csv(path, index=False)

    result = train(str(path), "구매 여부", model_name=model_name, family="hgb")

    assert result.task == "classification"
    model = mlflow.pyfunc.load_model(f"models:/{model_name}/{result.version}")
    columns = input_columns(model)
    assert set(columns) == {"나이", "도시 이름", "월 소득"}
    assert columns["나이"] == ("double", False)  # the training data had gaps here
    request = pd.DataFrame(
        {"나이": [None, 40.0], "도시 이름": [None, "서울"], "월 소득": [280.0, 350.0]}
    )
    assert set(model.predict(request)) <= {"예", "아니오"}
