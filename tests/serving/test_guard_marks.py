"""The guarded model's mark mode (``on_invalid: mark``): every row answered, per-row problems.

Pure logic on a small pipeline fitted here (no servers): each marked row must carry the
problem the fail mode refuses it for when it is sent alone, and each accepted row the
prediction the fail mode gives it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from experiments import families
from serving.guarded_model import (
    GUARD_PROBLEM,
    PREDICTION,
    GuardedModel,
    Rejected,
    learn_contract,
)

REGIONS = ["대구", "부산", "서울"]


def table(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "나이": rng.integers(20, 80, rows).astype(float),
            "소득": rng.normal(300.0, 60.0, rows).round(1),
            "지역": rng.choice(REGIONS, rows).astype(object),
        }
    )
    frame.loc[rng.random(rows) < 0.15, "소득"] = np.nan
    frame.loc[rng.random(rows) < 0.15, "지역"] = None
    return frame


def fitted(task: str, config: dict | None = None, family: str = "lr") -> GuardedModel:
    X = table(300, seed=0)
    if task == "classification":
        y = pd.Series((X["나이"] > 50).astype(int))
    else:
        y = pd.Series(X["나이"] * 2.0 + X["소득"].fillna(300.0) / 10.0)
    numeric, _ = families.split_columns(X)
    pipeline = families.build(family, task, X, seed=0).fit(X, y)
    contract = learn_contract(X, y, task, numeric, trusted_types=[])
    return GuardedModel().setup(pipeline, contract, config)


def faulty_rows() -> pd.DataFrame:
    """Good rows and rows with each fault (some with two: the first check's problem wins)."""
    good = table(6, seed=1)
    bad = pd.DataFrame(
        {
            "나이": [np.nan, 1e9, -1e9, np.inf, "마흔", 40.0, 41.0, np.nan, 1e9],
            "소득": [300.0, 300.0, 300.0, 300.0, 300.0, 300.0, -1e9, 300.0, 300.0],
            "지역": ["서울", "서울", "서울", "서울", "서울", "제주", "서울", "제주", 7],
        }
    )
    frame = pd.concat([good.astype(object), bad], ignore_index=True)
    return frame.sample(frac=1.0, random_state=3).reset_index(drop=True)


def alone(model: GuardedModel, row: pd.DataFrame):
    """What the fail mode answers for one row: ``(prediction, None)`` or ``(None, problem)``."""
    try:
        return model.predict(None, row)[0], None
    except Rejected as refused:
        return None, refused.body["problem"]


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_each_marked_row_carries_the_problem_it_is_refused_for_alone(task):
    marking = fitted(task, {"on_invalid": "mark"})
    failing = fitted(task)
    rows = faulty_rows()

    answered = marking.predict(None, rows)

    assert list(answered.columns) == [PREDICTION, GUARD_PROBLEM]
    assert answered.index.equals(rows.index)
    seen = set()
    for i in range(len(rows)):
        prediction, problem = alone(failing, rows.iloc[[i]].reset_index(drop=True))
        got_problem = answered[GUARD_PROBLEM].iloc[i]
        assert (None if pd.isna(got_problem) else got_problem) == problem, f"row {i}"
        if problem is None:
            assert answered[PREDICTION].iloc[i] == pytest.approx(prediction), f"row {i}"
        else:
            assert pd.isna(answered[PREDICTION].iloc[i]), f"row {i}"
        seen.add(problem)
    assert seen == {
        None,
        "missing_value",
        "above_range",
        "below_range",
        "not_finite",
        "wrong_type",
        "unknown_category",
    }


def test_class_labels_stay_integers_with_nulls_where_refused():
    answered = fitted("classification", {"on_invalid": "mark"}).predict(None, faulty_rows())
    assert answered[PREDICTION].dtype == "Int64"
    assert answered[GUARD_PROBLEM].dtype == "string"
    assert answered[PREDICTION].isna().tolist() == answered[GUARD_PROBLEM].notna().tolist()


def test_whole_request_problems_are_still_refused_in_mark_mode():
    model = fitted("classification", {"on_invalid": "mark"})
    with pytest.raises(Rejected, match="missing; the model needs it"):
        model.predict(None, table(3, seed=2).drop(columns=["소득"]))


def test_unknown_categories_are_accepted_under_the_flag_policy_in_mark_mode():
    model = fitted("classification", {"on_invalid": "mark", "unknown_category": "flag"})
    rows = table(3, seed=2).assign(지역="제주")
    answered = model.predict(None, rows)
    assert answered[GUARD_PROBLEM].isna().all()
    assert answered[PREDICTION].notna().all()


def test_a_frame_with_no_good_row_answers_all_nulls():
    model = fitted("regression", {"on_invalid": "mark"})
    rows = table(4, seed=2).assign(나이=1e12)
    answered = model.predict(None, rows)
    assert answered[GUARD_PROBLEM].tolist() == ["above_range"] * 4
    assert answered[PREDICTION].isna().all()


def test_an_unknown_on_invalid_value_is_refused():
    with pytest.raises(Exception, match="on_invalid='skip': choose one of fail, mark"):
        fitted("classification", {"on_invalid": "skip"})
