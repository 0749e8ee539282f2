"""``dccl hil run``: the hardware-in-the-loop suite against a target, a JSON report, published.

    dccl hil run --target host --bundle BUNDLE --out DIR
    dccl hil run --target emulated-aarch64 --bundle BUNDLE --out DIR     (scripts/aarch64_sysroot.sh first)
    dccl hil run --target ssh://pi@pi-kitchen.local --profile pi4 --bundle BUNDLE --out DIR \\
                 --python /opt/dccl/venv/bin/python

Writes ``DIR/report.json`` (schema ``dccl-hil-report/1``) and, with ``--broker`` and
``--device-id``, publishes it as a ``{"kind": "hil", ...}`` report on the device's report topic
(``{prefix}/device/{id}/report``, QoS 1). Exit status: 0 all passed, 1 a check failed,
2 bad usage (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dccl.errors import DcclError

HIL_DIR = Path(__file__).resolve().parent


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="host", help="host | emulated-aarch64 | ssh://user@board[:port] (default: host)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for report.json")
    p.add_argument("--bundle", metavar="DIR", help="model bundle to test with (default: the bundle_dir of --config)")
    p.add_argument("--config", metavar="FILE", help="an agent config: its bundle and device id are used")
    p.add_argument("--profile", help="board profile: pi4, pi5, jetson-orin-nano, host, emulated-aarch64 "
                                     "(default: the target's own for host / emulated-aarch64)")
    p.add_argument("--python", help="interpreter on the target (default: this one; ssh: python3)")
    p.add_argument("--reference-python", help="x86 interpreter for the reference run (default: this one)")
    p.add_argument("--ssh-option", action="append", default=[], metavar="OPT",
                   help="extra `ssh -o OPT` (repeatable), e.g. IdentityFile=~/.ssh/board")
    p.add_argument("--broker", help="publish the report here: mqtt[s]://[user[:password]@]host[:port]")
    p.add_argument("--prefix", default="dccl", help="topic prefix (default: dccl)")
    p.add_argument("--device-id", help="whose report topic to publish on (default: from --config)")
    p.add_argument("--tls-ca", help="CA certificate for an mqtts:// broker")
    p.add_argument("-k", dest="select", metavar="EXPR", help="only tests matching EXPR (pytest -k)")


def _resolve(args: argparse.Namespace) -> tuple[Path, str | None]:
    bundle, device_id = args.bundle, args.device_id
    if args.config:
        from edge_agent.agent import resolve_bundle_dir
        from edge_agent.config import load_config
        cfg = load_config(args.config)
        bundle = bundle or str(resolve_bundle_dir(cfg.bundle_dir))
        device_id = device_id or cfg.device_id
    if not bundle:
        raise DcclError("no bundle: pass --bundle DIR (a `dccl export` bundle) or --config agent.json")
    b = Path(bundle).resolve()
    if not (b / "manifest.json").is_file():
        raise DcclError(f"--bundle {b}: no manifest.json")
    return b, device_id


def publish_report(report: dict, broker: str, prefix: str, device_id: str, tls_ca: str | None = None,
                   timeout: float = 15.0) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from dccl.protocol import payloads
    from dccl.protocol.broker import parse_broker_url
    from dccl.protocol.topics import QOS_REPORT, Topics

    try:
        b, topic = parse_broker_url(broker), Topics(prefix).report(device_id)
    except ValueError as exc:
        raise DcclError(str(exc)) from None
    payload = payloads.dump_report("hil", device_id=device_id, **report)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dccl-hil-{device_id}", protocol=mqtt.MQTTv5)
    if b.username:
        c.username_pw_set(b.username, b.password or os.environ.get("DCCL_MQTT_PASSWORD"))
    if b.tls or tls_ca:
        c.tls_set(ca_certs=tls_ca)
    acks: list = []
    c.on_publish = lambda cl, u, mid, rc, props: acks.append(rc)
    try:
        c.connect(b.host, b.port, keepalive=30)
    except OSError as exc:
        raise DcclError(f"cannot reach broker {b.host}:{b.port} to publish the report: {exc}") from None
    c.loop_start()
    try:
        # Retained: the board's latest test report stays on the broker for `dccl fleet status`.
        c.publish(topic, payload, qos=QOS_REPORT, retain=True).wait_for_publish(timeout)
        deadline = time.monotonic() + timeout
        while not acks and time.monotonic() < deadline:
            time.sleep(0.02)
        if not acks:
            raise DcclError(f"broker {b.host}:{b.port}: no PUBACK for the report on {topic}")
        if acks[0].is_failure:
            raise DcclError(f"broker refused the report on {topic}: {acks[0]} (check the ACL / credentials)")
    except (RuntimeError, ValueError) as exc:   # paho: not connected (refused credentials)
        raise DcclError(f"broker {b.host}:{b.port}: could not publish the report ({exc})") from None
    finally:
        c.disconnect()
        c.loop_stop()


def run(args: argparse.Namespace) -> int:
    import pytest

    bundle, device_id = _resolve(args)
    if args.broker and not device_id:
        raise DcclError("--broker needs --device-id (or --config) to know the report topic")
    from hardware_tests.profiles import get_profile
    from hardware_tests.target import make_target
    ssh = args.target.startswith("ssh://")
    if args.target not in ("host", "emulated-aarch64") and not ssh:
        raise DcclError(f"--target = {args.target!r}: expected host, emulated-aarch64 or ssh://user@board[:port]")
    if ssh and not args.profile:
        raise DcclError("--profile is required with an ssh:// target (pi4, pi5, jetson-orin-nano, host)")
    get_profile(args.profile or args.target)
    if args.target == "emulated-aarch64":
        make_target(args.target)          # a missing sysroot / qemu is a one-line error, not a failed suite
    out = Path(args.out)
    pa = [str(HIL_DIR), "-c", os.devnull, "--rootdir", str(HIL_DIR.parent), "-p", "no:cacheprovider", "-q",
          "--hil-target", args.target, "--hil-bundle", str(bundle), "--hil-out", str(out)]
    for opt, value in (("--hil-profile", args.profile), ("--hil-python", args.python),
                       ("--hil-reference-python", args.reference_python), ("-k", args.select)):
        if value:
            pa += [opt, value]
    for o in args.ssh_option:
        pa += ["--hil-ssh-option", o]
    code = pytest.main(pa)
    report_path = out / "report.json"
    if not report_path.exists():
        raise DcclError(f"the suite did not run (pytest exit {int(code)}); no {report_path}")
    report = json.loads(report_path.read_text())
    s = report["summary"]
    print(f"dccl hil run: {report['target'].get('name')} ({report.get('arch')}), profile {report['profile']['name']}: "
          f"{s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped -> {report_path}", flush=True)
    if args.broker:
        publish_report(report, args.broker, args.prefix, device_id, args.tls_ca)
        print(f"dccl hil run: report published on {args.prefix}/device/{device_id}/report", flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    from dccl.cli import main
    sys.exit(main(["hil", "run", *sys.argv[1:]]))
