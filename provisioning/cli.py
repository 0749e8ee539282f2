"""``dccl deploy ...``: provision devices, build board bundles, flash Pi images, apply over SSH.

    dccl deploy init   --fleet ~/dccl-fleet --broker-host mqtt.example.org     (CA, cloud login)
    dccl deploy add    --fleet ~/dccl-fleet --device pi-kitchen --board pi4    (identity; --rotate renews)
    dccl deploy remove --fleet ~/dccl-fleet --device pi-kitchen
    dccl deploy render --fleet ~/dccl-fleet                                    (passwd, ACL, keys.json)
    dccl deploy list   --fleet ~/dccl-fleet
    dccl deploy bundle --fleet ~/dccl-fleet --device pi-kitchen --model runs/bundle-v3 \\
                       --wheels .cache/aarch64/wheels
    dccl deploy flash-pi --board-bundle ~/dccl-fleet/boards/pi-kitchen --image raspios-arm64.img
    dccl deploy write-image --image raspios-arm64.img --device /dev/sdX --yes
    dccl deploy ssh    --board-bundle ~/dccl-fleet/boards/jetson-1 --target ssh://ubuntu@jetson-1.local

Every command prints what it created or changed; running it again changes nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import subprocess
import tarfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from dccl.errors import DcclError


def _print_changes(ch) -> None:
    for line in ch.lines():
        print(line)


def _fleet(args):
    from provisioning.registry import Fleet
    return Fleet(args.fleet)


def cmd_init(args) -> int:
    _print_changes(_fleet(args).init(prefix=args.prefix, broker_host=args.broker_host))
    return 0


def cmd_add(args) -> int:
    _print_changes(_fleet(args).add(args.device, args.board, rotate=args.rotate))
    return 0


def cmd_remove(args) -> int:
    _print_changes(_fleet(args).remove(args.device))
    return 0


def cmd_render(args) -> int:
    _print_changes(_fleet(args).render())
    return 0


def cmd_list(args) -> int:
    reg = _fleet(args).load()
    print(json.dumps({"prefix": reg["prefix"], "broker_host": reg["broker_host"], "devices": reg["devices"]}, indent=1))
    return 0


def cmd_bundle(args) -> int:
    from provisioning.board import build_board_bundle
    out, ch = build_board_bundle(_fleet(args), args.device, Path(args.model), Path(args.out) if args.out else None,
                                 broker=args.broker, wheels=Path(args.wheels) if args.wheels else None,
                                 with_project_wheel=not args.no_project_wheel)
    _print_changes(ch)
    print(f"board bundle: {out}")
    return 0


def cmd_flash_pi(args) -> int:
    from provisioning.flash import flash_pi_image
    image = Path(args.image)
    if not image.is_file():
        raise DcclError(f"--image {image}: no such file")
    _print_changes(flash_pi_image(image, Path(args.board_bundle), partition=args.partition,
                                  boot_mount=args.boot_mount))
    return 0


def cmd_write_image(args) -> int:
    from provisioning.flash import write_image
    write_image(Path(args.image), Path(args.device), yes=args.yes)
    return 0


def ssh_base(target: str, options: list[str]) -> list[str]:
    parts = urlsplit(target)
    if parts.scheme != "ssh" or not parts.hostname:
        raise DcclError(f"--target = {target!r}: expected ssh://user@host[:port]")
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    for o in options:
        cmd += ["-o", o]
    if parts.port:
        cmd += ["-p", str(parts.port)]
    return cmd + [f"{parts.username}@{parts.hostname}" if parts.username else parts.hostname]


def apply_over_ssh(board_dir: Path, target: str, options: list[str], stage_root: str | None = None,
                   sudo: bool = True) -> str:
    """Copy the board bundle (tar over ssh) and run its install.sh on the board; returns its output."""
    from provisioning.board import verify_board_bundle
    meta = verify_board_bundle(board_dir)
    base = ssh_base(target, options)
    remote = f"/tmp/dccl-board-{uuid.uuid4().hex[:10]}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(board_dir, arcname=".")
    install = f"sh {remote}/install.sh"
    if stage_root:
        install = f"DCCL_ROOT={shlex.quote(stage_root)} {install}"
    elif sudo:
        install = f"sudo {install}"
    script = (f"umask 077 && mkdir -p {remote} && tar xzf - -C {remote} && {install}; rc=$?; "
              f"rm -rf {remote}; exit $rc")
    r = subprocess.run(base + [script], input=buf.getvalue(), capture_output=True, timeout=600)
    if r.returncode != 0:
        raise DcclError(f"install on {target} failed ({r.returncode}): {r.stderr.decode(errors='replace').strip()[-400:]}")
    return f"device {meta['device_id']} installed on {target}\n" + r.stdout.decode(errors="replace")


def cmd_ssh(args) -> int:
    print(apply_over_ssh(Path(args.board_bundle), args.target, args.ssh_option, args.stage_root,
                         sudo=not args.no_sudo), end="")
    return 0


SUBCOMMANDS = {
    "init": (cmd_init, "create or update the fleet directory: registry, fleet CA, cloud login"),
    "add": (cmd_add, "register a device: MQTT login + HMAC patch key; regenerates broker/ingest files"),
    "remove": (cmd_remove, "unregister a device (its login and key disappear from the generated files)"),
    "render": (cmd_render, "regenerate Mosquitto passwd/ACL and the ingest's keys.json from the registry"),
    "list": (cmd_list, "the registered devices (no secrets)"),
    "bundle": (cmd_bundle, "board bundle: config, secrets env, CA, model, systemd unit, wheels, install.sh"),
    "flash-pi": (cmd_flash_pi, "write a board bundle + first-boot hook into a Pi image's FAT partition (mtools)"),
    "write-image": (cmd_write_image, "copy an image to a block device with progress and read-back verification"),
    "ssh": (cmd_ssh, "apply a board bundle to a running board (e.g. a Jetson) over SSH"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Provision boards: identities, broker/ingest files, board bundles, images."
    subs = parser.add_subparsers(dest="deploy_command", metavar="SUBCOMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        p = subs.add_parser(name, help=help_text, description=help_text)
        if name in ("init", "add", "remove", "render", "list", "bundle"):
            p.add_argument("--fleet", required=True, metavar="DIR",
                           help="fleet directory (registry + secrets); keep it outside any repository")
        if name == "init":
            p.add_argument("--prefix", default="dccl", help="MQTT topic prefix (default: dccl)")
            p.add_argument("--broker-host", default="localhost", help="broker host name for its TLS certificate")
        if name in ("add", "remove", "bundle"):
            p.add_argument("--device", required=True, help="device id (1-64 chars of [A-Za-z0-9_.:-])")
        if name == "add":
            p.add_argument("--board", default="pi4", help="pi4 | pi5 | jetson-orin-nano | generic-arm64")
            p.add_argument("--rotate", action="store_true", help="new MQTT password and HMAC key")
        if name == "bundle":
            p.add_argument("--model", required=True, metavar="DIR", help="initial model bundle (dccl export)")
            p.add_argument("--out", metavar="DIR", help="default: FLEET/boards/DEVICE")
            p.add_argument("--broker", help="broker the board connects to (default: mqtts://BROKER_HOST:8883)")
            p.add_argument("--wheels", metavar="DIR",
                           help="aarch64 wheels to ship (e.g. .cache/aarch64/wheels from scripts/aarch64_sysroot.sh)")
            p.add_argument("--no-project-wheel", action="store_true", help="do not build and ship the dccl wheel")
        if name == "flash-pi":
            p.add_argument("--board-bundle", required=True, metavar="DIR")
            p.add_argument("--image", required=True, help="Raspberry Pi OS image file (.img, uncompressed)")
            p.add_argument("--partition", type=int, default=1, help="boot (FAT) partition number (default: 1)")
            p.add_argument("--boot-mount", default="/boot/firmware",
                           help="where the OS mounts the boot partition (/boot on Pi OS before bookworm)")
        if name == "write-image":
            p.add_argument("--image", required=True)
            p.add_argument("--device", required=True, help="block device, e.g. /dev/sdb (whole disk)")
            p.add_argument("--yes", action="store_true", help="confirm: the device is overwritten")
        if name == "ssh":
            p.add_argument("--board-bundle", required=True, metavar="DIR")
            p.add_argument("--target", required=True, help="ssh://user@board[:port]")
            p.add_argument("--ssh-option", action="append", default=[], metavar="OPT", help="extra ssh -o OPT")
            p.add_argument("--stage-root", metavar="DIR",
                           help="install under DIR on the board instead of / (no user, no systemctl): a dry run")
            p.add_argument("--no-sudo", action="store_true", help="the login is root: run install.sh directly")


def run(args: argparse.Namespace) -> int:
    return SUBCOMMANDS[args.deploy_command][0](args)
