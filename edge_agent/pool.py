"""A pool of virtual devices in one OS process: one device per user, torch-free.

``python -m edge_agent.pool CONFIG.json`` (the simulator starts it; see cloud_trainer/simulate).

Each device has what a board has: its own interaction store (``store.db``), state
(``state/state.npz``), durable outbox (``outbox.db``), MQTT connection with its own client id,
last will and HMAC key. What the devices of one pool share is what one host would share: the
bundle, fetched once over MQTT by the pool's control connection (ModelUpdater), and the ONNX
Runtime sessions loaded from it.

Why one event loop and no threads: a paho client driven by ``loop_read`` / ``loop_write`` /
``loop_misc`` costs a socket and a few KB, so thousands fit in one process, where paho's own
``loop_start`` would cost a thread each. One ``selectors`` loop (epoll: no FD_SETSIZE limit)
serves every socket; the CPU work (a device's local round) runs between network passes in slices
of at most ``SLICE_S`` seconds, so keepalives and PUBACKs keep flowing while devices train.

A round, per device (the reference is cloud_trainer.strategies.DCCL + personalize_all):

1. the retained simulation clock ``{prefix}/sim/round`` names the training session ("round": a
   device trains once per session; DCCL has two per data round: on the bundle it holds, then on the
   one MoMoDistill produced), the data round that seeds the samples, the bundle version and the
   time window [fresh_from, until) of the device's fresh interactions;
2. once that bundle is current: φ0 = encoder(profile, last L items before ``until``, φ_prev);
3. a warm device trains φ with full-batch AdamW for the manifest's ``optimizer.steps`` (its
   ``steps_by_positives`` bracket, where it has one) on its fresh window minus the validation slice
   (its newest ``round(val_frac·F)`` interactions) and keeps φ0 when the validation loss got worse
   (or, when the manifest says ``require_val``, when it has no validation slice: then it does not
   train); a cold-start device keeps φ0;
4. the signed patch goes into the outbox (durable), the state is saved, the patch is published
   and leaves the outbox only on PUBACK. Its message id is a hash of (device, bundle, round), so
   a device restarted mid-round rebuilds the same patch and the cloud stores it once.

Training samples are built exactly as the cloud's ``build_ctr_samples`` builds them for this
user (same positions, history, and counter-hashed negatives keyed by (seed, user, position) over
the items the user never interacted with) — so on the same data the device trains what the
in-process experiment trains. The store holds the user's replayed log; interactions after
``until`` are never trained on or used as history, they only leave the negative sampler's
candidate set, as in the reference sampler (which excludes the user's whole sequence).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import resource
import selectors
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dccl.protocol import envelope, payloads
from dccl.protocol.broker import parse_broker_url
from dccl.protocol.manifest import step_budget, val_len
from dccl.protocol.topics import OFFLINE, ONLINE, QOS_AVAILABILITY, QOS_HEARTBEAT, QOS_PATCH, STOPPED, Topics
from edge_agent.heartbeat import TrainingStatus, collect
from edge_agent.model_update import ModelUpdater
from edge_agent.outbox import Outbox
from edge_agent.state import StateStore
from edge_agent.store import POSITIVE_KINDS, Store
from edge_agent.trainer import Encoder, Trainer

log = logging.getLogger("dccl.edge.pool")

SLICE_S = 0.05            # longest stretch of CPU work between two network passes
MISC_EVERY_S = 0.5        # keepalive bookkeeping of every client
STATS_EVERY_S = 0.5
NO_MATCHING_SUBSCRIBERS = 0x10
SESSION_EXPIRY_S = 7 * 24 * 3600


def sim_topic(prefix: str) -> str:
    """The retained simulation clock (round, bundle, fresh window): simulator -> pools only."""
    return f"{prefix}/sim/round"


# ---- training samples: the cloud's build_ctr_samples for one user, numpy only -------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TRAIN_STREAM = 1


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hashed_negatives(seed: int, user: int, pos: np.ndarray, n: int, seen: np.ndarray, n_items: int) -> np.ndarray:
    """[R, n] negatives of the positives at positions ``pos``: counter hash of (seed, user, pos)
    mapped onto the items 1..n_items not in ``seen`` (with replacement), as the cloud samples them."""
    seen = np.unique(seen)
    free = n_items - len(seen)
    if free < 1:
        raise ValueError(f"user {user}: no non-interacted item left to sample negatives from")
    with np.errstate(over="ignore"):
        h = _mix(np.full(len(pos), (seed * 1_000_003 + _TRAIN_STREAM) & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
        h = _mix(h ^ np.uint64(user))
        keys = _mix(h + _GOLDEN * (pos.astype(np.uint64) + np.uint64(1)))
        ctr = np.arange(1, n + 1, dtype=np.uint64)
        z = _mix(keys[:, None] + _GOLDEN * ctr[None, :])
    u = (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    k = (u * free).astype(np.int64)
    adj = seen - 1 - np.arange(len(seen))           # non-interacted ids before each seen item
    return k + 1 + np.searchsorted(adj, k, "right")


def ctr_rows(items: np.ndarray, lo: int, hi: int, *, user: int, seed: int, neg: int, max_len: int,
             n_items: int, profile: np.ndarray) -> dict[str, np.ndarray]:
    """Samples of the positives at positions [lo, hi) of the sequence ``items``: each positive, then
    its ``neg`` negatives; hist = the last ``max_len`` items before the positive."""
    pos = np.arange(lo, hi)
    G = 1 + neg
    cand = np.empty((len(pos), G), np.int64)
    cand[:, 0] = items[pos]
    if neg:
        cand[:, 1:] = hashed_negatives(seed, user, pos, neg, items, n_items)
    padded = np.concatenate([np.zeros(max_len, np.int64), items])
    hist = padded[pos[:, None] + np.arange(max_len)[None, :]]
    label = np.zeros((len(pos), G), np.float32)
    label[:, 0] = 1.0
    n = len(pos) * G
    return {"item": cand.reshape(-1), "hist": np.repeat(hist, G, axis=0), "label": label.reshape(-1),
            "profile": np.broadcast_to(profile, (n, len(profile))).copy()}


def peak_rss_mb() -> float | None:
    """VmHWM of this process. (ru_maxrss is no use here: Linux carries the parent's high-water mark
    across fork + exec, so a pool spawned by the torch process would report the cloud's memory.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def message_id(device_id: str, bundle_version: str, round_: int) -> bytes:
    return hashlib.sha256(f"{device_id}|{bundle_version}|{round_}".encode()).digest()[:16]


# ---- one virtual device ------------------------------------------------------------------------
@dataclass
class VDevice:
    id: str
    key: bytes
    user: int
    cold: bool
    dir: Path
    client: mqtt.Client | None = None
    connected: bool = False
    next_connect: float = 0.0
    attempt: int = 0
    inflight: dict[int, int] = field(default_factory=dict)     # paho mid -> outbox seq
    unrouted: set[int] = field(default_factory=set)            # seqs to offer again at retry_at
    retry_at: float | None = None
    unrouted_delay: float = 0.0
    done_round: int = -1                                       # last round whose patch is made
    outbox_rows: int = 0
    status: TrainingStatus = field(default_factory=TrainingStatus)
    next_heartbeat: float = 0.0

    def outbox(self) -> Outbox:
        return Outbox(self.dir / "outbox.db")


class Pool:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.name = cfg["pool"]
        self.root = Path(cfg["root"])
        self.broker = parse_broker_url(cfg["broker"])
        self.topics = Topics(cfg["prefix"])
        self.sel = selectors.DefaultSelector()
        self.devices = [VDevice(d["id"], bytes.fromhex(d["key"]), int(d["user"]), bool(d["cold"]),
                                self.root / "devices" / d["id"]) for d in cfg["devices"]]
        self.stats = {"patches_made": 0, "patches_published": 0, "patches_acked": 0, "unrouted": 0,
                      "refused": 0, "connects": 0, "disconnects": 0, "heartbeats": 0, "trained": 0,
                      "kept_previous": 0, "train_seconds": 0.0, "provision_seconds": 0.0, "rounds": {}}
        try:     # counters survive a restart of the process (a crash loses at most the last slice)
            old = json.loads((self.root / "stats.json").read_text())
            for k, v in self.stats.items():
                if k != "rounds" and isinstance(old.get(k), (int, float)):
                    self.stats[k] = old[k]
            self.stats["rounds"] = dict(old.get("rounds") or {})
            self.stats["process_starts"] = int(old.get("process_starts", 0)) + 1
        except (OSError, ValueError):
            self.stats["process_starts"] = 1
        self.clock: dict | None = None
        self.model_version: str | None = None
        self.trainer: Trainer | None = None
        self.encoder: Encoder | None = None
        self.stopping = False
        self.control = _Control(self)
        self.updater = ModelUpdater(self.root / "model", self.control, check=self._check_bundle,
                                    on_switch=self._load_bundle)
        self._todo: list[VDevice] = []

    # ---- provisioning: the replayed log goes into each device's own store --------------------
    def provision(self) -> None:
        t0 = time.monotonic()
        feed = np.load(self.cfg["feed"], allow_pickle=False)
        offsets, items, ts, profile = feed["offsets"], feed["items"], feed["ts"], feed["profile"]
        index = {int(u): i for i, u in enumerate(feed["users"])}
        for d in self.devices:
            marker = d.dir / "provisioned"
            d.dir.mkdir(parents=True, exist_ok=True)
            if not marker.exists():
                i = index[d.user]
                lo, hi = offsets[i], offsets[i + 1]
                with Store(d.dir / "store.db") as s:
                    s.ingest([{"event_id": f"{d.user}-{p}", "kind": "interaction", "item": int(items[lo + p]),
                               "ts": float(ts[lo + p])} for p in range(hi - lo)], now=float(ts[hi - 1]))
                    s.set_profile([int(x) for x in profile[i]])
                marker.write_text("ok\n")
            st = StateStore(d.dir / "state").load()
            d.done_round = int(st.counters.get("done_round", -1))
            d.status = TrainingStatus(bundle_version=st.bundle_version, round=d.done_round if d.done_round >= 0 else None,
                                      last_train_ts=st.last_train_time, last_loss=st.last_train_loss,
                                      last_sample_count=st.last_train_samples)
            if (d.dir / "outbox.db").exists():
                with_rows = d.outbox()
                d.outbox_rows = with_rows.depth()
                with_rows.close()
        self.stats["provision_seconds"] = time.monotonic() - t0

    # ---- bundles ---------------------------------------------------------------------------
    def _check_bundle(self, new_dir: Path, old_dir: Path | None) -> bool:
        Trainer(new_dir, self.cfg.get("backend", "auto"), threads=1)   # loads and verifies, or raises
        return True

    def _load_bundle(self, version: str, path: Path) -> None:
        self.trainer = Trainer(path, self.cfg.get("backend", "auto"), threads=1)
        self.encoder = Encoder(self.trainer.bundle, threads=1)
        self.model_version = version
        self._schedule()

    # ---- MQTT per device -------------------------------------------------------------------
    def _make_client(self, d: VDevice) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dccl-dev-{d.id}", protocol=mqtt.MQTTv5)
        if self.broker.username:
            c.username_pw_set(self.broker.username, self.broker.password)
        c.will_set(self.topics.availability(d.id), payloads.dump_availability(OFFLINE), qos=QOS_AVAILABILITY,
                   retain=True)
        c.on_connect = lambda cl, u, f, rc, p: self._on_connect(d, rc)
        c.on_disconnect = lambda cl, u, f, rc, p: self._on_disconnect(d)
        c.on_publish = lambda cl, u, mid, rc, p: self._on_puback(d, mid, rc)
        self._wire(c)
        return c

    def _wire(self, c: mqtt.Client) -> None:
        sel = self.sel

        def opened(cl, u, sock):
            sel.register(sock, selectors.EVENT_READ, cl)

        def closed(cl, u, sock):
            try:
                sel.unregister(sock)
            except (KeyError, ValueError):
                pass

        def want_write(cl, u, sock):
            try:
                sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, cl)
            except (KeyError, ValueError):
                pass

        def no_write(cl, u, sock):
            try:
                sel.modify(sock, selectors.EVENT_READ, cl)
            except (KeyError, ValueError):
                pass

        c.on_socket_open, c.on_socket_close = opened, closed
        c.on_socket_register_write, c.on_socket_unregister_write = want_write, no_write

    def _connect(self, d: VDevice, now: float) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        try:
            if d.client is None:
                d.client = self._make_client(d)
                d.client.connect(self.broker.host, self.broker.port, keepalive=self.cfg.get("keepalive", 30),
                                 clean_start=False, properties=props)
            else:
                d.client.reconnect()
        except OSError:
            d.attempt += 1
            cap = min(10.0, 0.25 * 2 ** min(d.attempt, 10))
            d.next_connect = now + random.uniform(cap / 2, cap)    # jitter: no reconnect in lockstep
            return
        d.next_connect = float("inf")

    def _on_connect(self, d: VDevice, rc) -> None:
        if rc.is_failure:
            d.next_connect = time.monotonic() + 1.0
            return
        d.connected, d.attempt = True, 0
        self.stats["connects"] += 1
        d.client.publish(self.topics.availability(d.id), payloads.dump_availability(ONLINE),
                         qos=QOS_AVAILABILITY, retain=True)
        d.unrouted.clear()
        d.next_heartbeat = time.monotonic() + random.uniform(0, 1.0)
        self._flush(d)

    def _on_disconnect(self, d: VDevice) -> None:
        if d.connected:
            self.stats["disconnects"] += 1
        d.connected = False
        d.next_connect = time.monotonic() + random.uniform(0.1, 0.5)

    def _on_puback(self, d: VDevice, mid: int, rc) -> None:
        seq = d.inflight.pop(mid, None)
        if seq is None:
            return
        if rc.is_failure:
            self.stats["refused"] += 1
            d.unrouted.add(seq)
        elif rc.value == NO_MATCHING_SUBSCRIBERS:   # nobody ingests right now: offer it again later
            self.stats["unrouted"] += 1
            d.unrouted.add(seq)
        else:
            ob = d.outbox()
            ob.delete(seq)
            d.outbox_rows = ob.depth()
            ob.close()
            self.stats["patches_acked"] += 1
            d.unrouted_delay = 0.0
            d.next_heartbeat = min(d.next_heartbeat, time.monotonic() + 0.5)   # the fleet sees the outbox drain
            return
        if d.retry_at is None:
            d.unrouted_delay = min(10.0, max(0.25, d.unrouted_delay * 2))
            d.retry_at = time.monotonic() + d.unrouted_delay

    def _flush(self, d: VDevice) -> None:
        """Publish outbox rows not already in paho's hands (paho resends its own after a reconnect)."""
        if not d.connected or d.outbox_rows == 0:
            return
        ob = d.outbox()
        try:
            held = set(d.inflight.values()) | d.unrouted
            for row in ob.pending():
                if row.seq in held:
                    continue
                info = d.client.publish(row.topic, row.payload, qos=row.qos)
                if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                    d.inflight[info.mid] = row.seq
                    self.stats["patches_published"] += 1
        finally:
            ob.close()

    def _heartbeat(self, d: VDevice, now: float) -> None:
        d.next_heartbeat = now + self.cfg.get("heartbeat_s", 30.0) * random.uniform(0.9, 1.1)
        if not d.connected:
            return
        hb = collect(d.id, d.status, d.outbox_rows, d.dir)
        d.client.publish(self.topics.heartbeat(d.id), payloads.dump_heartbeat(**hb), qos=QOS_HEARTBEAT, retain=True)
        self.stats["heartbeats"] += 1

    # ---- the round ----------------------------------------------------------------------------
    def on_clock(self, payload: bytes) -> None:
        try:
            clock = json.loads(payload)
            int(clock["round"]), str(clock["bundle_version"]), float(clock["fresh_from"]), float(clock["until"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed simulation clock message")
            return
        self.clock = clock
        resend = set(clock.get("resend", ()))
        for d in self.devices:     # the cloud asks again for a patch it never received: same bytes
            if d.id not in resend or d.done_round < clock["round"]:
                continue
            path = d.dir / "last_patch.bin"
            raw = path.read_bytes() if path.exists() else b""
            try:
                same_round = envelope.decode(raw, b"", verify=False).round == clock["round"]
            except Exception:
                same_round = False
            if not same_round:          # the round never produced a patch (it failed): run it again
                d.done_round = clock["round"] - 1
                continue
            ob = d.outbox()
            if ob.put(raw[4:20], self.topics.patch(d.id), raw, QOS_PATCH) is not None:
                self.stats["resent"] = self.stats.get("resent", 0) + 1
            d.outbox_rows = ob.depth()
            ob.close()
            self._flush(d)
        self._schedule()

    def _schedule(self) -> None:
        c = self.clock
        if c is None or c["bundle_version"] != self.model_version:
            return
        queued = {d.id for d in self._todo}
        self._todo += [d for d in self.devices if d.done_round < c["round"] and d.id not in queued]

    def device_round(self, d: VDevice) -> None:
        c, tr, enc = self.clock, self.trainer, self.encoder
        r, version = int(c["round"]), c["bundle_version"]
        b = tr.bundle
        t0 = time.monotonic()
        with Store(d.dir / "store.db") as s:
            events = s.events(POSITIVE_KINDS)
            profile = s.profile_array(len(b.profile_vocab))
        items = np.array([e.item for e in events], np.int64)
        ts = np.array([e.ts for e in events], np.float64)
        # Samples as the bundle says (local_data: negatives, validation fraction, where the fresh window
        # starts), as a board's agent builds them; the clock's values for a bundle without them. The
        # clock's "until" ends the replay: later interactions have not happened yet.
        local = {"neg": self.cfg["neg"], "val_frac": self.cfg["val_frac"], "since": c["fresh_from"],
                 **{k: v for k, v in (b.manifest.get("local_data") or {}).items() if v is not None}}
        lo, hi = int(np.searchsorted(ts, local["since"], "left")), int(np.searchsorted(ts, c["until"], "left"))
        hist = np.zeros(b.max_len, np.int64)
        tail = items[max(0, hi - b.max_len):hi]
        hist[b.max_len - len(tail):] = tail
        states = StateStore(d.dir / "state")
        st = states.load()
        prev = st.phi.get(b.phi_name) if st.phi else None
        phi0 = enc.start_phi(profile, hist, prev)
        phi, metrics, n_train = phi0, {"steps": 0.0}, 0
        if not d.cold and hi > lo:
            seed, neg, L = int(self.cfg["seed"]), int(local["neg"]), b.max_len
            V = val_len(hi - lo, float(local["val_frac"]))
            common = dict(user=d.user, neg=neg, max_len=L, n_items=b.n_items, profile=profile)
            dr = int(c.get("data_round", r))  # the data round seeds the samples as in the reference
            train = ctr_rows(items, lo, hi - V, seed=1000 * seed + 10 * dr + 1, **common)
            n_train = len(train["item"])
            opt = b.manifest["optimizer"]
            if V == 0 and opt.get("require_val", False):
                # No validation slice: no evidence that a trained φ beats φ0 (the reference rule).
                metrics = {"steps": 0.0, "kept_previous": 1.0, "no_val": 1.0}
                self.stats["kept_previous"] += 1
            else:
                val = ctr_rows(items, hi - V, hi, seed=1000 * seed + 10 * dr + 3, **common) if V > 0 else None
                # The reference rule (a board's agent with train.rule "bundle" runs the same call): the
                # whole budget full-batch, then φ0 is kept if the validation loss got worse.
                steps = step_budget(opt["steps"], opt.get("steps_by_positives"), int((train["label"] > 0).sum()))
                res = tr.train(phi0, train, steps=steps, val=val, select="final")
                phi = res.phi
                metrics = {"steps": float(res.steps)}
                if res.losses:
                    metrics["train_loss"] = res.losses[-1]
                if val is not None:
                    metrics.update(val_before=res.val_loss_before, val_after=res.val_loss_after)
                if res.kept_previous:
                    metrics["kept_previous"] = 1.0
                    self.stats["kept_previous"] += 1
            self.stats["trained"] += int(metrics["steps"] > 0)
        phi = b.check_phi(phi)
        metrics = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
        patch = envelope.Patch(device_id=d.id, bundle_version=version, round=r, sample_count=n_train,
                               tensors={b.phi_name: phi.reshape(b.phi_shape)}, metrics=metrics,
                               message_id=message_id(d.id, version, r))
        raw = envelope.encode(patch, d.key)
        tmp = d.dir / "last_patch.bin.tmp"
        tmp.write_bytes(raw)
        os.replace(tmp, d.dir / "last_patch.bin")
        ob = d.outbox()
        if ob.put(patch.message_id, self.topics.patch(d.id), raw, QOS_PATCH) is not None:
            self.stats["patches_made"] += 1
        d.outbox_rows = ob.depth()
        ob.close()
        loss = metrics.get("val_after", metrics.get("train_loss"))
        now = time.time()
        st.phi, st.bundle_version = {b.phi_name: phi}, version
        st.phi_source = "trained" if n_train else enc.source(prev)
        st.rounds, st.last_train_time, st.last_train_loss, st.last_train_samples = r + 1, now, loss, n_train
        st.counters["done_round"] = r
        states.save(st)
        d.done_round = r
        d.status = TrainingStatus(bundle_version=version, round=r, last_train_ts=now, last_loss=loss,
                                  last_sample_count=n_train)
        self.stats["train_seconds"] += time.monotonic() - t0
        rs = self.stats["rounds"].setdefault(str(r), 0)
        self.stats["rounds"][str(r)] = rs + 1
        self._flush(d)
        d.next_heartbeat = 0.0       # tell the fleet view at once

    # ---- the loop -------------------------------------------------------------------------------
    def write_stats(self) -> None:
        s = dict(self.stats, pool=self.name, pid=os.getpid(), devices=len(self.devices),
                 connected=sum(d.connected for d in self.devices), outbox=sum(d.outbox_rows for d in self.devices),
                 model_version=self.model_version, maxrss_mb=peak_rss_mb(),
                 ts=time.time())
        tmp = self.root / f"stats.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(s))
        os.replace(tmp, self.root / "stats.json")

    def run(self) -> None:
        self.provision()
        self.control.start()
        self.updater.start()
        self.control.subscribe(sim_topic(self.topics.prefix), 1)
        cur = self.updater.current_version
        if cur:
            self._load_bundle(cur, self.updater.bundle_path(cur))
        next_misc = next_stats = 0.0
        parent = os.getppid()
        while not self.stopping:
            now = time.monotonic()
            if os.getppid() != parent:     # the simulator is gone (killed): do not linger as an orphan
                break
            for d in self.devices:          # cheap: a float comparison each unless due
                if not d.connected and now >= d.next_connect:
                    self._connect(d, now)
                if d.retry_at is not None and now >= d.retry_at:
                    d.retry_at = None
                    d.unrouted.clear()
                    self._flush(d)
                if d.connected and now >= d.next_heartbeat:
                    self._heartbeat(d, now)
            self.control.tick(now)
            timeout = 0.0 if self._todo else 0.05
            for key, mask in self.sel.select(timeout):
                c = key.data
                if mask & selectors.EVENT_READ:
                    c.loop_read(100)
                if mask & selectors.EVENT_WRITE:
                    c.loop_write()
            if now >= next_misc:
                next_misc = now + MISC_EVERY_S
                for d in self.devices:
                    if d.client is not None:
                        d.client.loop_misc()
                self.control.client.loop_misc()
            deadline = time.monotonic() + SLICE_S
            if self._todo:
                next_stats = 0.0
            while self._todo and time.monotonic() < deadline:
                d = self._todo.pop(0)
                try:
                    self.device_round(d)
                except Exception:      # one bad device never stops the pool; it is logged and skipped
                    log.exception("device %s: round failed", d.id)
                    d.done_round = int(self.clock["round"])
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + STATS_EVERY_S
                self.write_stats()
        self.shutdown()

    def shutdown(self) -> None:
        for d in self.devices:
            if d.client is not None and d.connected:
                d.client.publish(self.topics.availability(d.id), payloads.dump_availability(STOPPED),
                                 qos=QOS_AVAILABILITY, retain=True)
                d.client.loop_write()
                d.client.disconnect()
                d.client.loop_write()
        self.control.client.disconnect()
        self.write_stats()


class _Control:
    """The pool's own connection: bundle announcements and chunks (ModelUpdater) and the clock."""

    def __init__(self, pool: Pool):
        self.pool = pool
        self.topics = pool.topics
        self.device_id = f"pool-{pool.name}"
        self.subs: dict[str, int] = {}
        self.connected = False
        self.next_connect = 0.0
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dccl-pool-{pool.name}", protocol=mqtt.MQTTv5)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        pool._wire(c)
        self.client = c

    def start(self) -> None:
        self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        if self.connected or now < self.next_connect:
            return
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        b = self.pool.broker
        try:
            if self.client.socket() is None and not getattr(self, "_once", False):
                self.client.connect(b.host, b.port, keepalive=30, clean_start=False, properties=props)
                self._once = True
            else:
                self.client.reconnect()
            self.next_connect = float("inf")
        except OSError:
            self.next_connect = now + random.uniform(0.2, 1.0)

    def _on_connect(self, client, userdata, flags, rc, properties):
        if rc.is_failure:
            self.next_connect = time.monotonic() + 1.0
            return
        self.connected = True
        for t, q in self.subs.items():
            client.subscribe(t, q)

    def _on_disconnect(self, *a):
        self.connected = False
        self.next_connect = time.monotonic() + random.uniform(0.1, 0.5)

    def _on_message(self, client, userdata, msg):
        if msg.topic == sim_topic(self.topics.prefix):
            if msg.payload:
                self.pool.on_clock(bytes(msg.payload))
            return
        self.pool.updater.handle(msg)

    # the client interface ModelUpdater uses
    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subs[topic] = qos
        if self.connected:
            self.client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        self.subs.pop(topic, None)
        if self.connected:
            self.client.unsubscribe(topic)

    def publish_telemetry(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        return False    # model-update reports are per board; the pool is not a device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_agent.pool", description=__doc__.splitlines()[0])
    p.add_argument("config", help="pool config JSON written by the simulator")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("DCCL_POOL_LOG", "WARNING"),
                        format="%(asctime)s pool %(levelname)s %(message)s")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))   # one socket per device
    pool = Pool(json.loads(Path(args.config).read_text()))

    def stop(*_):
        pool.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    pool.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
