"""``dccl simulate``: the device-cloud loop over MQTT on one machine, with a report."""

from __future__ import annotations

import argparse
import collections
import math
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from cloud_trainer.config import DATASETS, build_config
from dccl.errors import DcclError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=DATASETS, default=None, help="dataset (default: synthetic, built in)")
    p.add_argument("--data", default=None, help="dataset path (file or folder); default $DCCL_DATA or ../shared/datasets")
    p.add_argument("--devices", type=int, default=None,
                   help="devices = users (synthetic: this many users, default 200; a real dataset: its first N users)")
    p.add_argument("--rounds", type=int, default=None, help="device-cloud rounds K (default 2)")
    p.add_argument("--broker", default=None, help="mqtt://host:port of a broker to use (default: start an embedded Mosquitto)")
    p.add_argument("--out", default="runs/simulate", help="output folder: report.md, results.json, plots, run state")
    p.add_argument("--pools", type=int, default=None, help="agent-pool processes (default: 1 per 2500 devices, at least 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, negatives and training (default 0)")
    p.add_argument("--config", default=None, help="JSON config file (the `dccl experiment` config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set device.steps=10 (repeatable; VALUE is JSON)")
    p.add_argument("--no-tune", action="store_true",
                   help="keep the config's device step budgets (device.steps, bundle_steps, upload_steps), MoMoDistill settings "
                        "and start policy instead of choosing them on the validation slices")
    p.add_argument("--quiet", action="store_true", help="no progress bars or live view")


def subset_users(ds, n: int):
    """The first n users of a dataset (item catalogue unchanged)."""
    if n > ds.n_users:
        raise DcclError(f"--devices {n}: {ds.name} has only {ds.n_users} users")
    if n == ds.n_users:
        return ds
    return replace(ds, n_users=n, sequences=list(ds.sequences[:n]), profile=ds.profile[:n])


def load(args):
    from cloud_trainer.experiment import _parse_set, load_data

    overrides = {"dataset": args.dataset, "data_path": args.data, "rounds": args.rounds, "seeds": 1,
                 "strategies": ["dccl"]}
    if args.no_tune:
        overrides["tune"] = False
    if args.devices is not None:
        if args.devices < 10:
            raise DcclError(f"--devices {args.devices}: at least 10 (activity quintiles need users)")
        overrides["data.synthetic_users"] = args.devices
    elif not args.dataset or args.dataset == "synthetic":
        overrides["data.synthetic_users"] = 200
    overrides.update(_parse_set(args.set))
    cfg = build_config(overrides, args.config)
    ds = load_data(cfg)
    if cfg.dataset != "synthetic" and args.devices is not None:
        ds = subset_users(ds, args.devices)
    return cfg, ds


class LiveView:
    """Progress bars per phase and a live fleet summary (availability + heartbeats over MQTT)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.fleet_view = None
        self.live = None
        self.current = None
        self.t_phase = time.monotonic()

    def start(self):
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True))
        self.live = Live(self._render(None), console=Console(stderr=True), refresh_per_second=4, transient=False)
        self.live.start()
        return self

    def phase(self, name: str) -> None:
        if not self.enabled:
            print(f"[simulate] {name}", file=sys.stderr, flush=True)
            return
        if self.current is not None:
            t = self.progress.tasks[self.current]
            self.progress.update(self.current, completed=t.total or 1, total=t.total or 1)
        self.current = self.progress.add_task(name, total=None)
        self.live.update(self._render(None))

    def update(self, sim, r, stored, total) -> None:
        if not self.enabled:
            return
        if self.fleet_view is None and sim.fleet is not None:
            from cloud_trainer.fleet.status import FleetView
            from dccl.protocol.broker import parse_broker_url
            url = sim.opts.broker or sim.broker.url
            try:
                self.fleet_view = FleetView(parse_broker_url(url), sim.topics).start()
            except DcclError:
                self.fleet_view = None
        if self.current is not None and total:
            self.progress.update(self.current, completed=stored, total=total)
        self.live.update(self._render(sim))

    def _render(self, sim):
        from rich.console import Group
        from rich.table import Table

        parts = [self.progress]
        if sim is not None and self.fleet_view is not None:
            snap = self.fleet_view.snapshot()
            states = collections.Counter(d.state for d in snap)
            bundles = collections.Counter(d.heartbeat.get("bundle_version") or "-" for d in snap)
            outbox = sum(d.heartbeat.get("outbox_depth") or 0 for d in snap)
            losses = [d.heartbeat["last_loss"] for d in snap if d.heartbeat.get("last_loss") is not None]
            t = Table(title=f"fleet under {sim.prefix}/ ({len(snap)} devices seen)", expand=False)
            for col in ("online", "offline", "stopped", "bundle (heartbeats)", "outbox", "mean last loss",
                        "patches stored", "agent processes"):
                t.add_column(col)
            alive = sum(p is not None and p.poll() is None for p in sim.fleet.procs)
            t.add_row(str(states.get("online", 0)), str(states.get("offline", 0)), str(states.get("stopped", 0)),
                      ", ".join(f"{k}: {v}" for k, v in sorted(bundles.items())), str(outbox),
                      f"{sum(losses) / len(losses):.4f}" if losses else "-", str(sim.store.count()),
                      f"{alive}/{len(sim.fleet.procs)}")
            parts.append(t)
        return Group(*parts)

    def stop(self) -> None:
        if self.fleet_view is not None:
            self.fleet_view.stop()
        if self.live is not None:
            if self.current is not None:
                t = self.progress.tasks[self.current]
                self.progress.update(self.current, completed=t.total or 1, total=t.total or 1)
            self.live.stop()


def run(args) -> int:
    from cloud_trainer.simulate import report
    from cloud_trainer.simulate.loop import SimOptions, Simulation

    cfg, ds = load(args)
    print(ds.summary(), file=sys.stderr)
    n = ds.n_users
    pools = args.pools or max(2, math.ceil(n / 2500))
    if pools < 1:
        raise DcclError(f"--pools {pools}: must be >= 1")
    def terminate(*_):
        raise KeyboardInterrupt   # SIGTERM: stop the pools and the embedded broker on the way out

    signal.signal(signal.SIGTERM, terminate)
    view = LiveView(enabled=not args.quiet and sys.stderr.isatty()).start()
    out = Path(args.out)
    try:
        sim = Simulation(cfg, ds, out, SimOptions(broker=args.broker, pools=pools, seed=args.seed, progress=view))
        results = sim.run()
    finally:
        view.stop()
    path = report.write(results, out)
    print(report.metrics_table(results))
    print()
    print(report.counts_table(results))
    print(f"\nreport: {path}  results: {out / 'results.json'}", file=sys.stderr)
    return 0
