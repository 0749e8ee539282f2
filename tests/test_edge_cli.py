"""``dccl edge ...`` as a user runs it (subprocesses in the edge environment), and the config.

Tests marked by ``build_bundle`` use a tiny real bundle exported by ``.venv/bin/dccl export``
(built once, cached) and skip cleanly where the cloud environment is absent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import numpy as np
import pytest

from dccl.errors import DcclError
from edge_agent.config import ConfigError, config_from_dict, load_config
from edge_agent.state import StateStore
from tests.edge_fixtures import REPO, build_bundle, edge_python, run_edge_cli, write_config

# ----------------------------------------------------------------------------- config


def test_config_defaults_and_relative_paths(tmp_path):
    cfg = load_config(write_config(tmp_path))
    assert cfg.device_id == "dev-1" and cfg.state_dir == tmp_path / "state"
    assert cfg.http.bind == "127.0.0.1" and cfg.train.max_steps == 20
    # By default a board trains by the bundle's rule and builds its samples as the bundle says.
    assert cfg.train.rule == "bundle" and cfg.train.neg is None and cfg.train.val_frac is None
    assert cfg.store_path == tmp_path / "state" / "store.sqlite"


@pytest.mark.parametrize("data, message", [
    ({"train": {"max_steps": -3}}, "train.max_steps = -3: must be >= 1"),
    ({"train": {"max_steps": 2.5}}, "train.max_steps = 2.5: must be an integer"),
    ({"train": {"max_steps": True}}, "train.max_steps = true: must be an integer"),
    ({"train": {"val_frac": 1.0}}, "train.val_frac = 1.0: must be < 1"),
    ({"train": {"backend": "gpu"}}, 'train.backend = "gpu": must be one of auto, portable, ort-training'),
    ({"train": {"rule": "best"}}, 'train.rule = "best": must be one of bundle, early_stop'),
    ({"train": {"window": "fresh"}}, 'train.window = "fresh": must be one of bundle, all'),
    ({"train": {"patience": 0}}, "train.patience = 0: must be >= 1"),
    ({"train": {"neg": -2}}, "train.neg = -2: must be >= 0"),
    ({"train": {"max_stepz": 3}}, "train.max_stepz = 3: unknown key"),
    ({"retention": {"max_rows": 0}}, "retention.max_rows = 0: must be >= 1"),
    ({"http": {"port": 70000}}, "http.port = 70000: must be <= 65535"),
    ({"http": {"bind": "0.0.0.0"}}, 'http.bind = "0.0.0.0": not a loopback address'),
    ({"mqtt": {"prefix": "a/#"}}, 'mqtt.prefix = "a/#"'),
    ({"mqtt": {"broker": "http://x"}}, 'mqtt.broker = "http://x": expected mqtt://'),
    ({"mqtt": {"hmac_key": "abcd"}}, "mqtt.hmac_key = <secret>: too short: 2 bytes"),
    ({"device_id": "a/b"}, 'device_id = "a/b": invalid device id'),
    ({"train": []}, "train = []: must be a JSON object"),
    ({"max_len": 0}, "max_len = 0: must be >= 1"),
])
def test_config_errors_name_key_and_value(data, message):
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"device_id": "dev-1", **data}, env={})
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_config_reports_every_error_at_once():
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"train": {"neg": -1, "seed": "x"}}, env={})
    assert len(exc.value.errors) == 3 and "device_id: missing" in str(exc.value)


def test_config_env_substitution_and_secret_masking():
    key = "ab" * 16
    cfg = config_from_dict({"device_id": "{DEV}", "mqtt": {"hmac_key": "{KEY}",
                                                          "broker": "mqtt://u:{PW}@host:1883"}},
                           env={"DEV": "pi-7", "KEY": key, "PW": "s3cret"})
    assert cfg.device_id == "pi-7" and cfg.hmac_key_bytes == bytes.fromhex(key)
    shown = json.dumps(cfg.redacted())
    assert key not in shown and "s3cret" not in shown
    with pytest.raises(ConfigError, match="mqtt.hmac_key = .*environment variable KEY is not set"):
        config_from_dict({"device_id": "d", "mqtt": {"hmac_key": "{KEY}"}}, env={})


def test_remote_bind_needs_opt_in():
    cfg = config_from_dict({"device_id": "d", "http": {"bind": "0.0.0.0", "allow_remote": True}}, env={})
    assert cfg.http.bind == "0.0.0.0"


def test_config_file_errors(tmp_path):
    (tmp_path / "bad.json").write_text('{"device_id": "d",\n "train": {')
    with pytest.raises(DcclError, match=r"invalid JSON at line 2"):
        load_config(tmp_path / "bad.json")
    with pytest.raises(DcclError, match="cannot read"):
        load_config(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- CLI without a bundle


def _jsonl(path, evs):
    path.write_text("".join(json.dumps(e) + "\n" for e in evs))
    return path


def _events(n, item0=1, prefix="e", every=1):
    now = time.time()
    return [{"event_id": f"{prefix}{i}", "kind": "click" if i % every == 0 else "impression",
             "item": item0 + (i * 7) % 50, "ts": now - 1000 + i} for i in range(n)]


def test_cli_ingest_file_idempotent_and_status(tmp_path):
    cfg = write_config(tmp_path)
    f = _jsonl(tmp_path / "ev.jsonl", _events(10, every=2))
    r = run_edge_cli("edge", "ingest", "--config", str(cfg), "--file", str(f), "--profile", "2,1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["added"] == 10 and out["profile"] == [2, 1]
    r = run_edge_cli("edge", "ingest", "--config", str(cfg), "--file", "-", stdin=f.read_text())
    assert r.returncode == 0 and json.loads(r.stdout)["duplicates"] == 10
    r = run_edge_cli("edge", "status", "--config", str(cfg))
    st = json.loads(r.stdout)
    assert r.returncode == 0 and st["store"]["click"] == 5 and st["store"]["impression"] == 5
    assert st["status"] == "degraded" and "no manifest.json" in st["bundle_error"]


def test_cli_ingest_bad_lines_stores_good_ones_and_exits_2(tmp_path):
    cfg = write_config(tmp_path)
    good = _events(2)
    f = tmp_path / "ev.jsonl"
    f.write_text(json.dumps(good[0]) + "\n{oops\n" + json.dumps({**good[1], "item": 0}) + "\n\n"
                 + json.dumps({**good[1], "event_id": "x"}) + "\n")
    r = run_edge_cli("edge", "ingest", "--config", str(cfg), "--file", str(f))
    assert r.returncode == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "stored 2" in err and "line 2: invalid JSON" in err and "line 3: item = 0" in err


def test_cli_single_event(tmp_path):
    cfg = write_config(tmp_path)
    r = run_edge_cli("edge", "ingest", "--config", str(cfg), "--kind", "click", "--item", "7", "--event-id", "one")
    assert r.returncode == 0 and json.loads(r.stdout)["added"] == 1
    r = run_edge_cli("edge", "ingest", "--config", str(cfg), "--kind", "click", "--item", "7", "--event-id", "one")
    assert json.loads(r.stdout)["duplicates"] == 1


@pytest.mark.parametrize("args, message", [
    (["edge", "ingest"], "nothing to ingest"),
    (["edge", "ingest", "--item", "3"], "needs --kind and --item"),
    (["edge", "ingest", "--file", "/nonexistent.jsonl"], "cannot read"),
    (["edge", "ingest", "--profile", "1,x"], "--profile = '1,x': expected comma-separated integers"),
    (["edge", "ingest", "--profile", "1,-2"], "profile[1] = -2"),
    (["edge", "rank", "--candidates", "1,2"], "no manifest.json"),
    (["edge", "train"], "no manifest.json"),
])
def test_cli_user_errors_are_one_line_exit_2(tmp_path, args, message):
    cfg = write_config(tmp_path)
    r = run_edge_cli(*args, "--config", str(cfg))
    assert r.returncode == 2 and message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_bad_config_is_one_line(tmp_path):
    cfg = write_config(tmp_path, train={"max_steps": -3})
    r = run_edge_cli("edge", "status", "--config", str(cfg))
    assert r.returncode == 2 and "train.max_steps = -3: must be >= 1" in r.stderr and "Traceback" not in r.stderr
    r = run_edge_cli("edge", "status")
    assert r.returncode == 2 and "DCCL_EDGE_CONFIG" in r.stderr


def test_cli_help():
    r = run_edge_cli("edge", "--help")
    assert r.returncode == 0 and all(w in r.stdout for w in ("ingest", "rank", "train", "serve", "status"))
    assert run_edge_cli("--help").stdout.count("edge") >= 1


# ----------------------------------------------------------------------------- with a real bundle


@pytest.fixture
def device(tmp_path):
    build_bundle(tmp_path / "bundle")
    cfg = write_config(tmp_path, train={"max_steps": 10, "neg": 2, "val_frac": 0.2})
    r = run_edge_cli("edge", "ingest", "--config", str(cfg), "--profile", "2,1",
                     "--file", str(_jsonl(tmp_path / "ev.jsonl", _events(40, every=3))))
    assert r.returncode == 0, r.stderr
    return tmp_path, cfg


def _json(r):
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_rank_train_rank_on_a_real_bundle(device):
    tmp, cfg = device
    first = _json(run_edge_cli("edge", "rank", "--config", str(cfg), "--candidates", "5,10,15,20,25"))
    assert sorted(first["items"]) == [5, 10, 15, 20, 25] and first["phi_source"] == "encoder"
    assert first["scores"] == sorted(first["scores"], reverse=True)
    enc_phi = StateStore(tmp / "state").load().phi

    rep = _json(run_edge_cli("edge", "train", "--config", str(cfg)))
    assert rep["round"] == 1 and rep["steps"] >= 1 and rep["positives"] == 14 and rep["val_samples"] == 3 * 3
    st = StateStore(tmp / "state").load()
    assert st.rounds == 1 and st.bundle_version == "edge-test-1" and st.last_train_samples == rep["train_samples"]
    (name,) = st.phi
    changed = not np.array_equal(st.phi[name], enc_phi[name])
    assert changed != rep["kept_previous"], "φ changes exactly when the trained one is kept"

    again = _json(run_edge_cli("edge", "rank", "--config", str(cfg), "--candidates", "5,10,15,20,25"))
    assert again["phi_source"] == ("trained" if changed else "encoder")
    if changed:
        assert again["scores"] != first["scores"]
    rep2 = _json(run_edge_cli("edge", "train", "--config", str(cfg)))
    assert rep2["round"] == 2 and StateStore(tmp / "state").load().rounds == 2


def test_a_device_without_a_validation_slice_does_not_train(tmp_path):
    """The bundle's require_val rule: one click leaves nothing to hold out, so the device keeps its
    φ (no evidence a trained one is better), saves nothing and `dccl edge train` says why."""
    build_bundle(tmp_path / "bundle")
    assert json.loads((tmp_path / "bundle" / "manifest.json").read_text())["optimizer"]["require_val"] is True
    cfg = write_config(tmp_path, train={"max_steps": 10, "neg": 2, "val_frac": 0.2})
    _json(run_edge_cli("edge", "ingest", "--config", str(cfg), "--profile", "2,1",
                       "--file", str(_jsonl(tmp_path / "ev.jsonl", _events(4, every=4)))))   # 1 click
    rep = _json(run_edge_cli("edge", "train", "--config", str(cfg)))
    assert rep["steps"] == 0 and rep["val_samples"] == 0 and "no validation slice" in rep["skipped"]
    assert StateStore(tmp_path / "state").load().rounds == 0


def _set_bundle_steps(bundle: Path, steps: int) -> None:
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    m["optimizer"]["steps"] = steps
    path.write_text(json.dumps(m))


def test_the_bundle_step_budget_caps_on_device_training(device):
    """The manifest's optimizer.steps (the budget the cloud chose on validation for this bundle) caps
    a round; 0 means the cloud found no device step helps on it: the round completes with φ unchanged
    (so the device still has a model to upload, as the simulated pools do).
    `train.follow_bundle_steps: false` leaves only the board's own caps."""
    tmp, cfg = device
    _json(run_edge_cli("edge", "rank", "--config", str(cfg), "--candidates", "1"))   # the encoder's φ
    before = StateStore(tmp / "state").load()
    _set_bundle_steps(tmp / "bundle", 0)
    rep = _json(run_edge_cli("edge", "train", "--config", str(cfg)))
    after = StateStore(tmp / "state").load()
    assert rep["round"] == 1 and rep["steps"] == 0 and after.rounds == 1
    assert all(np.array_equal(before.phi[k], after.phi[k]) for k in before.phi)
    assert after.phi_source == before.phi_source == "encoder"
    _set_bundle_steps(tmp / "bundle", 2)
    rep = _json(run_edge_cli("edge", "train", "--config", str(cfg)))
    assert rep["round"] == 2 and rep["steps"] == 2, rep          # max_steps is 10, the bundle says 2
    cfg = write_config(tmp, train={"max_steps": 10, "neg": 2, "val_frac": 0.2, "follow_bundle_steps": False})
    rep = _json(run_edge_cli("edge", "train", "--config", str(cfg)))
    assert rep["round"] == 3 and rep["steps"] > 2, rep


def test_a_budget_by_training_positives_sets_each_round_s_steps(device):
    """A manifest's optimizer.steps_by_positives (the cloud's budget per bracket of training positives)
    gives the round the steps of the device's bracket — the rule the cloud's reference applies
    (`dccl.protocol.manifest.step_budget`) — and a malformed table is one clear error, state kept."""
    tmp, cfg = device
    path = tmp / "bundle" / "manifest.json"
    m = json.loads(path.read_text())
    m["optimizer"]["steps"] = 2
    m["optimizer"]["steps_by_positives"] = [[0, 3], [10_000, 1]]     # this device: fewer than 10,000
    path.write_text(json.dumps(m))
    rep = _json(run_edge_cli("edge", "train", "--config", str(cfg)))
    assert rep["round"] == 1 and rep["steps"] == 3, rep
    m["optimizer"]["steps_by_positives"] = [[0, 1], [1, 4]]          # at least one positive: 4 steps
    path.write_text(json.dumps(m))
    rep = _json(run_edge_cli("edge", "train", "--config", str(cfg)))
    assert rep["round"] == 2 and rep["steps"] == 4, rep
    before = (tmp / "state" / "state.npz").read_bytes()
    m["optimizer"]["steps_by_positives"] = [[1, 4]]                  # does not start at 0 positives
    path.write_text(json.dumps(m))
    r = run_edge_cli("edge", "train", "--config", str(cfg))
    assert r.returncode == 2 and "optimizer.steps_by_positives[0]" in r.stderr and "Traceback" not in r.stderr
    assert (tmp / "state" / "state.npz").read_bytes() == before


def test_corrupted_bundle_is_a_clear_error_and_state_is_kept(device):
    tmp, cfg = device
    _json(run_edge_cli("edge", "train", "--config", str(cfg)))
    before = (tmp / "state" / "state.npz").read_bytes()
    files = sorted(p.name for p in (tmp / "bundle").iterdir())
    onnx = tmp / "bundle" / "inference.onnx"
    onnx.write_bytes(onnx.read_bytes()[:100])               # truncated
    for cmd in (["rank", "--candidates", "1,2"], ["train"]):
        r = run_edge_cli("edge", *cmd, "--config", str(cfg))
        assert r.returncode == 2 and "inference.onnx" in r.stderr and "Traceback" not in r.stderr
    assert (tmp / "state" / "state.npz").read_bytes() == before
    assert sorted(p.name for p in (tmp / "bundle").iterdir()) == files, "nothing deleted"


def test_nan_phi_in_state_is_a_clear_error_and_nothing_is_deleted(device):
    tmp, cfg = device
    _json(run_edge_cli("edge", "rank", "--config", str(cfg), "--candidates", "1"))
    path = tmp / "state" / "state.npz"
    raw = dict(np.load(path))
    key = next(k for k in raw if k.startswith("phi:"))
    raw[key] = np.full_like(raw[key], np.nan)
    with open(path, "wb") as f:
        np.savez(f, **raw)
    bad = path.read_bytes()
    for cmd in (["rank", "--candidates", "1,2"], ["train"]):
        r = run_edge_cli("edge", *cmd, "--config", str(cfg))
        assert r.returncode == 2 and "contains NaN" in r.stderr and "Traceback" not in r.stderr
    assert path.read_bytes() == bad


def test_train_without_local_data_is_a_clear_error(tmp_path):
    build_bundle(tmp_path / "bundle")
    cfg = write_config(tmp_path)
    r = run_edge_cli("edge", "train", "--config", str(cfg))
    assert r.returncode == 2 and "nothing to train on" in r.stderr
    assert StateStore(tmp_path / "state").load().rounds == 0


def test_config_max_len_must_match_bundle(device):
    tmp, cfg = device
    data = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**data, "max_len": 99}))
    r = run_edge_cli("edge", "rank", "--config", str(cfg), "--candidates", "1")
    assert r.returncode == 2 and "max_len = 99" in r.stderr and "max_len 6" in r.stderr


def test_new_bundle_restarts_phi_from_the_encoder(device):
    tmp, cfg = device
    _json(run_edge_cli("edge", "train", "--config", str(cfg)))
    m = json.loads((tmp / "bundle" / "manifest.json").read_text())
    m["bundle_version"] = "edge-test-2"                      # same files, a new version
    (tmp / "bundle" / "manifest.json").write_text(json.dumps(m))
    out = _json(run_edge_cli("edge", "rank", "--config", str(cfg), "--candidates", "1,2"))
    assert out["bundle_version"] == "edge-test-2" and out["phi_source"] == "encoder"
    st = StateStore(tmp / "state").load()
    assert st.bundle_version == "edge-test-2" and st.rounds == 1 and st.counters["previous_bundle"] == "edge-test-1"


def test_serve_rank_and_stop_on_sigterm(device):
    tmp, cfg = device
    p = subprocess.Popen([edge_python(), "-m", "dccl.cli", "edge", "serve", "--config", str(cfg)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         env={**os.environ})
    try:
        line = p.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line + p.stderr.read()
        url = line.split("listening on ")[1].split()[0]
        health = json.loads(urllib.request.urlopen(url + "/health", timeout=30).read())
        assert health["status"] == "ok" and health["bundle_version"] == "edge-test-1"
        req = urllib.request.Request(url + "/rank", data=json.dumps({"candidates": [3, 4, 5], "k": 2}).encode(),
                                     method="POST")
        out = json.loads(urllib.request.urlopen(req, timeout=30).read())
        assert len(out["items"]) == 2 and out["phi_source"] == "encoder"
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 0
        p.stdout.close()
        p.stderr.close()


def test_bundle_dir_may_be_a_model_update_root(tmp_path):
    """bundle_dir pointing at edge_agent.model_update's root: the current bundle is used."""
    root = tmp_path / "models"
    build_bundle(root / "bundles" / "edge-test-1")
    (root / "state.json").write_text(json.dumps({"current": "edge-test-1", "previous": None}))
    cfg = write_config(tmp_path, bundle_dir="models")
    out = _json(run_edge_cli("edge", "rank", "--config", str(cfg), "--candidates", "1,2"))
    assert out["bundle_version"] == "edge-test-1"
    (root / "state.json").write_text(json.dumps({"current": None, "previous": None}))
    r = run_edge_cli("edge", "rank", "--config", str(cfg), "--candidates", "1,2")
    assert r.returncode == 2 and "no current bundle yet" in r.stderr
