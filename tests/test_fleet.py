"""Fleet monitoring against the machine's broker with real device processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from rich.console import Console

from cloud_trainer.fleet.status import collect, rows
from cloud_trainer.fleet.watch import render
from tests.mqtt_fixtures import BROKER, REPO, prefix, spawn_device, wait_for  # noqa: F401


def _cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "dccl.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def test_fleet_status_shows_devices_and_a_killed_one_goes_offline(tmp_path, prefix):
    keepalive = 2
    procs = {d: spawn_device(d, BROKER, prefix, tmp_path / f"{d}.db", keepalive=keepalive) for d in ("pi-1", "pi-2")}
    try:
        def both_have_heartbeats():
            st = {r["device"]: r for r in rows(collect(BROKER, prefix, window=0.3))}
            return st if len(st) == 2 and all(r["bundle"] == "v1" for r in st.values()) else None
        st = wait_for(both_have_heartbeats, 10, interval=0.1, what="two devices with heartbeats")
        assert {r["state"] for r in st.values()} == {"online"}
        assert st["pi-1"]["last_loss"] == 0.25 and st["pi-1"]["outbox"] == 0 and st["pi-1"]["round"] == 2

        r = _cli("fleet", "status", "--broker", BROKER, "--prefix", prefix, "--json", "--window", "0.3")
        assert r.returncode == 0, r.stderr
        assert {d["device"]: d["state"] for d in json.loads(r.stdout)} == {"pi-1": "online", "pi-2": "online"}
        r = _cli("fleet", "status", "--broker", BROKER, "--prefix", prefix, "--window", "0.3")
        assert r.returncode == 0 and "pi-1" in r.stdout and "online" in r.stdout and "last_loss" in r.stdout

        t0 = time.monotonic()
        procs["pi-1"].send_signal(signal.SIGKILL)
        wait_for(lambda: {x["device"]: x["state"] for x in rows(collect(BROKER, prefix, window=0.1))}["pi-1"]
                 == "offline", 1.5 * keepalive, interval=0.0, what="pi-1 shown offline")
        assert time.monotonic() - t0 <= 1.5 * keepalive
        assert {x["device"]: x["state"] for x in rows(collect(BROKER, prefix, window=0.1))}["pi-2"] == "online"
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def test_fleet_status_bad_broker_is_one_line_error():
    r = _cli("fleet", "status", "--broker", "mqtt://127.0.0.1:1", "--window", "0.1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot reach broker" in r.stderr
    r = _cli("fleet", "status", "--broker", "http://x")
    assert r.returncode == 2 and "mqtt://" in r.stderr


def test_watch_renders_a_table():
    from cloud_trainer.fleet.status import DeviceStatus
    d = DeviceStatus("pi-1", "online", time.time() - 3,
                     {"bundle_version": "v1", "cpu_temp_c": 51.2, "last_loss": 0.25, "outbox_depth": 2},
                     patches_seen=3, last_round=4)
    console = Console(record=True, width=140)
    console.print(render([d, DeviceStatus("pi-2", "offline")], "dccl"))
    out = console.export_text()
    assert "pi-1" in out and "online" in out and "51.2" in out and "1/2 online" in out and "offline" in out


def test_watch_cli_runs_for_a_duration(prefix):
    r = _cli("fleet", "watch", "--broker", BROKER, "--prefix", prefix, "--duration", "0.5", "--refresh", "0.2")
    assert r.returncode == 0, r.stderr


def test_fleet_status_shows_the_latest_hil_report(prefix):
    """A board's retained hardware-in-the-loop report appears in `dccl fleet status`."""
    from hardware_tests.runner import publish_report

    report = {"passed": False, "arch": "aarch64", "profile": {"name": "pi4"}, "finished": 1.0,
              "summary": {"passed": 11, "failed": 1, "skipped": 2}, "tests": []}
    publish_report(report, "mqtt://127.0.0.1:1883", prefix, "pi-kitchen")
    p = subprocess.run([sys.executable, "-m", "dccl.cli", "fleet", "status", "--prefix", prefix, "--json"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    (row,) = [r for r in json.loads(p.stdout) if r["device"] == "pi-kitchen"]
    assert row["hil"] == "FAIL 1/12 aarch64"
    assert row["hil_report"]["profile"] == "pi4" and row["hil_report"]["skipped"] == 2
    table = subprocess.run([sys.executable, "-m", "dccl.cli", "fleet", "status", "--prefix", prefix],
                           capture_output=True, text=True, timeout=60).stdout
    assert "FAIL 1/12 aarch64" in table
    import paho.mqtt.publish as publish

    publish.single(f"{prefix}/device/pi-kitchen/report", payload=None, retain=True, hostname="127.0.0.1", port=1883)
