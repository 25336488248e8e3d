"""The data check's decisions on generated frames and on real public data (fast tier)."""

from __future__ import annotations

import numpy as np
import palmerpenguins
import pandas as pd
import pytest

from experiments import data_check, families
from experiments.data_check import DATE, FEATURE, IDENTIFIER, CheckConfig
from experiments.features import CalendarFeatures
from serving import guarded_model
from stageflow.errors import UsageError

ROWS = 400


def table(rows: int = ROWS, seed: int = 0) -> pd.DataFrame:
    """One row per day: a noisy numeric signal, a category, and a binary target."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=rows)
    return pd.DataFrame(
        {
            "date": pd.date_range("2012-01-01", periods=rows, freq="D").strftime("%Y/%m/%d"),
            "x": x,
            "colour": rng.choice(["red", "green", "blue"], rows),
            "label": (x + rng.normal(scale=0.8, size=rows) > 0).astype(int),
        }
    )


def test_a_text_column_of_dates_is_a_date_column_with_the_format_pandas_infers():
    plan = data_check.plan(table(), "label")
    assert plan.columns["date"] == DATE
    assert plan.dates == {"date": "%Y/%m/%d"}
    assert plan.columns["x"] == plan.columns["colour"] == FEATURE


def test_a_datetime_column_is_a_date_column_needing_no_format():
    frame = table().assign(date=lambda f: pd.to_datetime(f["date"], format="%Y/%m/%d"))
    assert data_check.plan(frame, "label").dates == {"date": None}


@pytest.mark.parametrize("values", [["1.5", "2.5", "13.5"] * 10, ["12", "7", "3"] * 10])
def test_numbers_written_as_text_are_not_dates(values):
    assert data_check.date_format(pd.Series(values)) is False


def test_dates_become_parsed_datetimes_and_the_pipeline_takes_them_as_the_raw_column():
    checked = data_check.check(table(), "label", seed=1)
    assert pd.api.types.is_datetime64_any_dtype(checked.X["date"])
    pipeline = families.build("lr", checked.task, checked.X, 1)
    pipeline.fit(checked.splits.X_train, checked.splits.y_train)
    # The raw column as a client has it, for a date after the training period.
    later = checked.splits.X_test.head(3).assign(date=["2031/05/06", "2031/05/07", "2031/05/08"])
    assert len(pipeline.predict(later)) == 3


def test_calendar_features_are_year_month_day_weekday_and_hour_where_training_had_times():
    dates = pd.DataFrame({"d": ["2012-03-04 00:00", "2012-03-05 13:00"]})
    features = CalendarFeatures().fit(dates)
    assert features.transform(dates).tolist() == [
        [2012, 3, 4, 6, 0],
        [2012, 3, 5, 0, 13],
    ]
    assert list(features.get_feature_names_out()) == [
        "d_year",
        "d_month",
        "d_day",
        "d_day_of_week",
        "d_hour",
    ]
    day_only = CalendarFeatures().fit(pd.DataFrame({"d": ["2012-03-04"]}))
    assert day_only.transform(pd.DataFrame({"d": ["not a date"]})).shape == (1, 4)
    assert np.isnan(day_only.transform(pd.DataFrame({"d": ["not a date"]}))).all()


def test_an_identifier_column_is_dropped_and_named_in_a_warning(caplog):
    frame = table().assign(order_id=[f"A-{i:05d}" for i in range(ROWS)])
    checked = data_check.check(frame, "label", seed=1)
    assert checked.plan.columns["order_id"] == IDENTIFIER
    assert "order_id" not in checked.X.columns
    assert checked.plan.ignored == ["order_id"]
    assert any("'order_id'" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_an_integer_column_unique_on_every_row_is_an_identifier():
    frame = table().assign(customer=np.arange(10_000, 10_000 + ROWS))
    assert data_check.plan(frame, "label").columns["customer"] == IDENTIFIER


def test_a_declared_id_column_is_an_identifier_whatever_its_values():
    frame = table().assign(shop=np.resize([1, 2, 3], ROWS))
    plan = data_check.plan(frame, "label", id_columns=["shop"])
    assert plan.identifiers == ["shop"]
    assert plan.declared_identifiers == ["shop"]


@pytest.mark.parametrize(
    ("name", "match"), [("nope", "not in the data; its columns are"), ("label", "is the target")]
)
def test_a_bad_declared_id_column_is_refused_in_one_line(name, match):
    with pytest.raises(UsageError, match=match):
        data_check.plan(table(), "label", id_columns=[name])


def test_the_identifier_threshold_is_data():
    frame = table().assign(code=[f"c{i % 200}" for i in range(ROWS)])  # half distinct
    assert data_check.plan(frame, "label").columns["code"] == FEATURE
    strict_ids = CheckConfig(identifier_distinct_ratio=0.4)
    assert data_check.plan(frame, "label", config=strict_ids).columns["code"] == IDENTIFIER


def test_an_unknown_threshold_name_is_refused():
    with pytest.raises(ValueError, match="identifier_ratio"):
        CheckConfig(identifier_ratio=0.5)


def test_constant_columns_are_dropped_with_a_warning():
    frame = table().assign(country="KR", empty=np.nan)
    checked = data_check.check(frame, "label", seed=1)
    assert checked.plan.constants == ["country", "empty"]
    assert {"country", "empty"}.isdisjoint(checked.X.columns)
    assert "constant column(s) dropped: 'country', 'empty'" in checked.report.warnings


def test_rows_without_a_target_are_dropped_and_counted():
    frame = table().astype({"label": float})
    frame.loc[[3, 50, 51], "label"] = np.nan
    checked = data_check.check(frame, "label", seed=1)
    assert checked.plan.target_missing == 3
    assert sum(len(X) for X, _ in checked.splits.named().values()) == ROWS - 3
    assert checked.report.to_json()["target_missing_rows"] == 3


def test_a_feature_that_alone_predicts_the_target_is_reported_as_leakage():
    frame = table().assign(outcome_code=lambda f: f["label"].map({0: "closed", 1: "won"}))
    report = data_check.check(frame, "label", seed=1).report
    assert [leak["column"] for leak in report.leakage] == ["outcome_code"]
    assert report.leakage[0]["score"] >= 0.99


def test_a_regression_target_copied_into_a_feature_is_leakage():
    frame = table().assign(y=lambda f: f["x"] * 3 + 1, y_copy=lambda f: f["x"] * 3 + 1.0)
    frame = frame.drop(columns=["label"])
    report = data_check.check(frame, "y", seed=1).report
    assert {leak["column"] for leak in report.leakage} == {"x", "y_copy"}
    assert {leak["metric"] for leak in report.leakage} == {"r2"}


def test_leakage_refuses_the_data_under_strict_and_not_otherwise():
    frame = table().assign(leak=lambda f: f["label"] * 10.0)
    data_check.check(frame, "label", seed=1)
    with pytest.raises(data_check.DataCheckRefused, match="'leak' alone scores") as refused:
        data_check.check(frame, "label", seed=1, strict=True)
    assert refused.value.exit_code == 2
    assert "\n" not in str(refused.value)


def test_a_too_small_class_is_reported_and_refused_under_strict():
    frame = table()
    frame.loc[:3, "label"] = 2  # four rows of a third class
    report = data_check.check(frame, "label", seed=1).report
    assert report.small_classes == {"2": 4}
    with pytest.raises(data_check.DataCheckRefused, match="fewer than the rows"):
        data_check.check(frame, "label", seed=1, strict=True)


def test_duplicate_rows_across_the_splits_are_counted():
    frame = table()
    frame = pd.concat([frame, frame.iloc[:100]], ignore_index=True)
    duplicates = data_check.check(frame, "label", seed=1).report.duplicates
    assert duplicates["validation"] + duplicates["test"] > 0
    clean = data_check.check(table(), "label", seed=1).report.duplicates
    assert clean == {"validation": 0, "test": 0}


def test_the_report_is_json_and_markdown_naming_each_column():
    frame = table().assign(order_id=[f"A-{i}" for i in range(ROWS)], country="KR")
    report = data_check.check(frame, "label", seed=1).report
    as_json = report.to_json()
    assert as_json["dropped"] == {"identifier": ["order_id"], "constant": ["country"]}
    assert as_json["dates"] == {"date": "%Y/%m/%d"}
    assert "| order_id | identifier |" in report.to_markdown()
    assert report.summary().startswith("data check: date column(s) 'date' → calendar features")


def test_dropping_every_feature_is_refused_naming_what_was_dropped():
    frame = pd.DataFrame(
        {"id": [f"r{i}" for i in range(ROWS)], "k": 1, "label": [0, 1] * (ROWS // 2)}
    )
    with pytest.raises(UsageError, match="dropped every feature column"):
        data_check.plan(frame, "label")


def test_the_palmer_penguins_keep_every_column_and_raise_no_false_alarm():
    penguins = palmerpenguins.load_penguins()
    checked = data_check.check(penguins, "species", seed=42)
    assert set(checked.plan.columns.values()) == {FEATURE}
    assert checked.plan.target_missing == 0
    assert checked.report.leakage == []
    assert checked.report.small_classes == {}


def test_a_penguin_table_with_a_date_and_an_id_is_read_as_a_user_would_want():
    penguins = palmerpenguins.load_penguins().reset_index(names="penguin_id")
    penguins["observed"] = (
        pd.Timestamp("2007-11-01") + pd.to_timedelta(penguins.index * 2, unit="D")
    ).strftime("%d.%m.%Y")
    plan = data_check.plan(penguins, "sex")
    assert plan.columns["penguin_id"] == IDENTIFIER
    assert plan.dates == {"observed": "%d.%m.%Y"}
    assert plan.target_missing == int(penguins["sex"].isna().sum()) > 0


# -- the contract of a model with dates and ignored columns --------------------------------


@pytest.fixture(scope="module")
def guard():
    frame = table().assign(order_id=[f"A-{i}" for i in range(ROWS)], country="KR")
    checked = data_check.check(frame, "label", seed=1)
    X = checked.splits.X_train
    contract = guarded_model.learn_contract(
        X,
        checked.splits.y_train,
        checked.task,
        families.split_columns(X)[0],
        [],
        date_formats=checked.plan.dates,
        ignored_columns=checked.plan.ignored,
    )
    return guarded_model.Guard(contract, dict(guarded_model.DEFAULT_POLICY))


def request(**changes) -> pd.DataFrame:
    row = {"date": "2012/03/04", "x": 0.5, "colour": "red"} | changes
    return pd.DataFrame({k: [v] for k, v in row.items()})


def test_the_contract_records_dates_and_ignored_columns(guard):
    columns = {c["name"]: c for c in guard.contract["columns"]}
    assert columns["date"]["kind"] == "datetime"
    assert columns["date"]["format"] == "%Y/%m/%d"
    assert guard.contract["ignored_columns"] == ["order_id", "country"]


@pytest.mark.parametrize("when", ["2012/03/04", "2040/12/31", "2040-12-31T08:30:00", "Dec 1 2041"])
def test_the_guard_accepts_any_date_even_after_the_training_period(guard, when):
    _, others, _ = guard.check(request(date=when))
    assert isinstance(others[guard.object_names.index("date")][0], pd.Timestamp)


@pytest.mark.parametrize("bad", ["tomorrow-ish", "2012/13/45", 20120304, True])
def test_the_guard_refuses_what_is_not_a_date_as_wrong_type(guard, bad):
    with pytest.raises(guarded_model.Rejected) as refused:
        guard.check(request(date=bad))
    assert refused.value.body["problem"] == "wrong_type"
    assert refused.value.body["column"] == "date"


def test_the_guard_accepts_and_drops_ignored_columns_but_not_unknown_ones(guard):
    numeric, _, _ = guard.check(request(order_id="A-99999", country="KR"))
    assert numeric.shape == (1, 1)
    with pytest.raises(guarded_model.Rejected, match="not a column the model was trained on"):
        guard.check(request(secret="x"))


def test_more_ignored_columns_can_be_given_at_serve_time(guard):
    extended = guarded_model.Guard(guard.contract, guard.policy, ignored=["session"])
    assert extended.check(request(session="s-1"))[0].shape == (1, 1)
