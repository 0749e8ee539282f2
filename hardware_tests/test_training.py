"""On-device training of a round within the profile's budgets; thermal readings where exposed."""

from __future__ import annotations

import math

import pytest


def test_round_trains_phi(board_round, profile):
    assert board_round["steps"] == profile.train_steps
    assert all(math.isfinite(x) for x in board_round["phi"] + board_round["losses"])
    assert board_round["phi"] != board_round["phi0"]


def test_round_within_latency_budget(board_round, profile):
    assert board_round["step_ms"] <= profile.step_ms, f"{board_round['step_ms']:.2f} ms per step"
    assert board_round["round_seconds"] <= profile.round_s, f"{board_round['round_seconds']:.1f} s per round"


def test_round_within_memory_budget(board_round, profile):
    assert board_round["peak_rss_mb"] <= profile.peak_rss_mb, f"{board_round['peak_rss_mb']:.0f} MB peak RSS"


def test_thermal_reading_and_throttling(board_round, profile):
    th = board_round["thermal"]
    if th["cpu_temp_c"] is None:
        if profile.thermal:
            pytest.fail(f"profile {profile.name} expects a CPU temperature; /sys/class/thermal has none")
        pytest.skip("this board exposes no thermal zone")
    assert 0 < th["cpu_temp_c"] < profile.max_temp_c, th
    if th["throttle_flags"] is not None:
        assert not th["throttle_flags"]["throttled"], th
        assert not th["throttle_flags"]["under_voltage"], th
