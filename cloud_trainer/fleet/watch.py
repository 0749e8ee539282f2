"""``dccl fleet watch``: a live terminal view of the fleet (rich).

Same subscriptions as ``fleet status`` plus the patch topic, whose headers (not
verified: display only) give the number of patches seen in each device's latest round.
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from dccl.errors import DcclError
from dccl.protocol.broker import parse_broker_url
from dccl.protocol.topics import Topics
from cloud_trainer.fleet.status import DeviceStatus, FleetView

_STYLE = {"online": "green", "offline": "red", "stopped": "yellow", "unknown": "dim"}


def render(devices: list[DeviceStatus], prefix: str, now: float | None = None) -> Table:
    now = now or time.time()
    t = Table(title=f"DCCL fleet under {prefix}/  ({sum(d.state == 'online' for d in devices)}/{len(devices)} online)")
    for col in ("device", "state", "last seen", "bundle", "temp °C", "last loss", "outbox", "round", "patches"):
        t.add_column(col)
    for d in devices:
        hb = d.heartbeat
        seen = "-" if d.last_seen is None else f"{now - d.last_seen:.0f} s ago"
        t.add_row(
            d.device_id, f"[{_STYLE.get(d.state, '')}]{d.state}[/]", seen, str(hb.get("bundle_version") or "-"),
            "-" if hb.get("cpu_temp_c") is None else f"{hb['cpu_temp_c']:.1f}",
            "-" if hb.get("last_loss") is None else f"{hb['last_loss']:.4f}",
            "-" if hb.get("outbox_depth") is None else str(hb["outbox_depth"]),
            "-" if d.last_round is None else str(d.last_round), str(d.patches_seen),
        )
    return t


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://host:port (default: local)")
    p.add_argument("--prefix", default="dccl", help="topic prefix (default: dccl)")
    p.add_argument("--refresh", type=float, default=1.0, help="seconds between redraws (default: 1)")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")


def run(args: argparse.Namespace) -> int:
    try:
        broker, topics = parse_broker_url(args.broker), Topics(args.prefix)
    except ValueError as exc:
        raise DcclError(str(exc)) from None
    view = FleetView(broker, topics, patches=True).start()
    end = None if args.duration is None else time.monotonic() + args.duration
    try:
        with Live(render([], topics.prefix), console=Console(), refresh_per_second=4) as live:
            while end is None or time.monotonic() < end:
                time.sleep(args.refresh)
                live.update(render(view.snapshot(), topics.prefix))
    finally:
        view.stop()
    return 0
