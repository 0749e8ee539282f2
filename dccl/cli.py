"""The ``dccl`` command: one entry point, subcommands loaded lazily.

Each subcommand lives in the package that owns it and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. Only the module of the chosen
subcommand is imported, so ``dccl edge ...`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dccl import __version__
from dccl.errors import DcclError

# (words) -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("experiment",): (
        "cloud_trainer.experiment",
        "offline study: every strategy on identical splits and seeds, tables + plots",
    ),
    ("cloud", "train"): (
        "cloud_trainer.train_cli",
        "train the cloud model + patch generator on the pooled cloud history -> checkpoint",
    ),
    ("cloud", "ingest"): (
        "cloud_trainer.ingest.service",
        "MQTT patches -> validation -> patch store (SQLite / PostgreSQL), acked after commit",
    ),
    ("fleet", "status"): ("cloud_trainer.fleet.status", "one-shot fleet table (or JSON): availability + heartbeats"),
    ("fleet", "watch"): ("cloud_trainer.fleet.watch", "live terminal view of the fleet"),
    ("edge",): ("edge_agent.cli", "on-device agent: edge ingest | rank | train | serve | status | run"),
    ("model", "publish"): (
        "cloud_trainer.publish",
        "ship a bundle to the fleet over MQTT: retained chunks, then the retained announcement",
    ),
    ("export",): ("onnx_export.cli", "cloud checkpoint -> versioned device bundle (ONNX + manifest), contract-checked"),
    ("simulate",): (
        "cloud_trainer.simulate.cli",
        "the whole device-cloud loop over MQTT on one machine (agent processes, ingest, MoMoDistill), with a report",
    ),
    ("deploy",): ("provisioning.cli", "provision boards: registry, broker/ingest files, board bundles, Pi images, SSH"),
    ("hil", "run"): ("hardware_tests.runner", "hardware-in-the-loop suite on host / emulated aarch64 / ssh board -> report"),
}


def _usage() -> str:
    width = max(len(" ".join(words)) for words in COMMANDS)
    lines = [
        "usage: dccl COMMAND [options]   (dccl COMMAND --help for a command's options)",
        "",
        "Device-Cloud Collaborative Learning for recommendation on edge boards.",
        "",
        "commands:",
    ]
    for words, (_, help_text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<{width}}  {help_text}")
    return "\n".join(lines)


def _match(argv: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    for n in range(min(len(argv), 3), 0, -1):
        words = tuple(argv[:n])
        if words in COMMANDS:
            return words, argv[n:]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(f"dccl {__version__}")
        return 0
    found = _match(argv)
    if found is None:
        subs = [" ".join(w) for w in COMMANDS if w[0] == argv[0] and len(w) > 1]
        if subs:
            print(f"dccl: error: '{argv[0]}' needs a subcommand: {', '.join(subs)}", file=sys.stderr)
        else:
            print(f"dccl: error: unknown command '{argv[0]}'; see dccl --help", file=sys.stderr)
        return 2
    words, rest = found
    module_name, help_text = COMMANDS[words]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog="dccl " + " ".join(words), description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)  # argparse exits 2 with one line on bad arguments
    try:
        return int(module.run(args) or 0)
    except DcclError as exc:
        print(f"dccl {' '.join(words)}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
