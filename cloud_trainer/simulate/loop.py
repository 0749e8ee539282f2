"""The cloud's side of a simulated deployment: one process, real MQTT, real agent processes.

The round is the in-process reference itself: ``cloud_trainer.strategies.DCCL.run_round`` runs
unchanged, except that its calls to ``personalize_all`` (every device training its φ: on the bundle
it holds, then on the bundle MoMoDistill produced) are served by the fleet: the current W_f, Θ and
encoder are exported as a bundle and announced over MQTT with ``publish_bundle`` (what ``dccl model
publish`` runs), the agent pools fetch it, each virtual device trains on-device with ONNX Runtime and
publishes a signed patch, ingest stores it, and the φ table handed back to the strategy is read
from the patch store. MoMoDistill step 1 and step 2 then run on it exactly as in
``dccl experiment``. Device-model metrics are computed by the cloud from the uploaded φ on the
bundle's weights (the model every device holds); the future window never goes to a device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import torch
from paho.mqtt.enums import CallbackAPIVersion

import cloud_trainer.strategies as strategies
from cloud_trainer.context import build_context
from cloud_trainer.evaluate import per_user, score_eval_set, summarize
from cloud_trainer.ingest.service import IngestService
from cloud_trainer.ingest.store import open_store
from cloud_trainer.ingest.validate import Validator, load_keys, load_spec
from cloud_trainer.simulate.broker import EmbeddedBroker
from cloud_trainer.simulate.fleet import Fleet
from dccl.errors import DcclError
from dccl.protocol.broker import parse_broker_url
from dccl.protocol.topics import Topics
from edge_agent.pool import sim_topic

log = logging.getLogger("dccl.simulate")

KEYS = strategies.DCCL.keys
KIND = {k: strategies.KIND[k] for k in KEYS}


@dataclass
class SimOptions:
    broker: str | None = None         # None: embedded Mosquitto
    pools: int = 2                    # agent-pool processes
    seed: int = 0
    round_timeout_s: float = 1800.0   # give up on a round whose patches never all arrive
    resend_after_s: float = 30.0      # no new patch for this long: ask the missing devices again
    heartbeat_s: float = 30.0
    backend: str = "auto"
    progress: object = None           # a Progress-like sink (see cli.py); None = silent
    on_wait: object = None            # hook(sim, round, stored, total) while waiting for patches (tests: faults)


@dataclass
class Counts:
    patches_made: int = 0
    patches_published: int = 0
    patches_acked: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: dict = field(default_factory=dict)
    unrouted_retries: int = 0
    resend_requests: int = 0
    reconnects: int = 0
    agent_restarts: int = 0
    broker_restarts: int = 0
    kept_previous: int = 0
    publish_retries: int = 0


class _Publisher:
    """The simulation's clock (retained ``{prefix}/sim/round``), acked by the broker; kept
    connected across broker restarts. Bundles go out through ``publish_bundle``."""

    def __init__(self, url: str, client_id: str):
        b = parse_broker_url(url)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if b.username:
            self.client.username_pw_set(b.username, b.password)
        self.client.reconnect_delay_set(0.2, 2.0)
        self.connected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: self.connected.set() if not rc.is_failure else None
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.connect_async(b.host, b.port, keepalive=30)
        self.client.loop_start()

    def publish(self, messages: list[tuple[str, bytes]], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(messages)
        while pending:
            if not self.connected.wait(max(0.0, deadline - time.monotonic())):
                raise DcclError("cannot publish to the broker: not connected")
            topic, payload = pending[0]
            info = self.client.publish(topic, payload, qos=1, retain=True)
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except RuntimeError:
                pass
            if info.is_published():
                pending.pop(0)
            elif time.monotonic() > deadline:
                raise DcclError(f"publishing {topic}: no PUBACK within {timeout:.0f} s")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Simulation:
    def __init__(self, cfg, ds, out: Path, opts: SimOptions):
        self.cfg, self.ds, self.out, self.opts = cfg, ds, Path(out).resolve(), opts
        self.counts = Counts()
        self.phases: list[dict] = []
        self.bundles: list[dict] = []    # every bundle shipped: version, round, session, its device budget
        self.summ: dict[str, list] = {k: [None] * cfg.rounds for k in KEYS}
        self.users: dict[str, list] = {k: [None] * cfg.rounds for k in KEYS}
        self.phi_rounds: list[np.ndarray] = []
        self.broker: EmbeddedBroker | None = None
        self.fleet: Fleet | None = None
        self.prefix = "dccl-sim-" + hashlib.sha256(f"{out.resolve()}|{time.time()}".encode()).hexdigest()[:8]
        self.topics = Topics(self.prefix)

    # ---- bookkeeping ---------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str, round_: int | None = None, devices: int | None = None, session: int | None = None):
        p = self.opts.progress
        if p is not None:
            p.phase(name)
        t0 = time.perf_counter()
        yield
        self._phase_end = time.perf_counter()
        dt = self._phase_end - t0
        entry = {"phase": name, "round": round_, "seconds": dt}
        if session is not None:
            entry["session"] = session
        if devices:
            entry["devices"] = devices
            entry["devices_per_s"] = devices / dt if dt > 0 else float("inf")
        self.phases.append(entry)

    def _report(self, r: int):
        def report(key, scorer):
            ev = self.ctx.rounds[r].future
            scores = score_eval_set(ev, scorer)
            self.summ[key][r] = summarize(ev, scores)
            self.users[key][r] = per_user(ev, scores)
        return report

    # ---- the run ---------------------------------------------------------------------------
    RUN_STATE = ("fleet", "broker", "bundles", "patches.db", "patches.db-wal", "patches.db-shm")

    def _claim_out(self) -> None:
        """One run per --out at a time (a lock held for the run); a previous run's state there
        (device stores, states and outboxes, broker persistence, bundles, the patch store) is
        removed first — a device that finds its old state would believe it had already trained
        this round. Its report.md / results.json are replaced at the end."""
        import fcntl
        import shutil

        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        self._lock = open(out / ".simulate.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise DcclError(f"--out {out}: another dccl simulate is running there") from None
        stale = [out / n for n in self.RUN_STATE if (out / n).exists()]
        if stale:
            log.info("--out %s: removing the previous run's state (%s)", out, ", ".join(p.name for p in stale))
        for p in stale:
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def run(self) -> dict:
        cfg, ds, out = self.cfg, self.ds, self.out
        self._claim_out()
        t_start = time.perf_counter()
        try:
            with self.phase("broker"):
                if self.opts.broker is None:
                    self.broker = EmbeddedBroker(out / "broker").start()
                url = self.url = self.opts.broker or self.broker.url
            with self.phase("cloud: pretrain + meta-train"):
                torch.set_num_threads(max(1, torch.get_num_threads()))
                self.ctx = build_context(ds, cfg, self.opts.seed)
            self.tuning = {}
            if cfg.tune:
                from cloud_trainer.experiment import tune
                with self.phase("cloud: tune on validation slices"):
                    self.tuning = tune(self.ctx, cfg)
            n = ds.n_users
            with self.phase("fleet: provision devices", devices=n):
                self.fleet = Fleet(out / "fleet", ds, self.ctx.split, cfg, seed=self.opts.seed, prefix=self.prefix,
                                   broker_url=url, pools=self.opts.pools, heartbeat_s=self.opts.heartbeat_s,
                                   backend=self.opts.backend)
                self.fleet.start()
            self.store = open_store(out / "patches.db")
            self.validator = Validator(keys=load_keys(self.fleet.keys_path), topics=self.topics)
            self.ingest = IngestService(url, self.store, self.validator, group="sim",
                                        client_id=f"{self.prefix}-ingest").start()
            self.publisher = _Publisher(url, f"{self.prefix}-cloud")
            strategy = strategies.DCCL()
            strategy.setup(self.ctx)
            for r in range(cfg.rounds):
                self._round(strategy, r)
            if strategy.choices:  # momodistill_each_round
                self.tuning["momodistill_each_round"] = strategy.choices
            self.counts_final()
        finally:
            self.close()
        self.total_seconds = time.perf_counter() - t_start
        return self.results()

    def _round(self, strategy, r: int) -> None:
        calls = []

        def devices_personalize(model, phi0, train, val, dcfg, **kw):
            calls.append(1)
            return self._devices(strategy, r, len(calls) - 1, phi0, dcfg)

        real = strategies.personalize_all
        strategies.personalize_all = devices_personalize
        try:
            strategy.run_round(self.ctx, r, self._report(r))
        finally:
            strategies.personalize_all = real
        self.phi_rounds.append(strategy.phi.numpy().copy())  # each device's φ at the end of the round
        if len(calls) != 2:
            raise RuntimeError(f"the DCCL strategy trained devices {len(calls)} times in round {r}; expected twice")

    def _devices(self, strategy, r: int, k: int, phi0: torch.Tensor, dcfg):
        """Serve personalize_all from the fleet: export, announce, collect one patch per device
        (k = 0: the bundle the devices hold at the round's start; k = 1: the new bundle). The bundle's
        manifest carries the device training settings the strategy asked for (`dcfg`: on a new
        MoMoDistill bundle, the budget chosen for it)."""
        fleet, n = self.fleet, self.ds.n_users
        version = f"r{r}.{k}-{self.prefix[-8:]}"
        bdir = self.out / "bundles" / version
        # The cloud's work between two fleet sessions runs inside the strategy's round (MoMoDistill
        # step 1 + 2 and the metrics before session 1; the previous round's metrics before session 0).
        gap = time.perf_counter() - getattr(self, "_phase_end", time.perf_counter())
        if self.phases and self.phases[-1]["phase"] == "devices: train + upload patches":
            self.phases.append({"phase": "cloud: MoMoDistill step 1 + 2, metrics" if k == 1 else "cloud: metrics",
                                "round": r if k == 1 else r - 1, "seconds": gap})
        with self.phase("cloud: export bundle", r, session=k):
            from onnx_export.bundle import write_bundle
            manifest = write_bundle(strategy.model, strategy.encoder, bdir, version=version, cfg=dcfg,
                                    source={"simulate": self.prefix, "round": r}, overwrite=True,
                                    local_data={"neg": self.cfg.data.neg, "val_frac": self.cfg.data.val_frac,
                                                "since": fleet.clock.window(r)[0]})
            self.validator.spec = load_spec(manifest["trainable"])
            self.bundles.append({"version": version, "round": r, "session": k,
                                 "device_steps": manifest["optimizer"]["steps"]})
        with self.phase("bundle -> devices (MQTT)", r, devices=n, session=k):
            self._publish_bundle(bdir, version)
            self._wait(lambda st: sum(s.get("model_version") == version for s in st) == len(st),
                       "pools to switch to " + version, r)
        lo, hi = fleet.clock.window(r)
        # "round" counts the fleet's training sessions (two per round); "data_round" seeds the samples.
        clock = {"round": 2 * r + k, "data_round": r, "bundle_version": version, "fresh_from": lo, "until": hi,
                 "resend": []}
        with self.phase("devices: train + upload patches", r, devices=n, session=k):
            self.publisher.publish([(sim_topic(self.prefix), json.dumps(clock).encode())])
            latest = self._collect(version, r, clock)
        phi = torch.zeros_like(phi0)
        index = [fleet.user_of[d] for d in latest.device_ids]
        (name, table), = latest.tensors.items()
        phi[torch.as_tensor(index)] = torch.from_numpy(table.reshape(len(index), -1))
        kept = sum(int(m.get("kept_previous", 0)) for m in latest.metrics)
        self.counts.kept_previous += kept
        return phi, {"kept_previous": kept}

    def _publish_bundle(self, bdir: Path, version: str) -> None:
        """What `dccl model publish` does (verify, chunks, announcement, clear the previous
        bundle's chunks), retried while the broker is restarting: every message is retained and
        idempotent, so a retry after a lost connection republishes the same bytes."""
        from cloud_trainer.publish import publish_bundle

        deadline = time.monotonic() + 120.0
        while True:
            try:
                publish_bundle(bdir, self.url, self.prefix, version=version, timeout=30.0)
                return
            except DcclError as exc:
                if time.monotonic() > deadline:
                    raise DcclError(f"publishing bundle {version}: {exc}") from None
                self.counts.publish_retries += 1
                time.sleep(1.0)

    def _wait(self, done, what: str, r: int, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.opts.round_timeout_s)
        while True:
            self.fleet.check_alive()
            st = self.fleet.stats()
            if all(st) and done(st):
                return
            if time.monotonic() > deadline:
                raise DcclError(f"round {r}: timed out waiting for {what}")
            self._tick(r, None, None)
            time.sleep(0.2)

    def _collect(self, version: str, r: int, clock: dict):
        n = self.ds.n_users
        deadline = time.monotonic() + self.opts.round_timeout_s
        last_count, last_change = -1, time.monotonic()
        while True:
            count = self.store.count(version)
            if count != last_count:
                last_count, last_change = count, time.monotonic()
            self._tick(r, count, n)
            if count >= n:
                latest = self.store.latest(version)
                if len(latest) == n:
                    return latest
            if time.monotonic() - last_change > self.opts.resend_after_s:
                have = set(self.store.latest(version).device_ids)
                clock["resend"] = [d for d in self.fleet.ids if d not in have]
                self.counts.resend_requests += len(clock["resend"])
                self.publisher.publish([(sim_topic(self.prefix), json.dumps(clock).encode())])
                last_change = time.monotonic()
            if time.monotonic() > deadline:
                missing = n - len(self.store.latest(version))
                raise DcclError(f"round {r}: {missing} of {n} devices sent no patch within "
                                f"{self.opts.round_timeout_s:.0f} s (see {self.out / 'fleet'}/pool-*/pool.log)")
            time.sleep(0.1)

    def _tick(self, r: int, stored: int | None, total: int | None) -> None:
        self.fleet.check_alive()
        if self.opts.progress is not None:
            self.opts.progress.update(self, r, stored, total)
        if self.opts.on_wait is not None and stored is not None:
            self.opts.on_wait(self, r, stored, total)

    # ---- faults (tests, demos) ----------------------------------------------------------------
    def restart_broker(self, down_seconds: float = 1.0) -> None:
        if self.broker is None:
            raise DcclError("restart_broker needs the embedded broker")
        self.broker.restart(down_seconds)
        self.counts.broker_restarts += 1

    def restart_pool(self, i: int) -> None:
        self.fleet.restart(i)
        self.counts.agent_restarts += 1

    # ---- end ------------------------------------------------------------------------------
    def counts_final(self) -> None:
        c = self.counts
        st = self.fleet.stats()
        c.patches_made = sum(s.get("patches_made", 0) for s in st)
        c.patches_published = sum(s.get("patches_published", 0) for s in st)
        c.patches_acked = sum(s.get("patches_acked", 0) for s in st)
        c.unrouted_retries = sum(s.get("unrouted", 0) for s in st)
        c.reconnects = sum(max(0, s.get("connects", 0) - s.get("devices", 0)) for s in st)
        c.stored = self.store.count()
        c.rejected = self.store.quarantine_counts()
        m = self.ingest.metrics.messages
        c.duplicates = int(m.labels("duplicate")._value.get())
        self.pool_stats = st

    def close(self) -> None:
        for name in ("ingest", "publisher"):
            obj = getattr(self, name, None)
            if obj is not None:
                with contextlib.suppress(Exception):
                    obj.stop()
        if self.fleet is not None:
            self.fleet.stop()
        if getattr(self, "store", None) is not None:
            self.store.close()
        if self.broker is not None:
            self.broker.stop()
        if getattr(self, "_lock", None) is not None:
            self._lock.close()      # releases the flock
            self._lock = None

    def results(self) -> dict:
        rounds = []
        for r in range(self.cfg.rounds):
            rounds.append({k: self.summ[k][r] for k in KEYS})
        return {
            "command": "dccl simulate",
            "dataset": self.ds.summary(), "synthetic": bool(self.ds.synthetic),
            "devices": self.ds.n_users, "cold_devices": int(self.ctx.split.cold.sum()),
            "pools": self.fleet.n_pools if self.fleet else 0, "seed": self.opts.seed,
            "broker": "embedded mosquitto" if self.opts.broker is None else self.opts.broker,
            "config": self.cfg.to_dict(), "tuning": self.tuning,
            "kinds": KIND, "rounds": rounds,
            "counts": self.counts.__dict__,
            "phases": self.phases,
            "bundles": self.bundles,
            "pool_peak_rss_mb": [s.get("maxrss_mb") for s in getattr(self, "pool_stats", [])],
            "total_seconds": self.total_seconds,
        }
