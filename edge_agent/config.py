"""The edge agent's config: one JSON file, one dataclass per section, validated up front.

Every error names the key path and the value, e.g. ``train.max_steps = -3: must be >= 1``;
all errors of a file are reported together on one line. Unknown keys are errors (a typo
must not silently fall back to a default). Any string may hold ``{ENV_VAR}`` references,
replaced from the environment before validation, so secrets (the HMAC key, broker
password) need not sit in the file. Relative paths are relative to the config file.

Example (every key optional except ``device_id``)::

    {
      "device_id": "pi-kitchen",
      "state_dir": "state",              # store.sqlite, state.npz live here
      "bundle_dir": "bundle",            # a bundle (manifest.json, ...) or a model-update root
                                         # (state.json + bundles/<version>/, edge_agent.model_update)
      "max_len": null,                   # hist length L; null = the bundle's max_len
      "mqtt":      {"broker": "mqtt://cloud.example:1883", "prefix": "dccl",
                    "hmac_key": "{DCCL_HMAC_KEY}"},
      "train":     {"rule": "bundle", "max_steps": 200, "follow_bundle_steps": true, "max_seconds": 60,
                    "neg": null, "val_frac": null, "max_epochs": 5, "batch_size": 64, "patience": 3,
                    "seed": 0, "backend": "auto", "impression_negatives": false, "window": "bundle"},
      "retention": {"max_rows": 100000, "max_age_days": 365},
      "http":      {"bind": "127.0.0.1", "port": 8765, "allow_remote": false}
    }
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dccl.errors import DcclError
from dccl.protocol.broker import parse_broker_url
from dccl.protocol.topics import Topics, check_id

_ENV_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
BACKENDS = ("auto", "portable", "ort-training")


class ConfigError(DcclError):
    """All validation errors of one config, joined on one line."""

    def __init__(self, errors: list[str], source: str = "config"):
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))


# ----------------------------------------------------------------------------- sections


@dataclass
class MqttConfig:
    broker: str = "mqtt://127.0.0.1:1883"    # mqtt://[user[:password]@]host[:port] or mqtts://
    prefix: str = "dccl"                      # every topic sits under this prefix
    hmac_key: str | None = None               # hex, >= 16 bytes; signs the device's patches
    tls_ca: str | None = None                 # CA certificate (PEM) that signed the broker's TLS certificate


RULES = ("bundle", "early_stop")
WINDOWS = ("bundle", "all")


@dataclass
class TrainConfig:
    # "bundle": the rule the cloud chose the bundle's budget under (its reference, personalize_all):
    #   full-batch AdamW steps up to the budget, then the last φ is kept unless the validation
    #   slice's loss got worse (the manifest's keep_if_worse). "early_stop": mini-batches of
    #   batch_size for at most max_epochs passes, the best φ of those evaluated after each epoch,
    #   stopping after `patience` evaluations without improvement.
    rule: str = "bundle"
    max_steps: int = 200           # budget: optimiser steps per round
    follow_bundle_steps: bool = True   # also stop at the bundle's optimizer.steps (chosen by the cloud
                                       # on validation; 0 = no step: a round uploads φ unchanged), or at
                                       # its steps_by_positives bracket for this round's positives
    max_seconds: float = 60.0      # budget: wall time of one round
    neg: int | None = None         # sampled negatives per positive; null = the bundle's local_data.neg
    val_frac: float | None = None  # newest fraction of positives held out for validation;
                                   # null = the bundle's local_data.val_frac
    max_epochs: int = 5            # "early_stop" only: passes over the local training samples
    batch_size: int = 64           # "early_stop" only
    patience: int = 3              # "early_stop" only
    seed: int = 0
    backend: str = "auto"          # auto | portable | ort-training
    impression_negatives: bool = False   # also use shown-but-never-clicked items as negatives
    # Which positives become samples: "bundle" = those at or after the bundle's local_data.since (the
    # device's fresh window, as in the cloud's split; every positive when the bundle names none);
    # "all" = every positive the store holds. Older positives are always history.
    window: str = "bundle"


@dataclass
class RetentionConfig:
    max_rows: int = 100_000        # events kept in the store (oldest dropped first)
    max_age_days: float = 365.0    # events older than this are dropped


@dataclass
class HttpConfig:
    bind: str = "127.0.0.1"
    port: int = 8765               # 0 = any free port (tests)
    allow_remote: bool = False     # required to bind anything but a loopback address


@dataclass
class AgentConfig:
    device_id: str
    state_dir: Path = Path("state")
    bundle_dir: Path = Path("bundle")
    max_len: int | None = None
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    http: HttpConfig = field(default_factory=HttpConfig)

    @property
    def store_path(self) -> Path:
        return self.state_dir / "store.sqlite"

    @property
    def hmac_key_bytes(self) -> bytes | None:
        return bytes.fromhex(self.mqtt.hmac_key) if self.mqtt.hmac_key else None

    def redacted(self) -> dict[str, Any]:
        """The config as JSON-able dict with secrets masked (for `status` and logs)."""
        d = asdict(self)
        d["state_dir"], d["bundle_dir"] = str(self.state_dir), str(self.bundle_dir)
        if d["mqtt"]["hmac_key"]:
            d["mqtt"]["hmac_key"] = "***"
        b = parse_broker_url(self.mqtt.broker)
        if b.password:
            d["mqtt"]["broker"] = self.mqtt.broker.replace(b.password, "***")
        return d


_SECTIONS = {"mqtt": MqttConfig, "train": TrainConfig, "retention": RetentionConfig, "http": HttpConfig}


# ----------------------------------------------------------------------------- validation


def _show(path: str, value: Any) -> str:
    if path == "mqtt.hmac_key" and isinstance(value, str):
        return "<secret>"
    if path == "mqtt.broker" and isinstance(value, str) and "@" in value:
        return "<url with credentials>"
    return json.dumps(str(value) if isinstance(value, Path) else value)


class _Checker:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def err(self, path: str, value: Any, msg: str) -> None:
        self.errors.append(f"{path} = {_show(path, value)}: {msg}")

    def int_(self, path: str, v: Any, lo: int | None = None, hi: int | None = None) -> bool:
        if isinstance(v, bool) or not isinstance(v, int):
            self.err(path, v, "must be an integer")
            return False
        if lo is not None and v < lo:
            self.err(path, v, f"must be >= {lo}")
            return False
        if hi is not None and v > hi:
            self.err(path, v, f"must be <= {hi}")
            return False
        return True

    def num(self, path: str, v: Any, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.err(path, v, "must be a finite number")
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            self.err(path, v, f"must be {'>' if lo_open else '>='} {lo}")
            return False
        if hi is not None and v > hi:
            self.err(path, v, f"must be <= {hi}")
            return False
        return True

    def bool_(self, path: str, v: Any) -> bool:
        if not isinstance(v, bool):
            self.err(path, v, "must be true or false")
            return False
        return True

    def str_(self, path: str, v: Any) -> bool:
        if not isinstance(v, str) or not v:
            self.err(path, v, "must be a non-empty string")
            return False
        return True


def _substitute(obj: Any, path: str, env: dict[str, str], chk: _Checker) -> Any:
    """Replace {ENV_VAR} in every string; a missing variable is an error naming the key."""
    if isinstance(obj, dict):
        return {k: _substitute(v, f"{path}.{k}" if path else k, env, chk) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, f"{path}[{i}]", env, chk) for i, v in enumerate(obj)]
    if isinstance(obj, str):
        def repl(m: re.Match) -> str:
            name = m.group(1)
            if name not in env:
                chk.errors.append(f"{path} = {json.dumps(obj)}: environment variable {name} is not set")
                return m.group(0)
            return env[name]
        return _ENV_REF.sub(repl, obj)
    return obj


def _fill(cls: type, data: Any, path: str, chk: _Checker) -> dict[str, Any]:
    """Known keys of a section into a kwargs dict; unknown keys and non-objects are errors."""
    if not isinstance(data, dict):
        chk.err(path, data, "must be a JSON object")
        return {}
    known = {f.name for f in fields(cls)}
    for k in data:
        if k not in known:
            chk.err(f"{path}.{k}" if path else k, data[k], f"unknown key (known: {', '.join(sorted(known))})")
    return {k: v for k, v in data.items() if k in known}


def _check_sections(c: AgentConfig, chk: _Checker) -> None:
    m, t, r, h = c.mqtt, c.train, c.retention, c.http
    if chk.str_("mqtt.broker", m.broker):
        try:
            parse_broker_url(m.broker)
        except ValueError as exc:
            msg = str(exc).replace(repr(m.broker), "").replace("broker URL :", "").strip()
            chk.err("mqtt.broker", m.broker, msg)
    if chk.str_("mqtt.prefix", m.prefix):
        try:
            Topics(m.prefix)
        except ValueError as exc:
            chk.err("mqtt.prefix", m.prefix, str(exc))
    if m.hmac_key is not None:
        try:
            key = bytes.fromhex(m.hmac_key) if isinstance(m.hmac_key, str) else None
        except ValueError:
            key = None
        if key is None:
            chk.err("mqtt.hmac_key", m.hmac_key, "must be a hex string (e.g. `openssl rand -hex 32`)")
        elif len(key) < 16:
            chk.err("mqtt.hmac_key", m.hmac_key, f"too short: {len(key)} bytes, need >= 16")

    if t.rule not in RULES:
        chk.err("train.rule", t.rule, f"must be one of {', '.join(RULES)}")
    chk.int_("train.max_steps", t.max_steps, 1)
    chk.int_("train.max_epochs", t.max_epochs, 1)
    chk.int_("train.patience", t.patience, 1)
    chk.num("train.max_seconds", t.max_seconds, 0.0, lo_open=True)
    if t.neg is not None:
        chk.int_("train.neg", t.neg, 0, 1000)
    chk.int_("train.batch_size", t.batch_size, 1, 65536)
    if t.val_frac is not None and chk.num("train.val_frac", t.val_frac, 0.0) and t.val_frac >= 1.0:
        chk.err("train.val_frac", t.val_frac, "must be < 1")
    chk.int_("train.seed", t.seed, 0, 2**63 - 1)
    if t.backend not in BACKENDS:
        chk.err("train.backend", t.backend, f"must be one of {', '.join(BACKENDS)}")
    chk.bool_("train.impression_negatives", t.impression_negatives)
    chk.bool_("train.follow_bundle_steps", t.follow_bundle_steps)
    if t.window not in WINDOWS:
        chk.err("train.window", t.window, f"must be one of {', '.join(WINDOWS)}")

    chk.int_("retention.max_rows", r.max_rows, 1)
    chk.num("retention.max_age_days", r.max_age_days, 0.0, lo_open=True)

    chk.int_("http.port", h.port, 0, 65535)
    remote_ok = chk.bool_("http.allow_remote", h.allow_remote)
    if chk.str_("http.bind", h.bind) and remote_ok:
        try:
            loopback = h.bind == "localhost" or ipaddress.ip_address(h.bind).is_loopback
        except ValueError:
            chk.err("http.bind", h.bind, "must be an IP address (or 'localhost')")
        else:
            if not loopback and not h.allow_remote:
                chk.err("http.bind", h.bind,
                        "not a loopback address; the endpoint has no authentication, "
                        "set http.allow_remote = true to expose it anyway")


def config_from_dict(data: Any, base_dir: str | Path = ".", env: dict[str, str] | None = None,
                     source: str = "config") -> AgentConfig:
    """Validate a parsed JSON config. Raises ConfigError listing every problem."""
    chk = _Checker()
    data = _substitute(data, "", dict(os.environ) if env is None else env, chk)
    top = _fill(AgentConfig, data, "", chk)
    if isinstance(data, dict) and "device_id" not in data:
        chk.errors.append("device_id: missing (required)")
    kwargs: dict[str, Any] = {}
    for f in fields(AgentConfig):
        if f.name not in top:
            continue
        v = top[f.name]
        if f.name in _SECTIONS:
            cls = _SECTIONS[f.name]
            sec = _fill(cls, v, f.name, chk)
            kwargs[f.name] = cls(**sec)
        else:
            kwargs[f.name] = v
    has_id = "device_id" in kwargs
    kwargs.setdefault("device_id", "")
    cfg = AgentConfig(**kwargs)

    if has_id:
        try:
            check_id(cfg.device_id)
        except ValueError as exc:
            chk.err("device_id", cfg.device_id, str(exc))
    base = Path(base_dir)
    for key in ("state_dir", "bundle_dir"):
        v = getattr(cfg, key)
        if isinstance(v, Path) or chk.str_(key, v):
            p = Path(v).expanduser()
            setattr(cfg, key, p if p.is_absolute() else base / p)
    m = cfg.mqtt
    if isinstance(m, MqttConfig) and m.tls_ca is not None and chk.str_("mqtt.tls_ca", m.tls_ca):
        ca = Path(m.tls_ca).expanduser()
        m.tls_ca = str(ca if ca.is_absolute() else base / ca)
        if not Path(m.tls_ca).is_file():
            chk.err("mqtt.tls_ca", m.tls_ca, "no such file")
    if cfg.max_len is not None:
        chk.int_("max_len", cfg.max_len, 1, 10_000)
    _check_sections(cfg, chk)
    if chk.errors:
        raise ConfigError(chk.errors, source)
    return cfg


def load_config(path: str | Path, env: dict[str, str] | None = None) -> AgentConfig:
    """Read and validate a JSON config file; relative paths resolve against its folder."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise DcclError(f"config {p}: cannot read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DcclError(f"config {p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    return config_from_dict(data, base_dir=p.resolve().parent, env=env, source=f"config {p}")


def default_config_dict(device_id: str) -> dict[str, Any]:
    """A complete config with defaults, e.g. to write a starter file."""
    d: dict[str, Any] = {"device_id": device_id}
    for f in fields(AgentConfig):
        if f.name == "device_id":
            continue
        if f.name in _SECTIONS:
            d[f.name] = asdict(_SECTIONS[f.name]())
        else:
            d[f.name] = str(f.default) if isinstance(f.default, Path) else (
                None if f.default is MISSING else f.default)
    return d
