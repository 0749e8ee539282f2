"""Raspberry Pi images: put a board bundle into the boot (FAT) partition without mounting anything.

The partition table is read with ``sfdisk --json``; mtools addresses the FAT file system inside
the image file as ``IMAGE@@OFFSET``. The bundle lands in ``/dccl`` on the boot partition, with a
first-boot hook that runs its ``install.sh``:

- images that boot with cloud-init (a ``user-data`` file on the boot partition): a ``runcmd``
  entry is added (an existing ``runcmd`` list must be edited by hand: we do not rewrite YAML);
- otherwise ``dccl-firstrun.sh`` and ``systemd.run=...`` on ``cmdline.txt``, the way Raspberry
  Pi Imager customises images; the script removes itself, the hook and the secrets afterwards.

``write_image`` copies an image to a block device with progress, then reads it back and compares
sha256 (refuses mounted devices and needs ``--yes``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from dccl.errors import DcclError
from provisioning.board import TEMPLATES, verify_board_bundle
from provisioning.registry import Changes

HOOK_ARGS = "systemd.run={boot}/dccl-firstrun.sh systemd.run_success_action=reboot systemd.unit=kernel-command-line.target"
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "MTOOLS_NO_VFAT": "0"}


def _need(tool: str, package: str) -> None:
    if not shutil.which(tool):
        raise DcclError(f"needs {tool} (apt-get install {package})")


def partition_offset(image: Path, number: int = 1) -> tuple[int, int]:
    """(byte offset, byte size) of partition ``number`` (1-based) of a disk image."""
    _need("sfdisk", "fdisk")
    r = subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True)
    if r.returncode != 0:
        raise DcclError(f"--image {image}: no partition table ({r.stderr.strip()[-200:]})")
    table = json.loads(r.stdout)["partitiontable"]
    parts = table.get("partitions", [])
    if not 1 <= number <= len(parts):
        raise DcclError(f"--partition {number}: {image} has {len(parts)} partitions")
    sector = int(table.get("sectorsize", 512))
    p = parts[number - 1]
    return int(p["start"]) * sector, int(p["size"]) * sector


class FatImage:
    """mtools on ``image@@offset``."""

    def __init__(self, image: Path, offset: int):
        _need("mcopy", "mtools")
        self.spec = f"{image}@@{offset}"

    def _run(self, *args: str, check: bool = True, data: bytes | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run(list(args), capture_output=True, input=data, env={**os.environ, **MTOOLS_ENV})
        if check and r.returncode != 0:
            raise DcclError(f"{args[0]} on {self.spec}: {r.stderr.decode(errors='replace').strip()[-300:]}")
        return r

    def exists(self, path: str) -> bool:
        return self._run("mdir", "-b", "-i", self.spec, f"::{path}", check=False).returncode == 0

    def read(self, path: str) -> bytes:
        return self._run("mtype", "-i", self.spec, f"::{path}").stdout

    def write(self, path: str, data: bytes) -> None:
        with tempfile.NamedTemporaryFile() as f:
            f.write(data)
            f.flush()
            self._run("mcopy", "-o", "-i", self.spec, f.name, f"::{path}")

    def mkdir(self, path: str) -> None:
        if not self.exists(path):
            self._run("mmd", "-i", self.spec, f"::{path}")

    def put_tree(self, src: Path, dest: str) -> list[str]:
        """Copy a directory tree (files overwritten); returns the FAT paths written."""
        self.mkdir(dest)
        written = []
        for p in sorted(src.rglob("*")):
            rel = p.relative_to(src).as_posix()
            if p.is_dir():
                self.mkdir(f"{dest}/{rel}")
            elif p.is_file():
                self._run("mcopy", "-o", "-i", self.spec, str(p), f"::{dest}/{rel}")
                written.append(f"{dest}/{rel}")
        return written


def _cloud_init_runcmd(user_data: str, command: str) -> str:
    if command in user_data:
        return user_data
    if any(line.startswith("runcmd:") for line in user_data.splitlines()):
        raise DcclError("the image's user-data already has a runcmd list; add "
                        f"`- [ sh, -c, \"{command}\" ]` to it by hand (not rewriting YAML automatically)")
    return user_data.rstrip("\n") + f"\n# added by dccl deploy flash-pi\nruncmd:\n  - [ sh, -c, \"{command}\" ]\n"


def flash_pi_image(image: Path, board_dir: Path, *, partition: int = 1, boot_mount: str = "/boot/firmware"
                   ) -> Changes:
    meta = verify_board_bundle(board_dir)
    offset, _ = partition_offset(image, partition)
    fat = FatImage(image, offset)
    if not fat.exists("/"):
        raise DcclError(f"--image {image}: partition {partition} is not a FAT file system")
    ch = Changes()
    for p in fat.put_tree(board_dir, "/dccl"):
        ch.created.append(f"{image.name}:{p}")
    if fat.exists("/user-data"):
        old = fat.read("/user-data").decode()
        new = _cloud_init_runcmd(old, f"sh {boot_mount}/dccl/install.sh >> /var/log/dccl-install.log 2>&1")
        if new != old:
            fat.write("/user-data", new.encode())
            ch.changed.append(f"{image.name}:/user-data (cloud-init runcmd)")
        else:
            ch.unchanged.append(f"{image.name}:/user-data")
    else:
        if not fat.exists("/cmdline.txt"):
            raise DcclError(f"--image {image}: partition {partition} has neither user-data nor cmdline.txt; "
                            "not a Raspberry Pi boot partition")
        fat.write("/dccl-firstrun.sh", (TEMPLATES / "firstrun.sh").read_bytes())
        ch.created.append(f"{image.name}:/dccl-firstrun.sh")
        cmdline = fat.read("/cmdline.txt").decode().strip()
        hook = HOOK_ARGS.format(boot=boot_mount)
        if hook not in cmdline:
            fat.write("/cmdline.txt", (cmdline + " " + hook + "\n").encode())
            ch.changed.append(f"{image.name}:/cmdline.txt (first-boot hook)")
        else:
            ch.unchanged.append(f"{image.name}:/cmdline.txt")
    ch.notes.append(f"device {meta['device_id']} ({meta['board']}), model {meta['model_version']}; the boot partition "
                    "holds the board's secrets until first boot removes them: keep the card private")
    return ch


def _mounted(dev: Path) -> bool:
    real = os.path.realpath(dev)
    try:
        return any(line.split()[0].startswith(real) for line in Path("/proc/mounts").read_text().splitlines())
    except OSError:
        return False


def write_image(image: Path, device: Path, *, yes: bool, block: int = 4 << 20) -> str:
    """Image -> block device with progress on stderr; read back and compare. Returns the sha256."""
    if not yes:
        raise DcclError(f"writing {image} to {device} erases it: add --yes")
    st = os.stat(device)
    if not stat.S_ISBLK(st.st_mode) and not stat.S_ISREG(st.st_mode):
        raise DcclError(f"--device {device}: not a block device")
    if stat.S_ISBLK(st.st_mode) and _mounted(device):
        raise DcclError(f"--device {device}: mounted; unmount it first")
    size = image.stat().st_size
    h = hashlib.sha256()
    done = 0
    with open(image, "rb") as src, open(device, "r+b" if stat.S_ISBLK(st.st_mode) else "wb") as dst:
        for chunk in iter(lambda: src.read(block), b""):
            dst.write(chunk)
            h.update(chunk)
            done += len(chunk)
            print(f"\rwriting {done >> 20}/{size >> 20} MiB ({100 * done // max(size, 1)}%)", end="", file=sys.stderr)
        dst.flush()
        os.fsync(dst.fileno())
    print(file=sys.stderr)
    back = hashlib.sha256()
    with open(device, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(block, left))
            if not chunk:
                break
            back.update(chunk)
            left -= len(chunk)
    if back.hexdigest() != h.hexdigest():
        raise DcclError(f"verification failed: {device} does not read back as {image}")
    print(f"verified {size >> 20} MiB, sha256 {h.hexdigest()}", file=sys.stderr)
    return h.hexdigest()
