"""``dccl edge ...``: the on-device agent from the command line.

    dccl edge ingest --config agent.json --file events.jsonl      (or --file - for stdin)
    dccl edge ingest --config agent.json --kind click --item 42 [--event-id ID] [--ts UNIX]
    dccl edge ingest --config agent.json --profile 2,0,5           (device profile, 0 = unknown)
    dccl edge rank   --config agent.json --candidates 1,2,3 [--k 10]
    dccl edge train  --config agent.json                           (one local training round)
    dccl edge serve  --config agent.json                           (HTTP endpoint on 127.0.0.1)
    dccl edge status --config agent.json
    dccl edge run    --config agent.json                           (the long-running MQTT agent)

Results are JSON on stdout. A user error (bad config, bad event, no bundle, no local data) is
one line on stderr and exit status 2; events that were valid are stored even when others in
the same file are rejected (ingestion is idempotent on event_id, so re-running is safe).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import uuid
from typing import Any

from dccl.errors import DcclError

CONFIG_ENV = "DCCL_EDGE_CONFIG"


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=1, sort_keys=False))


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise DcclError(f"{what} = {text!r}: expected comma-separated integers, e.g. 1,2,3") from None
    if not vals:
        raise DcclError(f"{what} = {text!r}: empty")
    return vals


def _load_config(args: argparse.Namespace):
    from edge_agent.config import load_config

    path = args.config or os.environ.get(CONFIG_ENV)
    if not path:
        raise DcclError(f"no config: pass --config FILE or set {CONFIG_ENV}")
    return load_config(path)


def _agent(args: argparse.Namespace):
    from edge_agent.agent import Agent

    return Agent(_load_config(args))


def _read_jsonl(path: str) -> tuple[list[Any], list[tuple[int, str]]]:
    """(events, [(line number, reason)] for lines that are not JSON)."""
    try:
        f = sys.stdin if path == "-" else open(path, encoding="utf-8")
    except OSError as exc:
        raise DcclError(f"--file {path}: cannot read ({exc.strerror or exc})") from None
    events, bad = [], []
    with f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    events.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    bad.append((n, f"invalid JSON at column {exc.colno}: {exc.msg}"))
        except UnicodeDecodeError as exc:
            raise DcclError(f"--file {path}: not UTF-8 text ({exc.reason})") from None
    return events, bad


def cmd_ingest(args: argparse.Namespace) -> int:
    single = any(v is not None for v in (args.kind, args.item, args.event_id, args.ts))
    if args.file and single:
        raise DcclError("use either --file or the single-event flags (--kind, --item, ...), not both")
    if not (args.file or single or args.profile):
        raise DcclError("nothing to ingest: pass --file FILE, --kind/--item for one event, or --profile")
    if single and (args.kind is None or args.item is None):
        raise DcclError("a single event needs --kind and --item")
    with _agent(args) as agent:
        out: dict[str, Any] = {}
        if args.profile is not None:
            out["profile"] = agent.set_profile(_ints(args.profile, "--profile"))
        if not (args.file or single):
            _print(out)
            return 0
        if args.file:
            numbered, bad_lines = _read_jsonl(args.file)
        else:
            ev: dict[str, Any] = {"event_id": args.event_id or f"cli-{uuid.uuid4().hex}",
                                  "kind": args.kind, "item": args.item}
            if args.ts is not None:
                ev["ts"] = args.ts
            numbered, bad_lines = [(1, ev)], []
        res = agent.ingest([e for _, e in numbered])
        line_of = [n for n, _ in numbered]
        rejected = sorted(bad_lines + [(line_of[i], r) for i, r in res.rejected])
        out.update(added=res.added, duplicates=res.duplicates, pruned=res.pruned,
                   rejected=[{"line": n, "reason": r} for n, r in rejected])
        _print(out)
        if rejected:
            where = "line " if args.file else ""
            first = "; ".join(f"{where}{n}: {r}" if args.file else r for n, r in rejected[:3])
            more = f" (+{len(rejected) - 3} more)" if len(rejected) > 3 else ""
            raise DcclError(f"stored {res.added}, already stored {res.duplicates}, "
                            f"rejected {len(rejected)}: {first}{more}")
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    if args.k is not None and args.k < 1:
        raise DcclError(f"--k = {args.k}: must be >= 1")
    with _agent(args) as agent:
        _print(agent.rank(_ints(args.candidates, "--candidates"), args.k))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    with _agent(args) as agent:
        _print(agent.train_round())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _agent(args) as agent:
        _print(agent.status())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from edge_agent.http_api import make_server

    with _agent(args) as agent:
        h = agent.config.http
        server = make_server(agent, h.bind, h.port if args.port is None else args.port)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        server.start_background()
        print(f"dccl edge serve: listening on {server.url} (device {agent.config.device_id})", flush=True)
        try:
            stop.wait()
        finally:
            server.stop()
        print("dccl edge serve: stopped", flush=True)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import logging

    from edge_agent.run import EdgeRunner

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = _load_config(args)
    runner = EdgeRunner(cfg, heartbeat_interval=args.heartbeat_interval, update_tolerance=args.update_tolerance,
                        train_every=args.train_every, keepalive=args.keepalive)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: runner.stop_event.set())
    runner.start()
    print(f"dccl edge run: device {cfg.device_id} on {cfg.redacted()['mqtt']['broker']} "
          f"(prefix {cfg.mqtt.prefix})", flush=True)
    try:
        runner.run()
    finally:
        runner.stop()
    print("dccl edge run: stopped", flush=True)
    return 0


SUBCOMMANDS = {
    "ingest": (cmd_ingest, "store this device's events (JSONL file or one event) and/or its profile"),
    "rank": (cmd_rank, "rank candidate items with the personalised model (bundle + current φ)"),
    "train": (cmd_train, "one local training round of φ on the stored events; state saved after"),
    "serve": (cmd_serve, "HTTP endpoint for the on-device app (127.0.0.1 by default)"),
    "status": (cmd_status, "bundle, state, store counts and config (secrets masked) as JSON"),
    "run": (cmd_run, "long-running agent: MQTT model updates, commands, heartbeats, signed patches after "
                     "each round; stops cleanly on SIGTERM"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "On-device agent: local store, φ training, ranking, HTTP endpoint, MQTT agent loop."
    subs = parser.add_subparsers(dest="edge_command", metavar="SUBCOMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        p = subs.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", metavar="FILE",
                       help=f"agent config (JSON); default: ${CONFIG_ENV}")
        if name == "ingest":
            p.add_argument("--file", metavar="PATH",
                           help='JSON Lines, one event per line: {"event_id", "kind", "item", "ts"?}; - = stdin')
            p.add_argument("--kind", choices=("impression", "click", "interaction"), help="single event: kind")
            p.add_argument("--item", type=int, help="single event: item id (1..n_items)")
            p.add_argument("--event-id", help="single event: idempotency key (default: a random id)")
            p.add_argument("--ts", type=float, help="single event: unix time (default: now)")
            p.add_argument("--profile", metavar="V1,V2,...",
                           help="set the device profile: P categorical ints, 0 = unknown")
        elif name == "rank":
            p.add_argument("--candidates", required=True, metavar="ID,ID,...", help="candidate item ids")
            p.add_argument("--k", type=int, help="return only the best k")
        elif name == "serve":
            p.add_argument("--port", type=int, help="override http.port (0 = any free port)")
        elif name == "run":
            p.add_argument("--heartbeat-interval", type=float, default=30.0, metavar="S",
                           help="seconds between retained heartbeats (default 30)")
            p.add_argument("--update-tolerance", type=float, default=0.01, metavar="R",
                           help="a new bundle may be worse on the local validation slice by this relative "
                                "amount and still be taken (default 0.01)")
            p.add_argument("--train-every", type=float, metavar="S",
                           help="also train (and send a patch) every S seconds (default: only on train_now)")
            p.add_argument("--keepalive", type=int, default=30, metavar="S",
                           help="MQTT keepalive; the broker declares the device offline after 1.5x (default 30)")
            p.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    return SUBCOMMANDS[args.edge_command][0](args)
