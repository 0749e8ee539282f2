"""Fuzz the ingest path with >= 10,000 hostile patch messages (hypothesis), nightly-style.

    .venv/bin/python -m bench.fuzz_ingest [--cases 10000] [--broker mqtt://127.0.0.1:1883] [--replay 500]

1. Every strategy of ``tests/fuzz_strategies.py`` (random, truncated, mutated, forged, insider)
   in equal shares goes through ``IngestService.process`` — validation, quarantine
   transaction, metrics — exactly as the MQTT worker runs it. Asserted: nothing accepted,
   no exception but ``ProtocolError``, an expected reason where the case has one, and the
   quarantine table == the Prometheus counters == the counts printed by reason.
2. Re-signed mutations (a compromised key, so the parser runs behind a valid signature):
   rejected with a reason or valid in every checked respect; counted apart.
3. The service alive: a sample of the hostile payloads is replayed through the real broker
   to a running ingest service, followed by a valid patch; all are quarantined, the valid
   patch is stored, the service is still connected.

Prints counts by strategy and reason; exits non-zero if any assertion fails.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from hypothesis import HealthCheck, given, settings
from paho.mqtt.enums import CallbackAPIVersion

from cloud_trainer.ingest.service import IngestService
from cloud_trainer.ingest.store import open_store
from dccl.protocol import envelope
from dccl.protocol.broker import parse_broker_url
from dccl.protocol.errors import REASONS, ProtocolError
from dccl.protocol.topics import Topics
from tests import fuzz_strategies as fs


def _settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


def fuzz_hostile(svc: IngestService, per_strategy: int, keep: int, rng: random.Random
                 ) -> tuple[Counter, Counter, list]:
    by_reason: Counter[str] = Counter()
    by_kind: Counter[tuple[str, str]] = Counter()
    sample: list[fs.Case] = []
    seen = 0

    for name, strategy in fs.STRATEGIES.items():
        done = 0
        while done < per_strategy:         # hypothesis may stop short of max_examples; top up
            @_settings(per_strategy - done)
            @given(strategy())
            def feed(case: fs.Case) -> None:
                nonlocal done, seen
                outcome = svc.process(case.topic, case.payload)    # raises on anything unexpected
                assert outcome in REASONS, f"{case.kind} message {case.payload[:40]!r}... was {outcome}"
                if case.expect is not None:
                    assert outcome == case.expect, (case.kind, case.expect, outcome)
                by_reason[outcome] += 1
                by_kind[(case.kind, outcome)] += 1
                done += 1
                seen += 1
                if len(sample) < keep:                       # reservoir sample for the broker replay
                    sample.append(case)
                elif rng.random() < keep / seen:
                    sample[rng.randrange(keep)] = case
            feed()
    return by_reason, by_kind, sample


def fuzz_resigned(n: int) -> Counter:
    v = fs.validator()
    out: Counter[str] = Counter()

    @_settings(n)
    @given(fs.resigned_mutations())
    def feed(msg) -> None:
        topic, raw = msg
        try:
            p = v.validate(topic, raw)
        except ProtocolError as exc:
            assert exc.reason in REASONS
            out[exc.reason] += 1
            return
        assert p.bundle_version == fs.BUNDLE and set(p.tensors) == {fs.PHI}
        assert p.tensors[fs.PHI].shape == (64,) and np.isfinite(p.tensors[fs.PHI]).all()
        out["valid (accepted)"] += 1
    feed()
    return out


def replay_through_broker(broker: str, sample: list[fs.Case], workdir: Path, timeout: float) -> dict:
    """Hostile payloads, then a valid patch, through the real broker to a running service."""
    prefix = f"fuzz-{uuid.uuid4().hex[:8]}/dccl"
    topics = Topics(prefix)
    v = fs.validator()
    v.topics = topics
    store = open_store(workdir / "replay.db")
    svc = IngestService(broker, store, v, group="fuzz", client_id=f"fuzz-ingest-{prefix}",
                        session_expiry_s=0, follow_fleet=False).start()
    addr = parse_broker_url(broker)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(addr.host, addr.port)
    c.loop_start()
    try:
        deadline = time.monotonic() + timeout
        while not svc.connected.is_set():
            assert time.monotonic() < deadline, "ingest did not connect"
            time.sleep(0.05)
        time.sleep(0.3)                      # the SUBSCRIBE is sent right after CONNACK
        rel = lambda t: topics.prefix + t[len(fs.PREFIX):]  # noqa: E731  same device, replay prefix
        for case in sample:
            c.publish(rel(case.topic), case.payload, qos=1).wait_for_publish(10)
        good = envelope.Patch(device_id="dev-0", bundle_version=fs.BUNDLE, round=7, sample_count=3,
                              tensors={fs.PHI: np.zeros(64, np.float32)})
        c.publish(topics.patch("dev-0"), envelope.encode(good, fs.KEYS["dev-0"]), qos=1).wait_for_publish(10)
        while svc.processed < len(sample) + 1:
            assert time.monotonic() < deadline, f"only {svc.processed} of {len(sample) + 1} processed"
            time.sleep(0.05)
        q = store.quarantine_counts()
        assert sum(q.values()) == len(sample), q
        assert store.message_ids() == [good.message_id]
        assert svc.connected.is_set() and svc._worker.is_alive()
        return {"replayed": len(sample), "quarantined": sum(q.values()), "valid_stored": 1}
    finally:
        c.disconnect()
        c.loop_stop()
        svc.stop()
        store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10_000, help="hostile cases in total (default 10000)")
    ap.add_argument("--resigned", type=int, default=2_000, help="re-signed mutation cases (default 2000)")
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--replay", type=int, default=500, help="hostile cases replayed through the broker (0: skip)")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dccl-fuzz-") as tmp:
        work = Path(tmp)
        store = open_store(work / "fuzz.db")
        svc = IngestService("mqtt://127.0.0.1:1", store, fs.validator(), follow_fleet=False)   # never connects
        per = -(-args.cases // len(fs.STRATEGIES))
        by_reason, by_kind, sample = fuzz_hostile(svc, per, args.replay, random.Random(0))
        total = sum(by_reason.values())
        t_fuzz = time.monotonic() - t0

        print(f"hostile cases: {total} in {t_fuzz:.1f} s ({total / t_fuzz:.0f}/s), accepted: {store.count()}")
        print(f"{'strategy':<10} {'reason':<16} {'count':>7}")
        for (kind, reason), n in sorted(by_kind.items()):
            print(f"{kind:<10} {reason:<16} {n:>7}")
        print("by reason: " + ", ".join(f"{r}={n}" for r, n in by_reason.most_common()))
        assert total >= args.cases, total
        assert store.count() == 0, "a hostile message was stored"
        assert store.quarantine_counts() == dict(by_reason), "quarantine table disagrees with the counts"
        reg = svc.metrics.registry
        for reason, n in by_reason.items():
            assert reg.get_sample_value("dccl_ingest_rejected_total", {"reason": reason}) == n, reason
        assert reg.get_sample_value("dccl_ingest_messages_total", {"outcome": "accepted"}) is None
        store.close()

        if args.resigned:
            t1 = time.monotonic()
            res = fuzz_resigned(args.resigned)
            print(f"re-signed mutations: {sum(res.values())} in {time.monotonic() - t1:.1f} s: "
                  + ", ".join(f"{r}={n}" for r, n in res.most_common()))

        if args.replay:
            out = replay_through_broker(args.broker, sample, work, args.timeout)
            print(f"through {args.broker}: {out['replayed']} hostile replayed, {out['quarantined']} quarantined, "
                  f"valid patch stored after them: yes; service connected and its worker alive: yes")
    print(f"OK in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
