"""Names holding a quote reach MLflow's searches as themselves (``tracking.filter_value``)."""

from __future__ import annotations

import uuid

import pytest
from mlflow import MlflowClient
from mlflow.utils.search_utils import SearchModelVersionUtils, SearchUtils

from stageflow.errors import UsageError
from stageflow.tracking import filter_value


@pytest.mark.parametrize("name", ["plain", "bob's model", 'the "best" one', "50% off_", ""])
def test_mlflow_parses_a_filter_value_back_to_the_name_itself(name):
    (attribute,) = SearchModelVersionUtils.parse_search_filter(f"name = {filter_value(name)}")
    (tag,) = SearchUtils.parse_search_filter(f"tags.`stageflow.model` = {filter_value(name)}")

    assert attribute["value"] == name
    assert tag["value"] == name


def test_a_name_holding_both_quotes_is_refused_naming_why():
    with pytest.raises(UsageError, match="both ' and \""):
        filter_value("""it's "odd\"""")


@pytest.mark.slow
def test_a_model_named_with_a_quote_is_found_by_promote_status_history_and_monitor(
    tracking_uri, untime_promotions
):
    from experiments.train import train
    from monitoring import read
    from registry import PRODUCTION, STAGING, history, promote, status
    from serving import inference_log

    name = f"bob's wine {uuid.uuid4().hex[:6]}"
    version = train("builtin:wine", "target", name, family="lr").version
    untime_promotions(name)

    promote(name, version, STAGING, reason="quoted name")
    promote(name, version, PRODUCTION, reason="quoted name")

    now = status(name)
    assert (now.production, now.problems) == (version, [])
    assert [e.to_stage for e in history(name)] == [STAGING, PRODUCTION]
    client = MlflowClient(tracking_uri)
    # The inference log finds its own run again (a second replica joins it, no new run)…
    run_id = inference_log.find_or_create_run(client, name, version)
    assert inference_log.find_or_create_run(client, name, version) == run_id
    # …and the monitor finds it by the model's name.
    assert read.log_runs(client, name) == {version: run_id}
