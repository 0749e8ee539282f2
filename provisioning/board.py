"""A board bundle: everything one board needs, in one directory, no compiler or internet required.

    boards/<device_id>/
      board.json                 what this is: device, board, model version, sha256 of every file (no secrets)
      etc/dccl/agent.json        the agent config; secrets appear only as {DCCL_MQTT_PASSWORD}, {DCCL_HMAC_KEY}
      etc/dccl/agent.env         0600: the two secrets (systemd EnvironmentFile)
      etc/dccl/ca.crt            the fleet CA the broker's certificate chains to
      model/VERSION, model/bundle/   the initial model bundle (verified copy of a `dccl export` bundle)
      systemd/dccl-agent.service
      wheels/                    aarch64 wheelhouse: dccl, onnxruntime, numpy, paho-mqtt (optional)
      install.sh                 `sudo sh install.sh` on the board
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from dccl.errors import DcclError
from dccl.protocol import manifest as mf
from dccl.protocol.broker import parse_broker_url
from provisioning.registry import Changes, Fleet

TEMPLATES = Path(__file__).resolve().parent / "templates"
REPO = Path(__file__).resolve().parents[1]
BOARD_ROOT = {"state_dir": "/var/lib/dccl/state", "bundle_dir": "/var/lib/dccl/models"}


def agent_config(device_id: str, broker_host: str, port: int, prefix: str, tls: bool) -> dict[str, Any]:
    scheme = "mqtts" if tls else "mqtt"
    return {
        "device_id": device_id,
        **BOARD_ROOT,
        "mqtt": {"broker": f"{scheme}://{device_id}:{{DCCL_MQTT_PASSWORD}}@{broker_host}:{port}",
                 "prefix": prefix, "hmac_key": "{DCCL_HMAC_KEY}"},
        "http": {"bind": "127.0.0.1", "port": 8765},
    }


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def project_wheel(out_dir: Path) -> Path:
    """The project's own wheel (pure Python), built from this checkout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-w", str(out_dir), str(REPO)],
                       capture_output=True, text=True,
                       env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"})   # same bytes on every rebuild
    if r.returncode != 0:
        raise DcclError(f"building the dccl wheel failed: {r.stderr.strip()[-400:]}")
    wheels = sorted(out_dir.glob("dccl-*.whl"))
    if not wheels:
        raise DcclError(f"building the dccl wheel left no dccl-*.whl in {out_dir}")
    return wheels[-1]


def build_board_bundle(fleet: Fleet, device_id: str, model: Path, out: Path | None = None, *,
                       broker: str | None = None, wheels: Path | None = None, with_project_wheel: bool = True
                       ) -> tuple[Path, Changes]:
    reg = fleet.load()
    secret = fleet.device_secret(device_id)
    board = reg["devices"][device_id]["board"]
    try:
        manifest = mf.load(model, verify=True)
    except Exception as exc:  # noqa: BLE001 - any manifest problem is the user's bundle
        raise DcclError(f"--model {model}: not a valid model bundle ({exc})") from None
    version = manifest["bundle_version"]
    b = parse_broker_url(broker or f"mqtts://{reg['broker_host']}:8883")
    if b.username or b.password:
        raise DcclError("--broker: no credentials in the URL; the board's come from the registry")
    out = Path(out or fleet.root / "boards" / device_id)
    ch = Changes()
    cfg = agent_config(device_id, b.host, b.port, reg["prefix"], b.tls)
    ch.write(out / "etc/dccl/agent.json", json.dumps(cfg, indent=1) + "\n", 0o644, "etc/dccl/agent.json")
    env = f"DCCL_MQTT_PASSWORD={secret['mqtt_password']}\nDCCL_HMAC_KEY={secret['hmac_key']}\n"
    ch.write(out / "etc/dccl/agent.env", env, 0o600, "etc/dccl/agent.env")
    if (fleet.ca / "ca.crt").exists():
        ch.write(out / "etc/dccl/ca.crt", (fleet.ca / "ca.crt").read_bytes(), 0o644, "etc/dccl/ca.crt")
    ch.write(out / "model/VERSION", version + "\n", 0o644, "model/VERSION")
    files = sorted(p for p in Path(model).rglob("*") if p.is_file())
    for p in files:
        rel = p.relative_to(model)
        ch.write(out / "model/bundle" / rel, p.read_bytes(), 0o644, f"model/bundle/{rel}")
    ch.write(out / "systemd/dccl-agent.service", (TEMPLATES / "dccl-agent.service").read_text(), 0o644,
             "systemd/dccl-agent.service")
    ch.write(out / "install.sh", (TEMPLATES / "install.sh").read_text(), 0o755, "install.sh")
    if wheels is not None or with_project_wheel:
        wh = out / "wheels"
        if wheels is not None:
            if not Path(wheels).is_dir():
                raise DcclError(f"--wheels {wheels}: not a directory")
            for w in sorted(Path(wheels).glob("*.whl")):
                if w.name.startswith("dccl-"):
                    continue
                ch.write(wh / w.name, w.read_bytes(), 0o644, f"wheels/{w.name}")
        if with_project_wheel:
            with tempfile.TemporaryDirectory() as tmp:
                w = project_wheel(Path(tmp))
                for old in wh.glob("dccl-*.whl") if wh.exists() else []:
                    if old.name != w.name:
                        old.unlink()
                        ch.changed.append(f"wheels/{old.name} (removed)")
                ch.write(wh / w.name, w.read_bytes(), 0o644, f"wheels/{w.name}")
    listing = {str(p.relative_to(out)): _sha256(p) for p in sorted(out.rglob("*"))
               if p.is_file() and p.name != "board.json"}
    meta = {"v": 1, "device_id": device_id, "board": board, "model_version": version, "prefix": reg["prefix"],
            "broker": f"{'mqtts' if b.tls else 'mqtt'}://{b.host}:{b.port}", "files": listing,
            "secrets": ["etc/dccl/agent.env"]}
    ch.write(out / "board.json", json.dumps(meta, indent=1, sort_keys=True) + "\n", 0o644, "board.json")
    return out, ch


def verify_board_bundle(d: Path) -> dict[str, Any]:
    """board.json against the files: raises DcclError naming the first file that differs."""
    try:
        meta = json.loads((d / "board.json").read_text())
    except (OSError, ValueError) as exc:
        raise DcclError(f"board bundle {d}: no readable board.json ({exc})") from None
    for rel, digest in meta["files"].items():
        p = d / rel
        if not p.is_file() or _sha256(p) != digest:
            raise DcclError(f"board bundle {d}: {rel} is missing or differs from board.json")
    return meta
