"""dccl deploy flash-pi on a generated disk image: a real MBR partition table (sfdisk) with a FAT32
boot partition (mkfs.vfat) and a Linux partition. The board bundle goes in with mtools at the
partition offset (nothing is mounted); the test extracts it again, checks every file, that
fsck.vfat is clean, and that the extracted bundle installs and starts the agent as the right device."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.edge_fixtures import REPO, build_bundle, edge_python

TOOLS = ("sfdisk", "mkfs.vfat", "fsck.vfat", "mcopy")
pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS),
                                reason=f"needs {', '.join(TOOLS)} (fdisk, dosfstools, mtools)")
START, SIZE = 8192, 98304            # sectors: boot partition at 4 MiB, 48 MiB (FAT32, like Pi OS's bootfs)
MT_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def deploy(*args):
    r = subprocess.run([sys.executable, "-m", "dccl.cli", "deploy", *args], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return r.stdout


def make_pi_image(path, *, cloud_init=False):
    with open(path, "wb") as f:
        f.truncate(128 << 20)
    table = f"label: dos\nstart={START}, size={SIZE}, type=c, bootable\nstart={START + SIZE}, type=83\n"
    subprocess.run(["sfdisk", "-q", str(path)], input=table, text=True, check=True, capture_output=True)
    part = path.with_suffix(".fat")
    subprocess.run(["mkfs.vfat", "-F", "32", "-s", "1", "-n", "bootfs", "-C", str(part), str(SIZE // 2)],
                   check=True, capture_output=True)
    files = {"cmdline.txt": "console=serial0,115200 console=tty1 root=PARTUUID=1234-02 rootfstype=ext4 rootwait\n",
             "config.txt": "arm_64bit=1\n"}
    if cloud_init:
        files["user-data"] = "#cloud-config\nhostname: pi-a\n"
    for name, text in files.items():
        (path.parent / name).write_text(text)
        subprocess.run(["mcopy", "-i", str(part), str(path.parent / name), f"::{name}"], check=True, env=MT_ENV)
    with open(part, "rb") as src, open(path, "r+b") as dst:     # the FAT file system into partition 1
        dst.seek(START * 512)
        shutil.copyfileobj(src, dst)
    part.unlink()
    return path


def extract(image, dest):
    """Partition 1 out of the image (for fsck), and its files (mcopy -s), without mounting."""
    part = dest / "p1.fat"
    with open(image, "rb") as src, open(part, "wb") as dst:
        src.seek(START * 512)
        dst.write(src.read(SIZE * 512))
    files = dest / "files"
    files.mkdir()
    subprocess.run(["mcopy", "-s", "-n", "-i", f"{image}@@{START * 512}", "::/*", str(files)], check=True, env=MT_ENV)
    return part, files


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    d = tmp_path_factory.mktemp("flash")
    fleet = d / "fleet"
    deploy("init", "--fleet", str(fleet), "--broker-host", "127.0.0.1")
    deploy("add", "--fleet", str(fleet), "--device", "pi-kitchen", "--board", "pi5")
    model = build_bundle(d / "model")
    deploy("bundle", "--fleet", str(fleet), "--device", "pi-kitchen", "--model", str(model), "--no-project-wheel")
    return fleet, fleet / "boards" / "pi-kitchen"


def test_bundle_lands_in_the_fat_partition_and_fsck_is_clean(board, tmp_path):
    fleet, bdir = board
    image = make_pi_image(tmp_path / "raspios.img")
    out = deploy("flash-pi", "--board-bundle", str(bdir), "--image", str(image))
    assert "changed  raspios.img:/cmdline.txt (first-boot hook)" in out
    part, files = extract(image, tmp_path)
    fsck = subprocess.run(["fsck.vfat", "-n", str(part)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    meta = json.loads((files / "dccl" / "board.json").read_text())
    assert meta["device_id"] == "pi-kitchen"
    for rel, digest in meta["files"].items():
        assert hashlib.sha256((files / "dccl" / rel).read_bytes()).hexdigest() == digest, rel
    cmdline = (files / "cmdline.txt").read_text()
    assert cmdline.count("\n") == 1 and "rootwait systemd.run=/boot/firmware/dccl-firstrun.sh" in cmdline
    assert (files / "dccl-firstrun.sh").read_bytes() == (REPO / "provisioning/templates/firstrun.sh").read_bytes()
    assert (files / "config.txt").read_text() == "arm_64bit=1\n"          # the rest of the partition untouched
    # flashing again changes nothing on the command line (no second hook)
    deploy("flash-pi", "--board-bundle", str(bdir), "--image", str(image))
    (tmp_path / "again").mkdir()
    _, again = extract(image, tmp_path / "again")
    assert (again / "cmdline.txt").read_text() == cmdline


def test_extracted_bundle_starts_the_agent_with_the_right_identity(board, tmp_path):
    fleet, bdir = board
    image = make_pi_image(tmp_path / "raspios.img")
    deploy("flash-pi", "--board-bundle", str(bdir), "--image", str(image))
    _, files = extract(image, tmp_path)
    root = tmp_path / "root"
    r = subprocess.run(["sh", str(files / "dccl" / "install.sh")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "DCCL_ROOT": str(root)})
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = json.loads((root / "etc/dccl/agent.json").read_text())
    for key in ("state_dir", "bundle_dir"):          # the board's absolute paths, under the staging root
        cfg[key] = str(root) + cfg[key]
    (root / "agent.json").write_text(json.dumps(cfg))
    env = dict(line.split("=", 1) for line in (root / "etc/dccl/agent.env").read_text().splitlines())
    st = subprocess.run([edge_python(), "-m", "dccl.cli", "edge", "status", "--config", str(root / "agent.json")],
                        capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, **env})
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["device_id"] == "pi-kitchen" and status["status"] == "ok"
    assert status["bundle_version"] == (bdir / "model/VERSION").read_text().strip()
    keys = json.loads((fleet / "generated/ingest/keys.json").read_text())
    assert env["DCCL_HMAC_KEY"] == keys["pi-kitchen"]                  # patches verify at the ingest
    assert status["config"]["mqtt"]["broker"].startswith("mqtts://pi-kitchen:***@")


def test_cloud_init_images_get_a_runcmd(board, tmp_path):
    _, bdir = board
    image = make_pi_image(tmp_path / "raspios.img", cloud_init=True)
    out = deploy("flash-pi", "--board-bundle", str(bdir), "--image", str(image))
    assert "user-data (cloud-init runcmd)" in out
    part, files = extract(image, tmp_path)
    ud = (files / "user-data").read_text()
    assert ud.startswith("#cloud-config\nhostname: pi-a\n") and "sh /boot/firmware/dccl/install.sh" in ud
    assert "systemd.run" not in (files / "cmdline.txt").read_text()
    assert subprocess.run(["fsck.vfat", "-n", str(part)], capture_output=True).returncode == 0


def test_write_image_verifies_what_it_wrote(tmp_path):
    image = make_pi_image(tmp_path / "raspios.img")
    target = tmp_path / "sdcard"
    target.write_bytes(b"")
    r = subprocess.run([sys.executable, "-m", "dccl.cli", "deploy", "write-image", "--image", str(image),
                        "--device", str(target)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "--yes" in r.stderr
    deploy("write-image", "--image", str(image), "--device", str(target), "--yes")
    assert target.read_bytes() == image.read_bytes()
