"""The device bundle: layout, manifest, artifact properties, tamper detection, contract check, CLI.

Two bundle kinds: "cached" (the default patches, all in the MLP: trunk.onnx + head.onnx, train graphs
on the trunk's features) and "raw" (an attention patch: train graphs on item, hist, profile)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cloud_trainer.models.metapatch import MetaPatchConfig
from cloud_trainer.checkpoint import save_checkpoint
from dccl.cli import main as dccl_main
from dccl.protocol import manifest as mf
from onnx_export import artifacts
from onnx_export.bundle import ContractError, check_bundle
from onnx_export.schema import example_batch
from onnx_fixtures import DEVICE_CFG, RAW_TARGETS, ml100k_model, shared_bundle

RAW_FILES = {"manifest.json", "inference.onnx", "train_step.onnx", "encoder.onnx", "training_model.onnx",
             "eval_model.onnx", "optimizer_model.onnx", "checkpoint"}
FILES = RAW_FILES | {"trunk.onnx", "head.onnx"}
# Cached trunk features: the output of mlp.0's base Linear (its 64 units), the first patched layer —
# not the MLP's input x (3 x 32 + 3 x 8 = 120): the patch reads only that output.
F = 64
PHI = MetaPatchConfig().phi_dim  # the shared test bundles' φ size (the default)


@pytest.fixture(scope="module")
def bundle():
    return shared_bundle("cached")


@pytest.fixture(scope="module")
def raw_bundle():
    return shared_bundle("raw")


def _inputs(path: Path) -> set[str]:
    return {i.name for i in onnx.load(str(path)).graph.input}


def _copy(bundle_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle_dir, dst)
    return dst


def _rewrite_manifest(d: Path, edit) -> None:
    m = json.loads((d / mf.FILE).read_text())
    edit(m)
    (d / mf.FILE).write_text(json.dumps(m))


def test_layout_and_manifest(bundle):
    model, d = bundle
    assert {p.name for p in d.iterdir()} == FILES
    m = mf.load(d, verify=True)
    assert set(m["files"]) == FILES - {"manifest.json"}
    assert m["bundle_version"] == "test-1"
    assert m["manifest_version"] == 2
    # Patches only in the MLP: the train graphs take the trunk's features, the bundle carries the trunk.
    assert m["train_inputs"] == ["features", "label"]
    assert (m["models"]["trunk"], m["models"]["head"]) == ("trunk.onnx", "head.onnx")
    assert m["inputs"]["features"] == {"dtype": "float32", "shape": ["batch", F]}
    assert m["portable"]["inputs"][-2:] == ["features", "label"]
    assert m["trainable"] == {"metapatch_phi": {"shape": [1, 64], "dtype": "float32"}}
    assert m["inputs"]["item"] == {"dtype": "int64", "shape": ["batch"], "vocab": 1683}
    assert m["inputs"]["hist"]["shape"] == ["batch", 20]
    assert m["inputs"]["profile"] == {"dtype": "int64", "shape": ["batch", 3], "vocab": [8, 3, 22]}
    assert m["schema"] == {"n_items": 1682, "n_attrs": 20, "max_len": 20, "profile_vocab": [8, 3, 22], "phi_dim": 64}
    opt = m["optimizer"]
    assert (opt["lr"], opt["weight_decay"], opt["steps"], opt["eps"]) == (0.05, 0.01, 20, 1e-8)
    assert {"torch", "onnx", "onnxruntime-training-cpu", "numpy", "python"} <= set(m["versions"])
    ref = m["reference"]
    assert ref["steps"] >= 1 and np.abs(np.subtract(ref["phi_after"], ref["phi0"])).max() > 0
    # The reference runs at min(lr, 0.01): at a device's 0.1, AdamW amplifies float32 rounding in
    # near-zero gradient components past the tolerance (a simulate round failed that way).
    assert ref["lr"] == 0.01
    assert m["source"]["encoder_trained"] is False


def test_artifacts_properties(bundle):
    model, d = bundle
    state_names = set(model.state_dict())
    for name in FILES - {"manifest.json", "checkpoint"}:
        assert onnx.load(str(d / name)).ir_version <= 10, name  # ORT 1.19 reads IR <= 10
    training = onnx.load(str(d / "training_model.onnx")).graph
    # Parameters keep their state_dict names; the only gradient is φ's.
    assert {i.name for i in training.input} >= {"metapatch_phi", "base.mlp.0.shared_theta", "base.mlp.2.base_layer.weight"}
    # mlp.0's base Linear is in the trunk (its output is the cached feature), not in the train graph.
    assert "base.mlp.0.base_layer.weight" not in {i.name for i in training.input}
    assert {i.name for i in training.input if i.name.startswith("base.")} <= state_names
    assert [o.name for o in training.output if "_grad" in o.name] == ["metapatch_phi_grad.accumulation.out"]
    step = onnx.load(str(d / "train_step.onnx"))
    assert {o.domain for o in step.opset_import} == {""} and step.opset_import[0].version == 18
    assert {n.domain for n in step.graph.node} == {""}  # standard operators only: plain onnxruntime runs it
    # Both train graphs are the head alone: features in, none of the trunk's tensors inside.
    for name in ("training_model.onnx", "train_step.onnx"):
        g = onnx.load(str(d / name)).graph
        assert {"features", "label"} <= _inputs(d / name) and not {"item", "hist", "profile"} & _inputs(d / name), name
        tensors = {t.name for t in g.initializer} | _inputs(d / name)
        assert not any("item_emb" in t or "attention" in t or "item_table" in t for t in tensors), name
    assert _inputs(d / "trunk.onnx") == {"item", "hist", "profile"}
    assert _inputs(d / "head.onnx") == {"features", "phi"}
    assert _inputs(d / "inference.onnx") == {"item", "hist", "profile", "phi"}  # unchanged: the full model


def test_raw_bundle_for_an_attention_patch(raw_bundle):
    """A patch in the attention unit makes the trunk depend on φ: no trunk, raw-input train graphs."""
    model, d = raw_bundle
    assert not model.cacheable
    assert {p.name for p in d.iterdir()} == RAW_FILES
    m = mf.load(d)
    assert m["train_inputs"] == ["item", "hist", "profile", "label"]
    assert (m["models"]["trunk"], m["models"]["head"]) == (None, None) and "features" not in m["inputs"]
    for name in ("training_model.onnx", "train_step.onnx"):
        assert {"item", "hist", "profile", "label"} <= _inputs(d / name) and "features" not in _inputs(d / name)
    assert "base.attention.key.shared_theta" in _inputs(d / "training_model.onnx")


def test_cache_features_needs_a_cacheable_model(tmp_path):
    from dccl.errors import DcclError
    from onnx_export.bundle import write_bundle

    model = ml100k_model(target_modules=RAW_TARGETS)
    with pytest.raises(DcclError, match=r"cache_features: .*attention.key.* cannot be cached"):
        write_bundle(model, None, tmp_path / "b", version="x", cfg=DEVICE_CFG, cache_features=True)
    assert not (tmp_path / "b").exists()


def test_trunk_and_head_match_pytorch(bundle):
    """trunk.onnx is the PyTorch trunk and head.onnx(trunk(x), φ) the patched model, to 1e-5."""
    import onnxruntime as ort

    model, d = bundle
    b = example_batch(model, 300, seed=11)
    phi = (np.random.default_rng(1).standard_normal((1, model.phi_dim)) * 0.3).astype(np.float32)
    tb = {k: torch.from_numpy(v) for k, v in b.items()}
    with torch.no_grad():
        want_x = model.features(tb["item"], tb["hist"], tb["profile"]).numpy()
        want = model(tb["item"], tb["hist"], tb["profile"], phi=torch.from_numpy(phi)).numpy()
    trunk = ort.InferenceSession(str(d / "trunk.onnx"), providers=["CPUExecutionProvider"])
    head = ort.InferenceSession(str(d / "head.onnx"), providers=["CPUExecutionProvider"])
    x = trunk.run(None, {k: b[k] for k in ("item", "hist", "profile")})[0]
    assert x.shape == (300, F) and np.abs(x - want_x).max() <= 1e-5
    got = head.run(None, {"features": x, "phi": phi})[0]
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(want - model.forward_unpatched(tb["item"], tb["hist"], tb["profile"]).detach().numpy()).max() > 1e-2


@pytest.mark.parametrize("kind", ["cached", "raw"])
def test_portable_graph_keeps_eps_and_dynamic_batch(kind):
    """eps is an input the exporter cannot fold away (NOTES.md: optimize=True drops eps=1e-8); any
    batch size runs."""
    import onnxruntime as ort

    model, d = shared_bundle(kind)
    sess = ort.InferenceSession(str(d / "train_step.onnx"), providers=["CPUExecutionProvider"])
    trunk = ort.InferenceSession(str(d / "trunk.onnx"), providers=["CPUExecutionProvider"]) if kind == "cached" else None
    f = lambda x: np.asarray(x, np.float32)  # noqa: E731
    phi = np.zeros((1, PHI), np.float32)
    for n in (1, 7, 300):
        b = example_batch(model, n, seed=n)
        if trunk is not None:
            b = {"features": trunk.run(None, {k: b[k] for k in ("item", "hist", "profile")})[0], "label": b["label"]}
        feeds = dict(phi=phi, m=phi, v=phi, step=np.asarray(0, np.int64), lr=f(0.05), beta1=f(0.9),
                     beta2=f(0.999), eps=f(1e-8), weight_decay=f(0.0), **b)
        out = sess.run(None, feeds)
        assert out[0].shape == (1, PHI) and np.isfinite(out[4])
        big_eps = sess.run(None, dict(feeds, eps=f(1.0)))
        assert np.abs(out[0] - big_eps[0]).max() > 1e-3


def test_encoder_matches_pytorch():
    """A trained-looking encoder (non-zero output layer) exported and run equals PyTorch."""
    import onnxruntime as ort

    from cloud_trainer.models.encoder import EncoderConfig, PatchEncoder
    from onnx_export import encoder as enc_export

    torch.manual_seed(3)
    enc = PatchEncoder(EncoderConfig(n_items=1682, phi_dim=32, profile_vocab=[8, 3, 22]))
    with torch.no_grad():
        enc.mlp[2].weight.normal_(0, 0.1)
    model = ml100k_model()
    b = example_batch(model, 9, seed=5)
    phi_prev = np.random.default_rng(0).standard_normal((9, 32)).astype(np.float32)
    with torch.no_grad():
        want = enc(torch.from_numpy(b["profile"]), torch.from_numpy(b["hist"]), torch.from_numpy(phi_prev)).numpy()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        enc_export.export(enc, 20, Path(tmp) / "e.onnx")
        got = ort.InferenceSession(str(Path(tmp) / "e.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"profile": b["profile"], "hist": b["hist"], "phi_prev": phi_prev})[0]
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("warm,cold", [("previous", "zero"), ("zero", "encoder"), ("zero", "zero")])
def test_encoder_start_policy_is_in_the_exported_graph(warm, cold):
    """The start policy chosen by the cloud runs on the device as part of encoder.onnx: rows without
    a previous φ (all zeros) follow the cold policy, the others the warm one — as PatchEncoder.start."""
    import tempfile

    import onnxruntime as ort

    from cloud_trainer.models.encoder import EncoderConfig, PatchEncoder
    from onnx_export import encoder as enc_export

    torch.manual_seed(3)
    enc = PatchEncoder(EncoderConfig(n_items=1682, phi_dim=32, profile_vocab=[8, 3, 22],
                                     start_warm=warm, start_cold=cold))
    with torch.no_grad():
        enc.mlp[2].weight.normal_(0, 0.1)
    b = example_batch(ml100k_model(), 6, seed=5)
    phi_prev = np.random.default_rng(0).standard_normal((6, 32)).astype(np.float32)
    phi_prev[::2] = 0.0  # rows 0, 2, 4: devices without a previous φ
    args = torch.from_numpy(b["profile"]), torch.from_numpy(b["hist"]), torch.from_numpy(phi_prev)
    with torch.no_grad():
        want, raw = enc.start(*args).numpy(), enc(*args).numpy()
    expect = {"encoder": raw, "previous": phi_prev, "zero": np.zeros_like(phi_prev)}
    np.testing.assert_array_equal(want[1::2], expect[warm][1::2])
    np.testing.assert_array_equal(want[::2], expect[cold][::2])
    with tempfile.TemporaryDirectory() as tmp:
        enc_export.export(enc, 20, Path(tmp) / "e.onnx")
        sess = ort.InferenceSession(str(Path(tmp) / "e.onnx"), providers=["CPUExecutionProvider"])
        feeds = {"profile": b["profile"], "hist": b["hist"], "phi_prev": phi_prev}
        got = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
    assert np.abs(got - want).max() <= 1e-5


# -- bad bundles: each a clear error naming what is wrong ---------------------------------------

def test_tampered_file_is_caught(bundle, tmp_path):
    d = _copy(bundle[1], tmp_path)
    raw = bytearray((d / "train_step.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (d / "train_step.onnx").write_bytes(bytes(raw))
    with pytest.raises(mf.ManifestError, match=r"files\['train_step.onnx'\]: sha256 .* tampered"):
        mf.load(d)


def test_truncated_missing_and_unknown_version(bundle, tmp_path):
    d = _copy(bundle[1], tmp_path)
    data = (d / "checkpoint").read_bytes()
    (d / "checkpoint").write_bytes(data[: len(data) // 2])
    with pytest.raises(mf.ManifestError, match=r"files\['checkpoint'\]: size .*truncated"):
        mf.load(d)
    (d / "checkpoint").unlink()
    with pytest.raises(mf.ManifestError, match=r"files\['checkpoint'\]: missing"):
        mf.load(d)
    _rewrite_manifest(d, lambda m: m.update(manifest_version=99))
    with pytest.raises(mf.ManifestError, match="manifest_version: 99 is not a version"):
        mf.load(d, verify=False)
    _rewrite_manifest(d, lambda m: m.update(manifest_version=1, files={**m["files"], "../x": m["files"]["checkpoint"]}))
    with pytest.raises(mf.ManifestError, match=r"files\['../x'\]: .* not a safe relative file name"):
        mf.load(d, verify=False)
    (d / mf.FILE).write_text("{not json")
    with pytest.raises(mf.ManifestError, match="manifest.json: not valid JSON"):
        mf.load(d)


def test_manifest_field_errors_name_the_field(bundle):
    m = mf.load(bundle[1], verify=False)
    bad = json.loads(json.dumps(m))
    bad["trainable"]["metapatch_phi"]["dtype"] = "float16"
    with pytest.raises(mf.ManifestError, match=r"trainable\['metapatch_phi'\].dtype: 'float16'"):
        mf.validate(bad)
    bad = json.loads(json.dumps(m))
    del bad["optimizer"]["lr"]
    with pytest.raises(mf.ManifestError, match="optimizer.lr: missing"):
        mf.validate(bad)
    bad = json.loads(json.dumps(m))
    bad["inputs"]["hist"]["shape"] = ["batch", -1]
    with pytest.raises(mf.ManifestError, match="inputs.hist.shape"):
        mf.validate(bad)
    # local_data (how the cloud built the devices' samples) is optional; when present it is checked.
    assert "local_data" not in m
    ok = json.loads(json.dumps(m))
    ok["local_data"] = {"neg": 4, "val_frac": 0.3}
    mf.validate(ok)
    ok["local_data"]["since"] = 1764547200.0
    mf.validate(ok)
    for local, msg in (({"neg": -1, "val_frac": 0.3}, "local_data.neg: -1 must be an integer >= 0"),
                       ({"neg": 4, "val_frac": 1.0}, r"local_data.val_frac: 1.0 must be a number in \[0, 1\)"),
                       ({"neg": True, "val_frac": 0.3}, "local_data.neg: True is not int"),
                       ({"val_frac": 0.3}, "local_data.neg: missing"),
                       ({"neg": 4, "val_frac": 0.3, "since": "monday"}, "local_data.since: 'monday' is not"),
                       ({"neg": 4, "val_frac": 0.3, "since": float("inf")}, "local_data.since: inf must be a finite")):
        bad = json.loads(json.dumps(m))
        bad["local_data"] = local
        with pytest.raises(mf.ManifestError, match=msg):
            mf.validate(bad)


def test_manifest_train_inputs_and_trunk_are_validated(bundle, raw_bundle, tmp_path):
    """A cached manifest without its trunk, a raw one with a trunk, unknown train inputs, a bad
    feature width: each rejected by name — by the loader and by the edge agent's Bundle."""
    from edge_agent.trainer import Bundle

    m = mf.load(bundle[1], verify=False)
    raw = mf.load(raw_bundle[1], verify=False)
    cases = [
        (m, lambda x: x["models"].update(trunk=None), r"models.trunk: missing: train_inputs are the trunk's features"),
        (m, lambda x: x["models"].update(head=None), r"models.head: missing"),
        (m, lambda x: x["models"].update(trunk="nope.onnx"), r"models.trunk: 'nope.onnx' is not listed in files"),
        (m, lambda x: x["inputs"].pop("features"), r"inputs.features: missing"),
        (m, lambda x: x["inputs"]["features"].update(shape=["batch"]), r"inputs.features.shape"),
        (m, lambda x: x["inputs"]["features"].update(dtype="int64"), r"inputs.features.dtype"),
        (m, lambda x: x.update(train_inputs=["features"]), r"train_inputs: \['features'\] is neither"),
        (m, lambda x: x.pop("train_inputs"), r"train_inputs: missing"),
        (m, lambda x: x["portable"].update(inputs=raw["portable"]["inputs"]), r"portable.inputs: .*not train_inputs"),
        (raw, lambda x: x["models"].update(trunk="inference.onnx"), r"models.trunk: 'inference.onnx' given, but train_inputs are the raw"),
    ]
    for i, (base, edit, msg) in enumerate(cases):
        bad = json.loads(json.dumps(base))
        edit(bad)
        with pytest.raises(mf.ManifestError, match=msg):
            mf.validate(bad)
        d = tmp_path / f"b{i}"
        d.mkdir()
        (d / mf.FILE).write_text(json.dumps(bad))
        with pytest.raises(mf.ManifestError, match=msg):
            Bundle(d, verify=False)
    # A version-1 manifest (before train_inputs) is still read, as raw-input train graphs.
    old = json.loads(json.dumps(raw))
    old["manifest_version"] = 1
    for key in ("train_inputs",):
        old.pop(key)
    for role in ("trunk", "head"):
        old["models"].pop(role)
    assert mf.train_inputs(mf.validate(old)) == ("item", "hist", "profile", "label")


def test_contract_check_catches_train_graphs_on_the_wrong_inputs(bundle, raw_bundle, tmp_path):
    """The manifest says the train graphs take features, the ORT artifacts take raw inputs (or a
    feature width the trunk does not produce): the check names the file."""
    d = _copy(bundle[1], tmp_path / "a")
    for name in artifacts.TRAINING_FILES:
        shutil.copy(raw_bundle[1] / name, d / name)
    _rewrite_manifest(d, lambda m: m["files"].update(mf.file_entries(d, list(artifacts.TRAINING_FILES))))
    with pytest.raises(ContractError, match=r"training_model.onnx takes inputs \['hist', 'item', 'label', 'profile'\], "
                                            r"manifest train_inputs says \('features', 'label'\)"):
        check_bundle(d)
    d = _copy(bundle[1], tmp_path / "b")
    _rewrite_manifest(d, lambda m: m["inputs"]["features"].update(shape=["batch", F + 1]))
    with pytest.raises(ContractError, match=rf"train_step.onnx input 'features' has shape \['batch', {F}\], "
                                            rf"manifest says \['batch', {F + 1}\]"):
        check_bundle(d)


def test_contract_check_names_the_parameter(bundle, tmp_path):
    model, src = bundle
    # The manifest promises another shape for φ.
    d = _copy(src, tmp_path / "a")
    _rewrite_manifest(d, lambda m: m["trainable"]["metapatch_phi"].update(shape=[1, 16]))
    with pytest.raises(ContractError, match=rf"'metapatch_phi' has shape \[1, {PHI}\] in checkpoint, manifest says \[1, 16\]"):
        check_bundle(d)
    # The manifest names a parameter the artifacts do not train.
    d = _copy(src, tmp_path / "b")
    _rewrite_manifest(d, lambda m: m.update(trainable={"metapatch_psi": m["trainable"]["metapatch_phi"]}))
    with pytest.raises(ContractError, match="trainable parameter 'metapatch_psi' is not trainable"):
        check_bundle(d)
    # The artifacts train more than φ.
    d = _copy(src, tmp_path / "c")
    artifacts.generate(model, d, DEVICE_CFG, requires_grad=["metapatch_phi", "base.mlp.0.shared_theta"])
    names = list(artifacts.TRAINING_FILES)
    _rewrite_manifest(d, lambda m: m["files"].update(mf.file_entries(d, names)))
    with pytest.raises(ContractError, match="parameter 'base.mlp.0.shared_theta' is trainable in checkpoint but not in the manifest"):
        check_bundle(d)


def test_self_check_catches_a_wrong_reference(bundle, tmp_path):
    d = _copy(bundle[1], tmp_path)
    _rewrite_manifest(d, lambda m: m["reference"].update(phi_after=(np.asarray(m["reference"]["phi_after"]) + 1e-3).tolist()))
    with pytest.raises(ContractError, match=r"self-check \(ort-training\): phi differs from the reference"):
        check_bundle(d)


# -- CLI -----------------------------------------------------------------------------------------

def test_cli_export(tmp_path, capsys):
    model = ml100k_model(seed=1)
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", model, None, step=42, round=2)
    out = tmp_path / "bundle"
    assert dccl_main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--lr", "0.02"]) == 0
    m = mf.load(out)
    assert m["bundle_version"].startswith("r2-s42-") and m["optimizer"]["lr"] == 0.02
    assert m["source"]["step"] == 42 and len(m["source"]["checkpoint_sha256"]) == 64
    assert "contract check passed" in capsys.readouterr().out
    assert "local_data" not in m          # the checkpoint does not say how the cloud built samples
    # A checkpoint from `dccl cloud train` records its config: the bundle carries its sample rules.
    ckpt2 = save_checkpoint(tmp_path / "ckpt2.pt", model, None, step=43, round=2,
                            extra={"config": {"data": {"neg": 6, "val_frac": 0.25}, "device": {"steps": 3}}})
    # --since: where the devices' fresh window starts (ISO 8601 or unix seconds).
    assert dccl_main(["export", "--checkpoint", str(ckpt2), "--out", str(tmp_path / "b1"),
                      "--since", "2026-12-01T00:00:00Z"]) == 0
    m2 = mf.load(tmp_path / "b1")
    assert m2["local_data"] == {"neg": 6, "val_frac": 0.25, "since": 1796083200.0} and m2["optimizer"]["steps"] == 3
    capsys.readouterr()
    for since, msg in (("yesterday", "expected unix seconds or an ISO 8601 time"),
                       ("2026-12-01T00:00:00", "give a UTC offset or Z"), ("nan", "must be a finite time"),
                       ("5", "does not record how the cloud built its samples")):
        assert dccl_main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b4"), "--since", since]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0] and "--since" in err[0], err
    assert not (tmp_path / "b4").exists()
    # Refuses to overwrite, one clear line, exit 2.
    assert dccl_main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists and is not empty" in err[0]
    assert dccl_main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "b2")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert dccl_main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b3"), "--lr", "-1"]) == 2
    assert "device.lr" in capsys.readouterr().err
    assert not (tmp_path / "b3").exists()


def test_a_device_runs_the_start_policy_and_names_it(bundle, tmp_path):
    """A bundle whose encoder.onnx carries a start policy (previous φ for devices that have one, zero
    for cold start): the device's Encoder computes exactly that and reports it as φ's source."""
    from cloud_trainer.models.encoder import EncoderConfig, PatchEncoder
    from edge_agent.trainer import Bundle, Encoder
    from onnx_export import encoder as enc_export

    model, src = bundle
    d = _copy(src, tmp_path)
    c = model.base.config
    torch.manual_seed(4)
    enc = PatchEncoder(EncoderConfig(n_items=c.n_items, phi_dim=model.phi_dim, profile_vocab=list(c.profile_vocab),
                                     start_warm="previous", start_cold="zero"))
    with torch.no_grad():
        enc.mlp[2].weight.normal_(0, 0.1)
    enc_export.export(enc, c.max_len, d / enc_export.FILE)

    def edit(m):
        m["files"].update(mf.file_entries(d, [enc_export.FILE]))
        m["source"]["start_phi"] = {"warm": "previous", "cold": "zero"}

    _rewrite_manifest(d, edit)
    b = example_batch(model, 1, seed=5)
    device = Encoder(Bundle(d))
    cold = device.start_phi(b["profile"][0], b["hist"][0])
    assert not cold.any() and device.source(None) == "start policy: zero"
    prev = np.random.default_rng(1).standard_normal(cold.shape).astype(np.float32)
    np.testing.assert_array_equal(device.start_phi(b["profile"][0], b["hist"][0], prev), prev)
    assert device.source(prev) == "start policy: previous"
    # The default policy: g's φ, named "encoder".
    default = Encoder(Bundle(src))
    assert default.source(None) == default.source(prev) == "encoder"
    assert default.start_phi(b["profile"][0], b["hist"][0], prev).any()
