"""``dccl edge run``: the long-running device agent. Torch-free.

One process per board. It connects to the broker (``EdgeMqttClient``: retained ``online``,
last will ``offline``, ``stopped`` on a clean shutdown), publishes a retained heartbeat with
the real training status, follows the model announcements (``ModelUpdater``), obeys commands
and, after every local training round, sends the signed patch through the durable outbox.

Model updates. A new bundle, once fetched and verified, is *checked* before it is used:
its graphs must load (training step, inference, encoder), and on this device's own
validation slice (the newest ``train.val_frac`` of its positives — by default the bundle's
``local_data.val_frac`` — with seeded negatives)
the new bundle with its encoder's starting φ must not be worse than the current bundle with
the current φ, by more than ``update_tolerance`` (relative). Otherwise it is refused and the
device stays on the current bundle (``ModelUpdater`` reports ``rolled_back``). Without local
validation data there is nothing to compare on and a loadable bundle is taken. After a
switch (or a ``rollback`` command) the starting φ is computed with the bundle's encoder.

Commands (``P/cmd/{id}`` and ``P/cmd/all``, JSON ``{"command", "args"}``):
``train_now`` (one round, then the patch), ``rollback`` (to the previous bundle),
``report`` (status as a report). Every command is answered by a ``command`` report.

Patches: the message id is derived from (device, bundle, round), so the patch of a round is
the same message however often it is sent; on start the last round's patch is offered again
(the outbox and the cloud store it once), which covers a crash between saving the state and
queuing the patch.

The loop is single-threaded (paho's network thread and the heartbeat thread aside): inbound
messages are handled in order, a training round blocks message handling for its length
(bounded by ``train.max_seconds``), and SIGTERM / SIGINT end the loop after the current step.
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from dccl.errors import DcclError
from dccl.protocol import envelope, payloads
from dccl.protocol.errors import ProtocolError
from dccl.protocol.topics import QOS_COMMAND, QOS_REPORT
from edge_agent.agent import MANIFEST, Agent
from edge_agent.config import AgentConfig
from edge_agent.heartbeat import HeartbeatPublisher, TrainingStatus
from edge_agent.model_update import ModelUpdater
from edge_agent.mqtt_client import EdgeMqttClient

log = logging.getLogger("dccl.edge.run")


def patch_message_id(device_id: str, bundle_version: str, round_: int) -> bytes:
    """Deterministic per (device, bundle, round): a resent round is one message to the cloud."""
    return hashlib.sha256(f"dccl-patch\0{device_id}\0{bundle_version}\0{round_}".encode()).digest()[:16]


def _jsonable(obj: Any) -> Any:
    """Reports are strict JSON: non-finite floats become null, numpy scalars plain numbers."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


class EdgeRunner:
    def __init__(self, config: AgentConfig, *, heartbeat_interval: float = 30.0, update_tolerance: float = 0.01,
                 train_every: float | None = None, keepalive: int = 30):
        key = config.hmac_key_bytes
        if key is None:
            raise DcclError("mqtt.hmac_key is not set: `edge run` signs every patch with it "
                            "(e.g. \"hmac_key\": \"{DCCL_HMAC_KEY}\" and the key in that variable)")
        if (config.bundle_dir / MANIFEST).exists():
            raise DcclError(f"bundle_dir {config.bundle_dir} holds a bundle; `edge run` needs a model-update root "
                            "(an empty or new directory: bundles arrive over MQTT into bundles/<version>/)")
        if update_tolerance < 0 or not math.isfinite(update_tolerance):
            raise DcclError(f"update tolerance {update_tolerance}: must be a finite number >= 0")
        if train_every is not None and not train_every > 0:
            raise DcclError(f"--train-every {train_every}: must be > 0 seconds")
        self.config, self.key = config, key
        self.update_tolerance, self.train_every = update_tolerance, train_every
        self.device_id = config.device_id
        config.bundle_dir.mkdir(parents=True, exist_ok=True)
        self.agent = Agent(config)
        self.client = EdgeMqttClient(self.device_id, config.mqtt.broker, config.state_dir / "outbox.sqlite",
                                     prefix=config.mqtt.prefix, keepalive=keepalive, tls_ca=config.mqtt.tls_ca)
        self.topics = self.client.topics
        self.status = TrainingStatus()
        self.updater = ModelUpdater(config.bundle_dir, self.client, check=self._check_bundle,
                                    on_switch=self._on_switch)
        self.heartbeat = HeartbeatPublisher(self.client, self.status, interval=heartbeat_interval,
                                            data_dir=config.state_dir)
        self.stop_event = threading.Event()
        self.last_check: dict[str, Any] | None = None

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> "EdgeRunner":
        self._refresh_status()
        self.updater.start()
        self.client.subscribe(self.topics.command(self.device_id), QOS_COMMAND)
        self.client.subscribe(self.topics.command_all(), QOS_COMMAND)
        self.client.start()
        self.heartbeat.start()
        self._resend_last_patch()
        return self

    def run(self) -> None:
        """Until ``stop_event``: inbound messages in order, scheduled training if asked."""
        next_train = None if self.train_every is None else time.monotonic() + self.train_every
        while not self.stop_event.is_set():
            timeout = 0.5 if next_train is None else max(0.0, min(0.5, next_train - time.monotonic()))
            try:
                msg = self.client.inbox.get(timeout=timeout)
            except queue.Empty:
                msg = None
            if msg is not None:
                self.handle(msg)
            if next_train is not None and time.monotonic() >= next_train:
                self.train_and_publish("schedule")
                next_train = time.monotonic() + self.train_every

    def stop(self) -> None:
        """Clean shutdown: heartbeat off, retained ``stopped``, DISCONNECT (no last will)."""
        self.stop_event.set()
        self.heartbeat.stop()
        self.client.stop()
        self.agent.close()

    # ---- inbound ----------------------------------------------------------------------
    def handle(self, msg) -> None:
        """One inbound message; nothing a peer sends may stop the agent."""
        try:
            if self.updater.handle(msg):
                return
            if msg.topic in (self.topics.command(self.device_id), self.topics.command_all()):
                self._on_command(msg.payload)
        except Exception as exc:     # a bug or a disk error on one message: report it, keep running
            log.exception("error handling %s", msg.topic)
            self._report("error", topic=msg.topic, error=f"{type(exc).__name__}: {exc}")

    def _on_command(self, payload: bytes) -> None:
        try:
            cmd = payloads.load_command(payload)
        except ProtocolError as exc:
            log.warning("ignoring command: %s", exc)
            self._report("command", command=None, ok=False, error=str(exc))
            return
        name = cmd["command"]
        log.info("command %s", name)
        if name == "train_now":
            out = self.train_and_publish("command")
            self._report("command", command=name, ok=out.get("error") is None, result=out)
        elif name == "rollback":
            ok = self.updater.rollback()
            self._refresh_status()
            self._report("command", command=name, ok=ok, current=self.updater.current_version)
        else:   # report
            self._report("command", command=name, ok=True, result=self.status_report())

    # ---- training and patches ------------------------------------------------------------
    def train_and_publish(self, reason: str) -> dict[str, Any]:
        """One local round; its φ signed and queued in the outbox. Errors are returned, not raised."""
        try:
            res = self.agent.train_round()
        except DcclError as exc:
            log.warning("training round (%s) not run: %s", reason, exc)
            return {"error": str(exc)}
        self._refresh_status()
        if res.get("skipped"):
            log.info("training round (%s) skipped: %s", reason, res["skipped"])
            return {**res, "patch": None, "reason": reason}
        sent = self._send_patch()
        self.heartbeat.beat()
        return {**res, **sent, "reason": reason}

    def _send_patch(self) -> dict[str, Any]:
        st = self.agent.state()
        if not st.bundle_version or not st.phi:
            return {"patch": None}
        metrics = {"loss": st.last_train_loss, "rounds": float(st.rounds)}
        metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        p = envelope.Patch(device_id=self.device_id, bundle_version=st.bundle_version, round=st.rounds,
                           sample_count=int(st.last_train_samples), tensors=dict(st.phi), metrics=metrics,
                           message_id=patch_message_id(self.device_id, st.bundle_version, st.rounds))
        seq = self.client.send_patch(p.message_id, envelope.encode(p, self.key))
        log.info("patch of round %d (bundle %s) queued: %s", st.rounds, st.bundle_version,
                 "new" if seq is not None else "already in the outbox")
        return {"patch": p.message_id.hex(), "outbox_depth": self.client.outbox_depth()}

    def _resend_last_patch(self) -> None:
        try:
            st = self.agent.state()
        except DcclError as exc:
            log.warning("state unreadable, nothing to resend: %s", exc)
            return
        if st.rounds > 0 and st.phi_source == "trained" and st.bundle_version:
            self._send_patch()

    # ---- model updates -------------------------------------------------------------------
    def _evaluate(self, bundle_dir: Path) -> dict[str, Any]:
        """Load every graph of the bundle (raises if one does not load) and its validation loss
        on local data with the φ this device would use with it (None: no validation data)."""
        from edge_agent import trainer as T
        from edge_agent.agent import BundleModel, local_samples

        cfg, t = self.config, self.config.train
        model = BundleModel(cfg, bundle_dir)               # manifest + sha256 of every file
        info, bundle = model.info, model.bundle
        trainer = T.Trainer(bundle, backend=t.backend, threads=1)   # training + inference graphs
        store, st = self.agent.store, self.agent.state()
        vocab = np.array(info.profile_vocab, dtype=np.int64)
        profile = store.profile_array(len(vocab))
        if len(profile):
            profile = np.where(profile < vocab, profile, 0)
        hist = store.history(info.max_len, info.n_items)
        shapes_ok = {k: tuple(v.shape) for k, v in st.phi.items()} == info.trainable
        if st.bundle_version == info.version and shapes_ok:
            phi, source = st.phi, st.phi_source or "state"
        else:
            phi, source = model.initial_phi(profile[None, :], hist[None, :], st.phi if shapes_ok else None)
        try:
            neg, val_frac = local_samples(t, info)
            arrays = store.training_arrays(neg=neg, max_len=info.max_len, val_frac=val_frac, seed=t.seed,
                                           n_items=info.n_items, n_profile=len(vocab),
                                           impression_negatives=t.impression_negatives)
        except DcclError as exc:                     # no local positives
            return {"version": info.version, "loss": None, "phi_source": source, "note": str(exc)}
        val = arrays.val
        if not len(val):
            return {"version": info.version, "loss": None, "phi_source": source, "note": "no validation slice"}
        if len(val.profile):
            val.profile = np.where(val.profile < vocab, val.profile, 0)
        loss = trainer.scorer.loss(phi[bundle.phi_name], {"item": val.item, "hist": val.hist,
                                                          "profile": val.profile, "label": val.label})
        return {"version": info.version, "loss": float(loss), "phi_source": source, "val_samples": len(val)}

    def _check_bundle(self, new_dir: Path, old_dir: Path | None) -> bool:
        """ModelUpdater's hook: False (or an exception: failed to load) keeps the current bundle."""
        new = self._evaluate(new_dir)
        old = self._evaluate(old_dir) if old_dir is not None and old_dir.exists() else None
        if old is None or new["loss"] is None or old["loss"] is None:
            ok, why = True, "nothing to compare on" if old is not None else "no current bundle"
        else:
            ok = new["loss"] <= old["loss"] * (1 + self.update_tolerance) + 1e-12
            why = f"validation loss {new['loss']:.4f} vs {old['loss']:.4f} (tolerance {self.update_tolerance:g})"
        self.last_check = {"new": new, "current": old, "accepted": ok, "why": why}
        self._report("bundle_check", **self.last_check)
        return ok

    def _on_switch(self, version: str, path: Path) -> None:
        """A bundle is now current (update or rollback): its encoder gives the starting φ."""
        try:
            phi, source = self.agent.current_phi(persist=True)
            log.info("bundle %s in use; φ from %s", version, source)
        except DcclError as exc:
            log.error("bundle %s in use, but its starting φ failed: %s", version, exc)
        self._refresh_status()
        self.heartbeat.beat()

    # ---- status --------------------------------------------------------------------------
    def _refresh_status(self) -> None:
        self.status.bundle_version = self.updater.current_version
        try:
            st = self.agent.state()
        except DcclError:
            return
        self.status.round = st.rounds
        self.status.last_train_ts = st.last_train_time
        self.status.last_loss = st.last_train_loss
        self.status.last_sample_count = st.last_train_samples

    def status_report(self) -> dict[str, Any]:
        out = self.agent.status()
        out["current"] = self.updater.current_version
        out["outbox_depth"] = self.client.outbox_depth()
        out["last_check"] = self.last_check
        return out

    def _report(self, kind: str, **fields: Any) -> None:
        ok = self.client.publish_telemetry(self.topics.report(self.device_id),
                                           payloads.dump_report(kind, **_jsonable(fields)), qos=QOS_REPORT)
        if not ok:
            log.warning("report %s not sent: offline", kind)
