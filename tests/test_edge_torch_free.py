"""The edge agent runs where ``import torch`` fails, and never imports the cloud side.

A subprocess with the edge environment's interpreter installs a meta-path finder that makes
``torch``, ``cloud_trainer``, ``onnx_export`` and ``pydantic`` unimportable, then drives the
config, store, state, HTTP endpoint, agent and CLI for real, and reports which modules got
loaded. A bundle, when one can be built, extends the run to encoder, ranking and training.
"""

from __future__ import annotations

import json
import subprocess
import textwrap


from tests.edge_fixtures import REPO, build_bundle, edge_python

FORBIDDEN = ("torch", "cloud_trainer", "onnx_export", "pydantic")

_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys, time
    FORBIDDEN = %(forbidden)r
    blocked = []

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN:
                blocked.append(name)
                raise ImportError(f"{name} is blocked in the edge environment test")
            return None

    sys.meta_path.insert(0, Block())
    try:
        import torch  # noqa: F401
        raise SystemExit("torch import did not fail: the blocker is broken")
    except ImportError:
        blocked.clear()

    import urllib.request
    import numpy as np
    from pathlib import Path
    from dccl.cli import main
    from edge_agent.agent import Agent, BundleInfo, RoundResult
    from edge_agent.config import load_config
    from edge_agent.http_api import make_server
    from edge_agent.state import StateStore

    work = Path(sys.argv[1]); with_bundle = sys.argv[2] == "1"
    cfg_path = work / "agent.json"
    cfg_path.write_text(json.dumps({"device_id": "dev-tf", "state_dir": "state", "bundle_dir": "bundle",
                                    "http": {"port": 0}, "train": {"max_steps": 5, "neg": 2}}))
    now = time.time()
    ev = work / "ev.jsonl"
    ev.write_text("".join(json.dumps({"event_id": f"e{i}", "kind": "click", "item": 1 + i %% 7,
                                      "ts": now - 100 + i}) + "\\n" for i in range(12)))
    out = {}
    out["cli_ingest"] = main(["edge", "ingest", "--config", str(cfg_path), "--file", str(ev)])
    out["cli_status"] = main(["edge", "status", "--config", str(cfg_path)])

    class Fake:
        info = BundleInfo("tf-1", 20, 4, (), {"phi": (1, 2)})
        def score(self, phi, item, hist, profile): return item.astype(float) + phi["phi"][0, 0]
        def initial_phi(self, profile, hist, prev): return {"phi": np.zeros((1, 2), np.float32)}, "zeros"
        def train(self, phi, opt, arrays, cfg, seed):
            return RoundResult({"phi": phi["phi"] + 1}, {}, 0.1, 1, False, "fake", {})

    agent = Agent(load_config(cfg_path), model=Fake())
    ta = agent.store.training_arrays(neg=2, max_len=4, val_frac=0.25, seed=0, n_items=20)
    out["train_rows"] = len(ta.train); out["val_rows"] = len(ta.val)
    out["round"] = agent.train_round()["round"]
    out["state_rounds"] = StateStore(work / "state").load().rounds
    srv = make_server(agent, "127.0.0.1", 0); srv.start_background()
    req = urllib.request.Request(srv.url + "/rank", data=json.dumps({"candidates": [3, 9, 5]}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    out["rank"] = json.loads(urllib.request.urlopen(req, timeout=10).read())["items"]
    out["health"] = json.loads(urllib.request.urlopen(srv.url + "/health", timeout=10).read())["status"]
    srv.stop(); agent.close()

    if with_bundle:
        out["bundle_rank"] = main(["edge", "rank", "--config", str(cfg_path), "--candidates", "1,2,3"])
        out["bundle_train"] = main(["edge", "train", "--config", str(cfg_path)])

    out["blocked"] = blocked
    out["loaded_forbidden"] = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    out["onnxruntime_loaded"] = "onnxruntime" in sys.modules
    print("RESULT " + json.dumps(out))
""")


def _run(tmp_path, with_bundle: bool) -> dict:
    script = _SCRIPT % {"forbidden": FORBIDDEN}
    r = subprocess.run([edge_python(), "-c", script, str(tmp_path), "1" if with_bundle else "0"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(line[-1][len("RESULT "):])


def test_edge_environment_has_no_torch():
    r = subprocess.run([edge_python(), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "True", "the edge environment must not have torch installed (NOTES.md)"


def test_store_state_http_cli_run_without_torch(tmp_path):
    out = _run(tmp_path, with_bundle=False)
    assert out["cli_ingest"] == 0 and out["cli_status"] == 0
    assert (out["train_rows"], out["val_rows"]) == (9 * 3, 3 * 3)
    assert out["round"] == 1 and out["state_rounds"] == 1
    assert out["rank"] == [9, 5, 3] and out["health"] == "ok"
    assert out["blocked"] == [] and out["loaded_forbidden"] == []


def test_rank_and_train_on_a_real_bundle_without_torch(tmp_path):
    build_bundle(tmp_path / "bundle")
    out = _run(tmp_path, with_bundle=True)
    assert out["bundle_rank"] == 0 and out["bundle_train"] == 0
    assert out["onnxruntime_loaded"]
    assert out["blocked"] == [] and out["loaded_forbidden"] == []
