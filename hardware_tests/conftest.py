"""The HIL suite's options, shared fixtures and its JSON report.

    pytest hardware_tests --hil-target host --hil-bundle BUNDLE [--hil-out DIR]
    dccl hil run --target emulated-aarch64 --bundle BUNDLE --out DIR       (the same, plus publishing)

The probe (``hardware_tests.probe``) runs on the target; assertions run here. Facts worth
keeping (architecture, backend, parity, timings, thermal) go into the report through the
``record`` fixture; ``DIR/report.json`` is written when the session ends.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hardware_tests.profiles import get_profile
from hardware_tests.target import REPO, host_target, make_target

REPORT_SCHEMA = "dccl-hil-report/1"
_facts: dict[str, Any] = {}
_results: list[dict[str, Any]] = []
_t0 = time.time()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("hil", "hardware-in-the-loop")
    g.addoption("--hil-target", default="host", help="host | emulated-aarch64 | ssh://user@board[:port]")
    g.addoption("--hil-profile", default=None, help="board profile (default: host / emulated-aarch64 by target)")
    g.addoption("--hil-bundle", default=None, help="model bundle directory to test with (required)")
    g.addoption("--hil-python", default=None,
                help="interpreter on the target (host: this one; ssh: python3, e.g. /opt/dccl/venv/bin/python)")
    g.addoption("--hil-reference-python", default=None,
                help="x86 interpreter of the reference run compared with a non-host target (default: this one)")
    g.addoption("--hil-ssh-option", action="append", default=[], help="extra ssh -o option (repeatable)")
    g.addoption("--hil-out", default=None, help="write DIR/report.json")


def _opt(config: pytest.Config, name: str):
    return config.getoption(name)


def pytest_configure(config: pytest.Config) -> None:
    global _t0
    _facts.clear()
    _results.clear()
    _t0 = time.time()
    spec = _opt(config, "--hil-target")
    default_profile = spec if spec in ("host", "emulated-aarch64") else None
    name = _opt(config, "--hil-profile") or default_profile
    if name is None:
        raise pytest.UsageError("--hil-profile is required for an ssh:// target (pi4, pi5, jetson-orin-nano, host)")
    config.stash_profile = get_profile(name)   # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def profile(pytestconfig):
    return pytestconfig.stash_profile


@pytest.fixture(scope="session")
def record():
    """record(key, value): a fact for the JSON report."""
    return _facts.__setitem__


@pytest.fixture(scope="session")
def target(pytestconfig, profile):
    t = make_target(_opt(pytestconfig, "--hil-target"), python=_opt(pytestconfig, "--hil-python"),
                    qemu_cpu=profile.qemu_cpu, ssh_options=_opt(pytestconfig, "--hil-ssh-option"))
    _facts["target"] = t.describe()
    yield t
    t.close()


@pytest.fixture(scope="session")
def bundle(pytestconfig) -> Path:
    b = _opt(pytestconfig, "--hil-bundle")
    if not b:
        pytest.fail("--hil-bundle BUNDLE is required (a model bundle from `dccl export`)", pytrace=False)
    p = Path(b).resolve()
    if not (p / "manifest.json").exists():
        pytest.fail(f"--hil-bundle {p}: no manifest.json", pytrace=False)
    return p


def run_round(t, bundle_path: str, steps: int, timeout: float) -> dict[str, Any]:
    probe = t.start(["round", "--bundle", bundle_path, "--steps", str(steps), "--backend", "portable"])
    msg = probe.expect("round", timeout=timeout)
    probe.close()
    return msg


@pytest.fixture(scope="session")
def board_round(target, bundle, profile, record) -> dict[str, Any]:
    """One training round on the target (portable backend), run once per session."""
    msg = run_round(target, target.stage(bundle), profile.train_steps, timeout=max(120.0, 3 * profile.round_s))
    record("board", msg["runtime"])
    record("training", {k: msg[k] for k in ("backend", "bundle_version", "steps", "step_ms", "train_seconds",
                                            "load_seconds", "round_seconds", "peak_rss_mb")}
           | {"first_loss": msg["losses"][0], "last_loss": msg["losses"][-1]})
    record("thermal", msg["thermal"])
    record("self_check", msg["self_check"])
    return msg


@pytest.fixture(scope="session")
def reference_round(pytestconfig, bundle, profile) -> dict[str, Any]:
    """The same round on this (x86) machine: what a non-host target must agree with."""
    t = host_target(_opt(pytestconfig, "--hil-reference-python") or sys.executable)
    return run_round(t, str(bundle), profile.train_steps, timeout=120)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        entry = {"test": report.nodeid.split("::")[-1], "module": report.nodeid.split("::")[0].split("/")[-1],
                 "outcome": report.outcome, "seconds": round(report.duration, 3)}
        if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            entry["reason"] = report.longrepr[2]
        elif report.outcome == "failed":
            entry["reason"] = (report.longreprtext or "").strip().splitlines()[-1][:500] if report.longreprtext else ""
        _results.append(entry)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = session.config.getoption("--hil-out")
    if not out:
        return
    counts = {k: sum(r["outcome"] == k for r in _results) for k in ("passed", "failed", "skipped")}
    profile = session.config.stash_profile
    report = {
        "schema": REPORT_SCHEMA, "started": _t0, "finished": time.time(),
        "target": _facts.get("target", {"name": session.config.getoption("--hil-target")}),
        "profile": profile.as_dict(), "controller": {"machine": platform.machine(), "python": sys.version.split()[0]},
        "arch": (_facts.get("board") or {}).get("machine"),
        "passed": counts["failed"] == 0 and counts["passed"] > 0 and exitstatus == 0,
        "summary": counts, "tests": _results,
        **{k: v for k, v in _facts.items() if k != "target"},
    }
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, allow_nan=False))
    tmp.replace(d / "report.json")


__all__ = ["REPO"]
