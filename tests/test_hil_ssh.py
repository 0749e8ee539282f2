"""The ssh:// target against a real OpenSSH server that the test starts on a free loopback port with
a throwaway key: `dccl hil run --target ssh://user@127.0.0.1:PORT` copies the agent code and the
bundle over SSH, runs the probe there, tunnels the controller's broker back (ssh -R) for the MQTT
checks; `dccl deploy ssh` applies a board bundle the same way."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.edge_fixtures import REPO, build_bundle, edge_python
from tests.mqtt_fixtures import free_port, port_open

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
pytestmark = pytest.mark.skipif(not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")),
                                reason="needs openssh-server and openssh-client")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    d = tmp_path_factory.mktemp("sshd")
    os.chmod(d, 0o700)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n"
        "AllowTcpForwarding yes\nSubsystem sftp internal-sftp\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)      # privilege separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=open(d / "sshd.log", "wb"))
    deadline = time.monotonic() + 10
    while not port_open(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text()[-1000:]}")
        time.sleep(0.05)
    options = [f"IdentityFile={d}/client_key", f"UserKnownHostsFile={d}/known_hosts",
               "StrictHostKeyChecking=accept-new", "IdentitiesOnly=yes"]
    yield f"ssh://{getpass.getuser()}@127.0.0.1:{port}", options
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("ssh-hil") / "bundle")


def test_hil_run_over_ssh(sshd, bundle, tmp_path):
    url, options = sshd
    args = [sys.executable, "-m", "dccl.cli", "hil", "run", "--target", url, "--profile", "host",
            "--python", edge_python(), "--bundle", str(bundle), "--out", str(tmp_path)]
    for o in options:
        args += ["--ssh-option", o]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["target"]["name"] == "ssh" and report["target"]["port"] == int(url.rsplit(":", 1)[1])
    assert report["target"]["remote_dir"].startswith("/tmp/dccl-hil-")
    assert not os.path.exists(report["target"]["remote_dir"])          # cleaned up on the board
    outcomes = {t["test"]: t["outcome"] for t in report["tests"]}
    for name in ("test_round_matches_the_bundle_reference", "test_phi_and_scores_agree_with_the_x86_run",
                 "test_last_will_marks_the_board_offline", "test_outbox_redelivers_after_a_broker_outage",
                 "test_model_update_applies_and_rolls_back"):
        assert outcomes[name] == "passed", report["tests"]
    assert report["passed"]


def test_deploy_ssh_applies_a_board_bundle(sshd, bundle, tmp_path):
    url, options = sshd
    fleet = tmp_path / "fleet"
    run = lambda *a: subprocess.run([sys.executable, "-m", "dccl.cli", "deploy", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=300, cwd=REPO)
    assert run("init", "--fleet", str(fleet)).returncode == 0
    assert run("add", "--fleet", str(fleet), "--device", "jetson-1", "--board", "jetson-orin-nano").returncode == 0
    assert run("bundle", "--fleet", str(fleet), "--device", "jetson-1", "--model", str(bundle),
               "--no-project-wheel").returncode == 0
    stage = tmp_path / "board-root"
    args = ["ssh", "--board-bundle", str(fleet / "boards/jetson-1"), "--target", url, "--stage-root", str(stage)]
    for o in options:
        args += ["--ssh-option", o]
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert "device jetson-1 installed" in r.stdout
    assert json.loads((stage / "etc/dccl/agent.json").read_text())["device_id"] == "jetson-1"
    assert (stage / "var/lib/dccl/models/state.json").exists()
