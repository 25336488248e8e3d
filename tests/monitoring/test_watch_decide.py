"""What `stageflow watch` decides from one monitoring window (pure logic, no servers)."""

from __future__ import annotations

import pytest

from monitoring.watch import DEFAULTS, State, decide, parse_acts, seconds, settings
from monitoring.window import Window
from stageflow.errors import UsageError

NOW = 1_000_000.0


def window(*details, version="2", labelled_rows=0):
    """A MonitorResult.to_json() for Production ``version`` with these alarm details."""
    live = {"metric": "accuracy", "value": 0.6, "rows": labelled_rows} if labelled_rows else None
    return {
        "model": "m",
        "since": "1h",
        "versions": [
            {
                "version": version,
                "role": "production",
                "rows": 1000,
                "alarms": [d["message"] for d in details],
                "alarm_details": list(details),
                "live_metrics": live,
                "run_id": "monitoring-run",
            }
        ],
    }


LIVE = {
    "kind": "live_metric",
    "message": "accuracy 0.61 is below its test 0.95 by more than 5%",
    "value": 0.61,
    "high": 0.66,
    "test_value": 0.95,
}
SLO = {"kind": "slo", "message": "refusal rate 0.20 > 0.05", "refusal_rate": 0.2}
DRIFT = {"kind": "drift", "message": "column alcohol drifted (PSI 0.9)", "columns": ["alcohol"]}


def state(**given):
    values = {"production": "2", "rollback_target": "1", "now": NOW} | given
    return State(**values)


def test_a_live_metric_alarm_rolls_production_back_with_the_alarm_and_figures_as_reason():
    (action,) = decide(window(LIVE), settings(None), state())
    assert (action.kind, action.version, action.target, action.skipped) == (
        "rollback",
        "2",
        "1",
        "",
    )
    assert action.reason.startswith("auto-rollback: accuracy 0.61 is below its test 0.95")
    assert '"test_value": 0.95' in action.reason


def test_no_alarm_means_no_action():
    assert decide(window(), settings(None), state()) == []


def test_an_slo_alarm_rolls_back_only_after_the_policys_consecutive_windows():
    rules = settings(None)
    assert rules["slo"]["windows"] == 3
    assert decide(window(SLO), rules, state(slo_windows=1)) == []
    (action,) = decide(window(SLO), rules, state(slo_windows=2))
    assert action.kind == "rollback"
    assert "3 consecutive windows" in action.reason


def test_no_rollback_within_the_cool_down_after_an_automatic_one():
    (action,) = decide(window(LIVE), settings(None), state(last_auto_rollback=NOW - 600))
    assert action.skipped.startswith("cool-down")
    (later,) = decide(window(LIVE), settings(None), state(last_auto_rollback=NOW - 3601))
    assert later.skipped == ""


def test_a_version_rolled_back_from_automatically_is_never_an_automatic_target_again():
    (action,) = decide(window(LIVE), settings(None), state(marked={"1"}))
    assert "rolled back from automatically" in action.skipped


def test_rollback_disabled_by_policy_or_by_act_does_nothing():
    off = settings(type("P", (), {"values": {"monitoring": {"rollback": {"enabled": False}}}})())
    assert off["rollback"] == {"enabled": False, "cooldown": "1h"}
    assert decide(window(LIVE), off, state()) == []
    assert decide(window(LIVE), settings(None), state(), acts=["retrain"]) == []


def test_a_drift_alarm_asks_for_a_retrain_of_production():
    (action,) = decide(window(DRIFT), settings(None), state())
    assert (action.kind, action.trigger, action.version, action.skipped) == (
        "retrain",
        "drift",
        "2",
        "",
    )


def test_retrain_on_drift_turned_off_ignores_drift_but_not_enough_labels():
    off = settings(type("P", (), {"monitoring": {"retrain": {"on_drift": False}}})())
    assert decide(window(DRIFT), off, state()) == []
    (action,) = decide(window(DRIFT, labelled_rows=600), off, state())
    assert action.trigger == "labels"


def test_a_rollback_and_a_retrain_are_not_taken_in_the_same_window():
    rollback, retrain = decide(window(LIVE, DRIFT), settings(None), state())
    assert rollback.skipped == ""
    assert "rollback comes first" in retrain.skipped


def test_no_automatic_retrain_within_the_cool_down():
    (action,) = decide(window(DRIFT), settings(None), state(last_auto_retrain=NOW - 60))
    assert action.skipped.startswith("cool-down")


def test_settings_keep_the_contract_defaults_for_keys_a_policy_leaves_out():
    rules = settings(type("P", (), {"values": {"monitoring": {"slo": {"windows": 5}}}})())
    assert rules["slo"] == DEFAULTS["slo"] | {"windows": 5}
    assert rules["auto_promote"] is False


@pytest.mark.parametrize(
    ("text", "expected"), [("1h", 3600), ("15m", 900), ("90s", 90), ("1h30m", 5400)]
)
def test_durations_read_like_the_cli_writes_them(text, expected):
    assert seconds(text) == expected


@pytest.mark.parametrize("text", ["15min", "1 hour", "90"])
def test_a_period_the_monitor_s_window_would_refuse_is_refused_naming_the_flag(text):
    # `watch --every` is also the monitor's window: one grammar, refused before any window.
    with pytest.raises(UsageError, match="^--every: .* is not a duration like"):
        seconds(text)
    with pytest.raises(UsageError, match="^--since: "):
        Window.ending_now(text)


@pytest.mark.parametrize("text", ["soon", "0s", "-1h"])
def test_a_bad_duration_is_a_usage_error(text):
    with pytest.raises(UsageError):
        seconds(text)


def test_an_unknown_action_is_a_usage_error_naming_the_valid_ones():
    assert parse_acts("rollback, retrain") == ("rollback", "retrain")
    with pytest.raises(UsageError, match="rollback"):
        parse_acts("rollback,reboot")
