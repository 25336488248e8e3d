"""Pipelines per family: real tables (categories, gaps, Korean names) and exact skops types."""

import numpy as np
import pandas as pd
import pytest

from experiments import artifacts, families
from stageflow.errors import StageflowError, UsageError


@pytest.fixture
def korean_table():
    rng = np.random.default_rng(0)
    n = 120
    frame = pd.DataFrame(
        {
            "나이": rng.integers(18, 80, n).astype(float),
            "도시 이름": rng.choice(["서울", "부산", "대구"], n),
            "소득": rng.normal(50, 10, n),
        }
    )
    frame.loc[::7, "나이"] = np.nan
    frame.loc[::11, "도시 이름"] = None
    y = (frame["소득"] > 50).map({True: "예", False: "아니오"})
    return frame, y


@pytest.mark.parametrize("family", families.FAMILIES)
def test_every_family_fits_categories_and_missing_values(family, korean_table):
    X, y = korean_table
    pipeline = families.build(family, "classification", X, seed=0).fit(X, y)
    unseen = pd.DataFrame({"나이": [np.nan], "도시 이름": ["광주"], "소득": [55.0]})
    assert pipeline.predict(unseen)[0] in {"예", "아니오"}


@pytest.mark.parametrize("family", families.FAMILIES)
def test_trusted_types_are_exactly_what_the_pipeline_needs(family, korean_table):
    X, y = korean_table
    pipeline = families.build(family, "classification", X, seed=0).fit(X, y)
    needed = artifacts.trusted_types(pipeline)
    assert set(needed) <= artifacts.ALLOWED_TRUSTED_TYPES
    expected_tree = {
        "lr": set(),
        "rf": {"sklearn.tree._tree.Tree"},
        "hgb": {"sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"},
    }[family]
    assert expected_tree <= set(needed)
    assert not (
        {
            "sklearn.tree._tree.Tree",
            "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        }
        - expected_tree
    ) & set(needed)


def test_a_type_outside_the_allow_list_is_refused():
    from sklearn.neighbors import KNeighborsClassifier

    model = KNeighborsClassifier(n_neighbors=1, algorithm="kd_tree").fit([[0.0], [1.0]], [0, 1])
    with pytest.raises(StageflowError, match="does not trust"):
        artifacts.trusted_types(model)


def test_unknown_hyperparameter_lists_the_valid_ones(korean_table):
    X, _ = korean_table
    with pytest.raises(UsageError, match="unknown parameter.*max_deepth.*valid ones:.*max_depth"):
        families.build("hgb", "classification", X, 0, {"max_deepth": 3})


def test_unknown_family_is_a_usage_error(korean_table):
    X, _ = korean_table
    with pytest.raises(UsageError, match="choose one of: lr, rf, hgb"):
        families.build("svm", "classification", X, 0)


def test_params_are_parsed_as_literals():
    parsed = families.parse_params(["max_depth=3", "learning_rate=0.1", "loss=squared_error"])
    assert parsed == {"max_depth": 3, "learning_rate": 0.1, "loss": "squared_error"}
    with pytest.raises(UsageError, match="not KEY=VALUE"):
        families.parse_params(["max_depth"])


def test_plots_of_korean_columns_have_every_glyph(korean_table, recwarn):
    import matplotlib.pyplot as plt

    from experiments import evaluate

    X, y = korean_table
    pipeline = families.build("rf", "classification", X, seed=0).fit(X, y)
    figs = evaluate.figures(pipeline, X, y, "classification", seed=0)
    for fig in figs.values():
        fig.canvas.draw()
        plt.close(fig)
    missing = [str(w.message) for w in recwarn if "missing from font" in str(w.message)]
    assert missing == []
