"""Heartbeats: what a fleet operator needs to see about a board, published retained.

Every reading that a board may not have (no thermal zone in a container, no /proc on
another OS) is ``None`` rather than a made-up number.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dccl import __version__ as AGENT_VERSION
from dccl.protocol.payloads import dump_heartbeat
from dccl.protocol.topics import QOS_HEARTBEAT

THERMAL = Path("/sys/class/thermal")


@dataclass
class TrainingStatus:
    """Updated by the agent after each local training run and bundle switch."""

    bundle_version: str | None = None
    round: int | None = None
    last_train_ts: float | None = None
    last_loss: float | None = None
    last_sample_count: int | None = None


def cpu_temperature_c(root: Path = THERMAL) -> float | None:
    """Hottest thermal zone in °C (the kernel reports millidegrees), None if there is none."""
    temps = []
    for zone in sorted(root.glob("thermal_zone*")):
        try:
            temps.append(int((zone / "temp").read_text().strip()) / 1000.0)
        except (OSError, ValueError):
            continue
    return max(temps) if temps else None


def _meminfo() -> tuple[float | None, float | None]:
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        kb = lambda k: int(info[k].split()[0]) / 1024.0  # noqa: E731
        return kb("MemTotal"), kb("MemAvailable")
    except (OSError, KeyError, ValueError):
        return None, None


def _uptime() -> float | None:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def collect(device_id: str, status: TrainingStatus, outbox_depth: int | None, data_dir: str | Path = ".") -> dict[str, Any]:
    mem_total, mem_avail = _meminfo()
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = None
    try:
        disk_free = shutil.disk_usage(data_dir).free / 2**20
    except OSError:
        disk_free = None
    return dict(
        device_id=device_id, ts=time.time(), agent_version=AGENT_VERSION,
        bundle_version=status.bundle_version, round=status.round, last_train_ts=status.last_train_ts,
        last_loss=status.last_loss, last_sample_count=status.last_sample_count, outbox_depth=outbox_depth,
        cpu_temp_c=cpu_temperature_c(), mem_total_mb=mem_total, mem_available_mb=mem_avail, load1=load1,
        disk_free_mb=disk_free, uptime_s=_uptime(),
    )


class HeartbeatPublisher:
    """Publishes a retained heartbeat every ``interval`` seconds through an EdgeMqttClient."""

    def __init__(self, client, status: TrainingStatus, interval: float = 30.0, data_dir: str | Path = "."):
        self.client, self.status, self.interval, self.data_dir = client, status, interval, data_dir
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.sent = 0

    def beat(self) -> bool:
        hb = collect(self.client.device_id, self.status, self.client.outbox_depth(), self.data_dir)
        ok = self.client.publish_telemetry(self.client.topics.heartbeat(self.client.device_id),
                                           dump_heartbeat(**hb), qos=QOS_HEARTBEAT, retain=True)
        self.sent += int(ok)
        return ok

    def start(self) -> "HeartbeatPublisher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        self.client.connected.wait(self.interval)
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(self.interval)
