"""The device registry: one fleet directory, every identity, every broker/ingest file derived from it.

Layout (``--fleet DIR``; it must not be inside a git work tree — it holds secrets)::

    registry.json                  public: prefix, broker host, devices {id: {board, created}}
    secrets/                       0700
      devices/<id>.json            0600  {"mqtt_password", "hmac_key"}
      cloud.json                   0600  {"mqtt_password"} of the dccl-cloud user
    ca/ca.crt, ca.key              fleet CA (openssl); server.crt/.key for the broker
    generated/                     rewritten by every run, never edited by hand
      mosquitto/passwd, acl, mosquitto.conf     for /etc/mosquitto/dccl/
      ingest/keys.json             {device_id: hex HMAC key} for `dccl cloud ingest --keys`

Every write goes through ``Changes``: a file is rewritten only when its content differs, and
each run reports what it created, changed or left alone — running twice changes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dccl.atomic import atomic_write
from dccl.errors import DcclError
from dccl.protocol.topics import Topics, check_id

CLOUD_USER = "dccl-cloud"
BOARDS = ("pi4", "pi5", "jetson-orin-nano", "generic-arm64")
REPO = Path(__file__).resolve().parents[1]
MOSQUITTO_CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"


@dataclass
class Changes:
    """What a provisioning run did, file by file."""
    created: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def write(self, path: Path, data: bytes | str, mode: int = 0o644, label: str | None = None) -> None:
        """Atomic write (temp + fsync + rename), skipped when the content is already there."""
        data = data.encode() if isinstance(data, str) else data
        label = label or str(path)
        old = path.read_bytes() if path.exists() else None
        if old == data:
            if (path.stat().st_mode & 0o777) != mode:
                os.chmod(path, mode)
                self.changed.append(label + " (mode)")
            else:
                self.unchanged.append(label)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data, mode=mode)
        (self.created if old is None else self.changed).append(label)

    def summary(self) -> dict[str, Any]:
        return {"created": self.created, "changed": self.changed, "unchanged": len(self.unchanged),
                "notes": self.notes}

    def lines(self) -> list[str]:
        out = [f"created  {p}" for p in self.created] + [f"changed  {p}" for p in self.changed]
        out += [f"note     {n}" for n in self.notes]
        if not self.created and not self.changed:
            out.append(f"nothing changed ({len(self.unchanged)} files already up to date)")
        return out


def _inside_git(path: Path) -> Path | None:
    for p in [path, *path.parents]:
        if (p / ".git").exists():
            return p
    return None


# ---------------------------------------------------------------- Mosquitto password hashes

def mosquitto_hash(password: str, salt: bytes | None = None, iterations: int = 101) -> str:
    """Mosquitto 2.0's ``$7$`` entry: PBKDF2-HMAC-SHA512, 12-byte salt, base64 (as mosquitto_passwd)."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def mosquitto_verify(entry: str, password: str) -> bool:
    try:
        _, kind, iters, salt, digest = entry.split("$")
        if kind != "7":
            return False
        want = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iters), 64)
        return hmac.compare_digest(want, base64.b64decode(digest))
    except (ValueError, TypeError):
        return False


# ---------------------------------------------------------------- the registry

class Fleet:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        repo = _inside_git(self.root)
        if repo is not None:
            raise DcclError(f"--fleet {self.root}: inside the git work tree {repo}; the fleet directory holds "
                            "secrets and must live outside any repository (e.g. ~/dccl-fleet)")
        self.registry_path = self.root / "registry.json"
        self.secrets = self.root / "secrets"
        self.generated = self.root / "generated"
        self.ca = self.root / "ca"

    # -- registry -------------------------------------------------------------------
    def exists(self) -> bool:
        return self.registry_path.exists()

    def load(self) -> dict[str, Any]:
        if not self.exists():
            raise DcclError(f"--fleet {self.root}: no registry.json; run `dccl deploy init --fleet {self.root}` first")
        try:
            reg = json.loads(self.registry_path.read_text())
        except ValueError as exc:
            raise DcclError(f"{self.registry_path}: not JSON ({exc})") from None
        if reg.get("v") != 1 or not isinstance(reg.get("devices"), dict):
            raise DcclError(f"{self.registry_path}: not a DCCL fleet registry (v 1)")
        return reg

    def _save(self, reg: dict[str, Any], ch: Changes) -> None:
        ch.write(self.registry_path, json.dumps(reg, indent=1, sort_keys=True) + "\n", 0o644, "registry.json")

    def _secret(self, path: Path, make: dict[str, Any], ch: Changes, label: str, rotate: bool = False) -> dict:
        self.secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.secrets, 0o700)
        if path.exists() and not rotate:
            data = json.loads(path.read_text())
            ch.write(path, json.dumps(data, indent=1, sort_keys=True) + "\n", 0o600, label)
            return data
        ch.write(path, json.dumps(make, indent=1, sort_keys=True) + "\n", 0o600, label)
        return make

    def init(self, prefix: str = "dccl", broker_host: str = "localhost") -> Changes:
        ch = Changes()
        try:
            Topics(prefix)
        except ValueError as exc:
            raise DcclError(f"--prefix: {exc}") from None
        self.root.mkdir(parents=True, exist_ok=True)
        reg = self.load() if self.exists() else {"v": 1, "devices": {}}
        reg.update(prefix=prefix, broker_host=broker_host)
        self._save(reg, ch)
        self._secret(self.secrets / "cloud.json", {"mqtt_password": secrets.token_urlsafe(24)}, ch,
                     "secrets/cloud.json")
        self._make_ca(broker_host, ch)
        self.render(ch)
        return ch

    def _make_ca(self, broker_host: str, ch: Changes) -> None:
        if not shutil.which("openssl"):
            ch.notes.append("openssl not found: no fleet CA made (boards will use the system CA store)")
            return
        self.ca.mkdir(mode=0o700, parents=True, exist_ok=True)

        def run(*a: str) -> None:
            r = subprocess.run(["openssl", *a], cwd=self.ca, capture_output=True, text=True)
            if r.returncode != 0:
                raise DcclError(f"openssl {a[0]} failed: {r.stderr.strip()[-300:]}")

        if not (self.ca / "ca.crt").exists():
            run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-subj", "/CN=dccl-fleet-ca",
                "-keyout", "ca.key", "-out", "ca.crt")
            os.chmod(self.ca / "ca.key", 0o600)
            ch.created += ["ca/ca.crt", "ca/ca.key"]
        else:
            ch.unchanged.append("ca/ca.crt")
        stamp = self.ca / "server.host"
        if not (self.ca / "server.crt").exists() or not stamp.exists() or stamp.read_text() != broker_host:
            san = f"IP:{broker_host}" if broker_host.replace(".", "").isdigit() else f"DNS:{broker_host}"
            (self.ca / "ext.cnf").write_text(f"subjectAltName={san},DNS:localhost,IP:127.0.0.1\n")
            run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={broker_host}", "-keyout", "server.key",
                "-out", "server.csr")
            run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "825", "-extfile", "ext.cnf", "-out", "server.crt")
            os.chmod(self.ca / "server.key", 0o600)
            stamp.write_text(broker_host)
            ch.created.append(f"ca/server.crt (broker {broker_host})")
        else:
            ch.unchanged.append("ca/server.crt")

    def add(self, device_id: str, board: str, rotate: bool = False) -> Changes:
        try:
            check_id(device_id)
        except ValueError as exc:
            raise DcclError(f"--device: {exc}") from None
        if device_id == CLOUD_USER:
            raise DcclError(f"--device {device_id}: reserved for the cloud services")
        if board not in BOARDS:
            raise DcclError(f"--board = {board!r}: expected one of {', '.join(BOARDS)}")
        reg = self.load()
        ch = Changes()
        entry = reg["devices"].get(device_id)
        if entry is None:
            reg["devices"][device_id] = {"board": board, "created": int(time.time())}
        elif entry["board"] != board:
            entry["board"] = board
        self._save(reg, ch)
        self._secret(self.secrets / "devices" / f"{device_id}.json",
                     {"mqtt_password": secrets.token_urlsafe(24), "hmac_key": secrets.token_hex(32)},
                     ch, f"secrets/devices/{device_id}.json", rotate=rotate)
        self.render(ch)
        return ch

    def remove(self, device_id: str) -> Changes:
        reg = self.load()
        if device_id not in reg["devices"]:
            raise DcclError(f"--device {device_id}: not in the registry")
        ch = Changes()
        del reg["devices"][device_id]
        self._save(reg, ch)
        (self.secrets / "devices" / f"{device_id}.json").unlink(missing_ok=True)
        ch.notes.append(f"removed {device_id}: its broker login and patch key are gone from the generated files")
        self.render(ch)
        return ch

    def device_secret(self, device_id: str) -> dict[str, str]:
        reg = self.load()
        if device_id not in reg["devices"]:
            raise DcclError(f"--device {device_id}: not in the registry (dccl deploy add --device {device_id})")
        return json.loads((self.secrets / "devices" / f"{device_id}.json").read_text())

    def cloud_password(self) -> str:
        return json.loads((self.secrets / "cloud.json").read_text())["mqtt_password"]

    # -- generated files --------------------------------------------------------------
    def render(self, ch: Changes | None = None) -> Changes:
        """passwd, ACL, mosquitto.conf and the ingest's keys.json, from the registry alone."""
        ch = ch or Changes()
        reg = self.load()
        prefix = reg["prefix"]
        users = {CLOUD_USER: self.cloud_password()}
        keys = {}
        for d in sorted(reg["devices"]):
            s = self.device_secret(d)
            users[d], keys[d] = s["mqtt_password"], s["hmac_key"]
        gen_m = self.generated / "mosquitto"
        old: dict[str, str] = {}
        if (gen_m / "passwd").exists():
            for line in (gen_m / "passwd").read_text().splitlines():
                if ":" in line:
                    u, h = line.split(":", 1)
                    old[u] = h
        # keep an entry (and its salt) while it still matches the secret: reruns change nothing
        lines = [f"{u}:{old[u] if u in old and mosquitto_verify(old[u], pw) else mosquitto_hash(pw)}"
                 for u, pw in users.items()]
        ch.write(gen_m / "passwd", "\n".join(lines) + "\n", 0o600, "generated/mosquitto/passwd")
        ch.write(gen_m / "acl", render_acl(prefix, sorted(reg["devices"])), 0o644, "generated/mosquitto/acl")
        conf = MOSQUITTO_CONF.read_text() if MOSQUITTO_CONF.exists() else ""
        ch.write(gen_m / "mosquitto.conf", conf, 0o644, "generated/mosquitto/mosquitto.conf")
        ch.write(self.generated / "ingest" / "keys.json", json.dumps(keys, indent=1, sort_keys=True) + "\n", 0o600,
                 "generated/ingest/keys.json")
        return ch


def render_acl(prefix: str, devices: list[str]) -> str:
    """The ACL of deploy/mosquitto/acl for ``prefix``: usernames are device ids, so ``%u`` patterns
    confine every device to its own topics; a login that is not in the password file gets nothing."""
    t = Topics(prefix)
    listed = "\n".join(f"#   {d}" for d in devices) or "#   (none yet)"
    return f"""# GENERATED by `dccl deploy` from registry.json -- do not edit; re-run `dccl deploy render`.
# Prefix "{t.prefix}". Device logins (username = device id):
{listed}

user {CLOUD_USER}
topic readwrite {t.prefix}/#

pattern write {t.prefix}/device/%u/#
pattern read {t.prefix}/model/#
pattern read {t.prefix}/cmd/%u
pattern read {t.prefix}/cmd/all
"""
