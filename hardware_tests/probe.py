"""What runs *on the board*: torch-free, pytest-free, one process per check.

The HIL suite (``hardware_tests/test_*.py``) runs on the controlling machine and starts this
module on the target — this host, qemu-aarch64-static, or a board over SSH — as
``python -m hardware_tests.probe MODE ...``. It speaks line by line: every result is one line
``HIL {json}`` on stdout; interactive modes read one word per line on stdin (``die``, ``send``,
``quit``), so the same conversation works through a pipe, qemu and ssh alike.

Modes:
  round        runtime facts, the bundle's reference self-check, one training round of φ on
               deterministic synthetic data, scores with the trained φ, timings, peak RSS, thermal
  mqtt-will    connect with the agent's client, then die without DISCONNECT on ``die``
  mqtt-outbox  connect; on ``send`` queue a signed patch (broker may be down); report delivery
  model-update run the agent's ModelUpdater (check hook = bundle self-check on this board) and
               the ``rollback`` command until ``quit``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any


def emit(kind: str, **fields: Any) -> None:
    print("HIL " + json.dumps({"kind": kind, **fields}, allow_nan=False), flush=True)


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def runtime_facts() -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    from edge_agent import ort_compat
    from edge_agent.trainer import resolve_backend

    model = None
    cpuinfo = _read("/proc/cpuinfo") or ""
    for line in cpuinfo.splitlines():
        if line.startswith(("Model", "model name", "CPU part")):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
        "numpy": np.__version__, "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
        "backends_available": ["portable"] + (["ort-training"] if ort_compat.training_available() else []),
        "backend_auto": resolve_backend("auto"),
        "cpu": model, "device_model": (_read("/proc/device-tree/model") or "").rstrip("\x00") or None,
        "torch_loaded": "torch" in sys.modules,
    }


def thermal_facts() -> dict[str, Any]:
    """CPU temperature and throttling flags where the board exposes them (None otherwise)."""
    from edge_agent.heartbeat import cpu_temperature_c

    throttled = _read("/sys/devices/platform/soc/soc:firmware/get_throttled")   # Raspberry Pi firmware
    flags = None
    if throttled:
        try:
            bits = int(throttled, 16)
            flags = {"under_voltage": bool(bits & 0x1), "freq_capped": bool(bits & 0x2),
                     "throttled": bool(bits & 0x4), "soft_temp_limit": bool(bits & 0x8),
                     "throttled_since_boot": bool(bits & 0x40000)}
        except ValueError:
            pass
    cur = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    top = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    return {"cpu_temp_c": cpu_temperature_c(), "throttle_flags": flags,
            "cpu_freq_mhz": int(cur) / 1000 if cur and cur.isdigit() else None,
            "cpu_max_freq_mhz": int(top) / 1000 if top and top.isdigit() else None}


def synthetic_data(bundle, n: int = 128, seed: int = 0):
    """Deterministic local data for the bundle's schema: the same bytes on every architecture
    (numpy's PCG64 stream is platform-independent)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    item = rng.integers(1, bundle.n_items + 1, n)                                   # (n,)
    hist = rng.integers(0, bundle.n_items + 1, (n, bundle.max_len))                 # (n, L)
    profile = np.stack([rng.integers(0, v, n) for v in bundle.profile_vocab], 1) if bundle.profile_vocab \
        else np.zeros((n, 0), np.int64)                                             # (n, P)
    label = (rng.random(n) < 0.3).astype(np.float32)                                # (n,)
    return {"item": item, "hist": hist, "profile": profile.astype(np.int64), "label": label}


def mode_round(args: argparse.Namespace) -> int:
    import numpy as np

    from edge_agent.trainer import Bundle, Encoder, Trainer, resolve_backend

    t0 = time.monotonic()
    facts = runtime_facts()
    bundle = Bundle(args.bundle)
    backend = resolve_backend(args.backend)
    t_load = time.monotonic()
    trainer = Trainer(bundle, backend=backend, threads=1)
    load_s = time.monotonic() - t_load
    check = trainer.self_check()
    data = synthetic_data(bundle, seed=args.seed)
    phi0 = np.zeros(bundle.phi_shape, np.float32)
    if bundle.manifest["models"].get("encoder"):
        phi0 = Encoder(bundle, threads=1).start_phi(data["profile"][0], data["hist"][0])
    res = trainer.train(phi0, data, steps=args.steps, batch_size=64, seed=args.seed)
    cand = np.arange(1, min(bundle.n_items, 20) + 1)
    scores = trainer.scorer.score(res.phi, cand, data["hist"][0], data["profile"][0])
    emit("round", runtime=facts, backend=res.backend, bundle_version=bundle.version,
         self_check=check, steps=res.steps, train_seconds=res.seconds,
         step_ms=1000 * res.seconds / max(res.steps, 1), load_seconds=load_s,
         round_seconds=time.monotonic() - t0, losses=[float(x) for x in res.losses],
         phi0=phi0.reshape(-1).tolist(), phi=res.phi.reshape(-1).tolist(), scores=scores.tolist(),
         peak_rss_mb=_peak_rss_mb(), thermal=thermal_facts())
    return 0


def _client(args: argparse.Namespace, outbox: str):
    from edge_agent.mqtt_client import EdgeMqttClient

    return EdgeMqttClient(args.device_id, args.broker, outbox, prefix=args.prefix, keepalive=5,
                          backoff=(0.2, 1.0)).start()


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def mode_mqtt_will(args: argparse.Namespace) -> int:
    c = _client(args, os.path.join(args.workdir, "will-outbox.sqlite"))
    if not c.connected.wait(args.timeout):
        emit("error", error=f"no connection: {c.last_connect_error}")
        return 1
    emit("connected")
    for line in sys.stdin:
        if line.strip() == "die":
            os.kill(os.getpid(), signal.SIGKILL)   # no DISCONNECT: the broker must send the will
    return 0


def mode_mqtt_outbox(args: argparse.Namespace) -> int:
    from dccl.protocol import envelope
    import numpy as np

    c = _client(args, os.path.join(args.workdir, "outbox.sqlite"))
    if not c.connected.wait(args.timeout):
        emit("error", error=f"no connection: {c.last_connect_error}")
        return 1
    emit("connected")
    for line in sys.stdin:
        word = line.strip()
        if word == "send":
            p = envelope.Patch(device_id=args.device_id, bundle_version="hil", round=1, sample_count=1,
                               tensors={"metapatch_phi": np.arange(8, dtype=np.float32)}, metrics={"loss": 0.5})
            c.send_patch(p.message_id, envelope.encode(p, bytes.fromhex(args.hmac_key)))
            emit("queued", message_id=p.message_id.hex(), depth=c.outbox_depth(),
                 connected=c.connected.is_set())
            ok = _wait(lambda: c.outbox_depth() == 0, args.timeout)
            emit("delivered" if ok else "stuck", depth=c.outbox_depth())
        elif word == "quit":
            break
    c.stop()
    return 0


def mode_model_update(args: argparse.Namespace) -> int:
    from dccl.protocol import payloads
    from edge_agent.model_update import ModelUpdater
    from edge_agent.trainer import Trainer

    def check(new_dir: Path, old_dir: Path | None) -> bool:
        Trainer(new_dir, backend="portable", threads=1).self_check()   # raises: disagrees on this board
        return True

    c = _client(args, os.path.join(args.workdir, "mu-outbox.sqlite"))
    updater = ModelUpdater(os.path.join(args.workdir, "models"), c, check=check).start()
    c.subscribe(c.topics.command(args.device_id))
    if not c.connected.wait(args.timeout):
        emit("error", error=f"no connection: {c.last_connect_error}")
        return 1
    emit("connected")
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    seen = 0
    while not stop.is_set():
        try:
            msg = c.inbox.get(timeout=0.1)
        except Exception:   # queue.Empty
            msg = None
        if msg is not None and not updater.handle(msg) and msg.topic == c.topics.command(args.device_id):
            if payloads.load_command(msg.payload)["command"] == "rollback":
                updater.rollback()
        for rep in updater.reports[seen:]:
            emit("update", **rep)
        seen = len(updater.reports)
    c.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hardware_tests.probe", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("round")
    r.add_argument("--bundle", required=True)
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--backend", default="auto")
    r.add_argument("--seed", type=int, default=0)
    for name in ("mqtt-will", "mqtt-outbox", "model-update"):
        m = sub.add_parser(name)
        m.add_argument("--broker", required=True)
        m.add_argument("--prefix", default="dccl")
        m.add_argument("--device-id", required=True)
        m.add_argument("--workdir", required=True)
        m.add_argument("--timeout", type=float, default=30.0)
        m.add_argument("--hmac-key", default="00" * 32)
    args = p.parse_args(argv)
    if hasattr(args, "workdir"):
        os.makedirs(args.workdir, exist_ok=True)
    modes = {"round": mode_round, "mqtt-will": mode_mqtt_will, "mqtt-outbox": mode_mqtt_outbox,
             "model-update": mode_model_update}
    try:
        return modes[args.mode](args)
    except Exception as exc:    # the controller gets one structured line, never only a traceback
        emit("error", error=f"{type(exc).__name__}: {exc}")
        raise


if __name__ == "__main__":
    sys.exit(main())
