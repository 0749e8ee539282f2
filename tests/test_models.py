"""DIN + MetaPatch + encoder + device reference + MoMoDistill, on tiny models."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from cloud_trainer.checkpoint import build_model, load_checkpoint, save_checkpoint
from cloud_trainer.models.din import DINConfig
from cloud_trainer.models.encoder import EncoderConfig, PatchEncoder
from cloud_trainer.models.metapatch import MetaPatchConfig
from cloud_trainer.momodistill import MoMoDistillConfig, device_logits, step1, step2
from cloud_trainer.patch_generator import MetaTrainConfig, meta_train
from cloud_trainer.personalize import DeviceTrainConfig, personalize_all, train_phi
from dccl.errors import DcclError

N_ITEMS, L = 50, 6


def tiny(mp: MetaPatchConfig | None = None, seed: int = 0):
    torch.manual_seed(seed)
    attrs = torch.randint(0, 7, (N_ITEMS + 1, 2))
    attrs[0] = 0
    cfg = DINConfig(n_items=N_ITEMS, n_attrs=7, profile_vocab=[4, 3], max_len=L, emb_dim=8, attn_hidden=8,
                    mlp_hidden=(16, 8))
    return build_model(cfg, mp or MetaPatchConfig(phi_dim=6, bottleneck=2, theta_init_std=0.3), attrs)


def batch(n: int, n_owners: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    owner = torch.randint(0, n_owners, (n,), generator=g)
    item = torch.randint(1, N_ITEMS + 1, (n,), generator=g)
    # A learnable per-owner signal: owner o likes items with (item + o) % 3 == 0.
    label = (((item + owner) % 3) == 0).float()
    return {"owner": owner, "item": item, "hist": torch.randint(0, N_ITEMS + 1, (n, L), generator=g),
            "profile": torch.randint(0, 3, (n, 2), generator=g), "label": label}


@pytest.mark.parametrize("targets", [("mlp.0", "mlp.2"), ("attention.key", "mlp.0"), ("mlp.2",)])
@pytest.mark.parametrize("full", [False, True])
def test_batched_and_single_device_paths_agree_and_zero_phi_is_identity(targets, full):
    m = tiny(MetaPatchConfig(target_modules=targets, phi_dim=6, bottleneck=2, full=full, theta_init_std=0.3))
    b = batch(40)
    phi = torch.randn(1, m.phi_dim)
    one = m(b["item"], b["hist"], b["profile"], phi=phi)
    many = m(b["item"], b["hist"], b["profile"], phi=phi.expand(40, -1).contiguous())
    assert torch.allclose(one, many, atol=1e-5)
    assert not torch.allclose(one, m.forward_unpatched(b["item"], b["hist"], b["profile"]), atol=1e-4)
    assert torch.equal(m(b["item"], b["hist"], b["profile"]), m.forward_unpatched(b["item"], b["hist"], b["profile"]))


@pytest.mark.parametrize("targets,cacheable", [(("mlp.0", "mlp.2"), True), (("mlp.2",), True),
                                               (("attention.key", "mlp.0"), False), (("attention.key",), False)])
@pytest.mark.parametrize("full", [False, True])
def test_trunk_head_split(targets, cacheable, full):
    """head(features(x), φ) is the patched model, and the trunk features do not move with φ, exactly
    when every patch sits in the MLP; otherwise features() refuses (it would need φ)."""
    from cloud_trainer.models.metapatch import features_cacheable

    cfg = MetaPatchConfig(target_modules=targets, phi_dim=6, bottleneck=2, full=full, theta_init_std=0.3)
    assert features_cacheable(cfg) is cacheable
    m = tiny(cfg)
    assert m.cacheable is cacheable
    b = batch(40)
    x = m.base.features(b["item"], b["hist"], b["profile"])
    assert x.shape == (40, m.base.feature_dim)
    assert torch.equal(m.base.head(x), m.forward_unpatched(b["item"], b["hist"], b["profile"]))
    phi = torch.randn(1, m.phi_dim)
    patched = m(b["item"], b["hist"], b["profile"], phi=phi)
    if cacheable:
        feats = m.features(b["item"], b["hist"], b["profile"])
        # The cache holds the first patched layer's base output (what its patch reads), not x.
        i = min(int(t.split(".")[1]) for t in targets)
        first = m.base.mlp[i]
        assert torch.equal(feats, first.base_layer(m.base.mlp[:i](x)))
        assert feats.shape == (40, m.feature_dim) == (40, first.base_layer.out_features)
        assert torch.equal(feats, m.features(b["item"], b["hist"], b["profile"]))
        assert torch.allclose(m.head(feats, phi), patched, atol=1e-6)
        many = phi.expand(40, -1).contiguous()
        assert torch.allclose(m.head(feats, many), m(b["item"], b["hist"], b["profile"], phi=many), atol=1e-6)
    else:
        with pytest.raises(ValueError, match="outside the head"):
            m.features(b["item"], b["hist"], b["profile"])
        # The unpatched trunk is not what the patched model computes (why this config cannot cache).
        assert (m.head(x, phi) - patched).abs().max() > 1e-5


def test_trainable_parameters_are_found_structurally():
    m = tiny()
    assert list(m.device_trainable()) == ["metapatch_phi"]
    assert sorted(m.shared_parameters()) == ["base.mlp.0.shared_theta", "base.mlp.2.shared_theta"]
    names = set(m.cloud_parameters()) | set(m.shared_parameters()) | set(m.device_trainable())
    assert names == {n for n, _ in m.named_parameters()}
    m.mark_only_phi_trainable()
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["metapatch_phi"]
    with pytest.raises(ValueError, match="not a Linear"):
        tiny(MetaPatchConfig(target_modules=("attention",)))


def test_device_training_changes_only_phi_and_loss_goes_down():
    m = tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    b = batch(200)
    phi, losses = train_phi(m, torch.zeros(1, 6), [b] * 30, DeviceTrainConfig(lr=0.1))
    assert losses[-1] < losses[0] - 0.02
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # φ was a copy
    assert not torch.equal(phi, torch.zeros(1, 6))


def test_personalize_all_equals_independent_device_runs():
    m = tiny()
    b = batch(300, n_owners=4, seed=3)
    cfg = DeviceTrainConfig(steps=7, lr=0.05, keep_if_worse=False)
    phi0 = torch.randn(4, 6) * 0.1
    table, _ = personalize_all(m, phi0, b, None, cfg)
    for u in range(4):
        mine = {k: v[b["owner"] == u] for k, v in b.items()}
        ref, _ = train_phi(m, phi0[u : u + 1], [mine] * 7, cfg)
        assert torch.allclose(table[u : u + 1], ref, atol=1e-5), u


def test_a_budget_by_training_positives_gives_each_device_its_own_steps():
    """With steps_by_positives each device trains the budget of its bracket of training positives —
    what it would have trained with that budget for everyone (`dccl.protocol.manifest.step_budget`
    is the rule a board's agent applies), to float rounding: only the devices within their budget
    compute a loss, and a smaller batch rounds its products differently — and a bracket's budget of
    0 keeps its start exactly."""
    m = tiny()
    b = batch(300, n_owners=4, seed=3)
    pos = torch.zeros(4, dtype=torch.int64).index_add(0, b["owner"], (b["label"] > 0).long())
    order = pos.argsort()
    # brackets so that the two devices with the fewest positives get 9 and 0 steps, the others 3
    lo, mid, hi = int(pos[order[0]]), int(pos[order[1]]), int(pos[order[2]])
    assert lo < mid < hi
    table = [[0, 9], [mid, 0], [hi, 3]]
    cfg = DeviceTrainConfig(steps=5, lr=0.05, keep_if_worse=False, steps_by_positives=table)
    phi0 = torch.randn(4, 6) * 0.1
    got, _ = personalize_all(m, phi0, b, None, cfg)
    want = {int(order[0]): 9, int(order[1]): 0, int(order[2]): 3, int(order[3]): 3}
    for u, steps in want.items():
        alone, _ = personalize_all(m, phi0, b, None, replace(cfg, steps=steps, steps_by_positives=None))
        torch.testing.assert_close(got[u], alone[u], rtol=1e-5, atol=1e-6, msg=lambda e: f"{(u, steps)}: {e}")
    assert torch.equal(got[order[1]], phi0[order[1]])
    with pytest.raises(ValueError, match=r"device.steps_by_positives\[1\]"):
        DeviceTrainConfig(steps_by_positives=[[0, 2], [0, 3]])


def test_keep_if_worse_restores_the_starting_phi_per_device():
    m = tiny()
    train = batch(200, n_owners=2, seed=1)
    val = batch(100, n_owners=2, seed=2)
    val["label"][val["owner"] == 1] = 1.0 - val["label"][val["owner"] == 1]  # device 1's val contradicts its training
    cfg = DeviceTrainConfig(steps=40, lr=0.1, keep_if_worse=True)
    phi, info = personalize_all(m, torch.zeros(2, 6), train, val, cfg)
    assert torch.equal(phi[1], torch.zeros(6)) and not torch.equal(phi[0], torch.zeros(6))
    assert info["kept_previous"] == 1


def test_a_diverged_device_keeps_its_starting_phi():
    """As the edge trainer does: a φ that went non-finite is never kept, whatever the validation rules."""
    m = tiny()
    train = batch(200, n_owners=3, seed=1)
    phi0 = torch.randn(3, 6) * 0.1
    cfg = DeviceTrainConfig(steps=6, lr=1e30, keep_if_worse=False, require_val=False)
    phi, info = personalize_all(m, phi0, train, None, cfg)
    assert info["diverged"] == 3 and torch.equal(phi, phi0)
    sane, info = personalize_all(m, phi0, train, None, replace(cfg, lr=0.1))
    assert "diverged" not in info and not torch.equal(sane, phi0)


def test_a_device_without_validation_rows_keeps_its_starting_phi():
    m = tiny()
    train = batch(200, n_owners=3, seed=1)
    val = batch(100, n_owners=2, seed=2)          # owners 0 and 1 only: device 2 has no validation slice
    phi0 = torch.randn(3, 6) * 0.1
    strict, info = personalize_all(m, phi0, train, val, DeviceTrainConfig(steps=10, lr=0.1, keep_if_worse=False))
    assert torch.equal(strict[2], phi0[2]) and not torch.equal(strict[0], phi0[0]) and info["no_val"] == 1
    blind, _ = personalize_all(m, phi0, train, val,
                               DeviceTrainConfig(steps=10, lr=0.1, keep_if_worse=False, require_val=False))
    assert not torch.equal(blind[2], phi0[2]) and torch.equal(blind[0], strict[0])


def test_patch_state_round_trip_and_checkpoint(tmp_path):
    m = tiny()
    with torch.no_grad():
        m.metapatch_phi.copy_(torch.randn(1, 6))
    state = m.patch_state_dict()
    assert list(state) == ["metapatch_phi"]
    other = tiny(seed=1)
    other.load_patch_state_dict(state)
    assert torch.equal(other.metapatch_phi, m.metapatch_phi)
    with pytest.raises(ValueError, match="shape"):
        other.load_patch_state_dict({"metapatch_phi": torch.zeros(1, 5)})
    enc = PatchEncoder(EncoderConfig(n_items=N_ITEMS, phi_dim=6, profile_vocab=[4, 3], emb_dim=4, start_cold="zero"))
    path = save_checkpoint(tmp_path / "ckpt.pt", m, enc, step=12, round=1, extra={"dataset": "tiny"})
    m2, enc2, meta = load_checkpoint(path)
    assert meta["step"] == 12 and meta["round"] == 1 and meta["versions"]["torch"] == torch.__version__
    b = batch(20)
    assert torch.equal(m2(b["item"], b["hist"], b["profile"]), m(b["item"], b["hist"], b["profile"]))
    assert all(torch.equal(a, c) for a, c in zip(enc.state_dict().values(), enc2.state_dict().values()))
    assert enc2.config.start_cold == "zero"  # the start policy travels with the encoder
    with pytest.raises(ValueError, match="encoder.start_warm = 'bogus'"):
        EncoderConfig(n_items=N_ITEMS, phi_dim=6, start_warm="bogus")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DcclError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.parametrize("episodes", ["sampled", "device"])
def test_meta_training_gives_phi_leverage(episodes):
    """After meta-training, a few device steps on φ lower a device's query loss more than with the
    initial Θ — the property the reference run was missing — with either kind of episode."""
    m = tiny(MetaPatchConfig(phi_dim=6, bottleneck=2, theta_init_std=0.02))
    enc = PatchEncoder(EncoderConfig(n_items=N_ITEMS, phi_dim=6, profile_vocab=[4, 3], emb_dim=4))
    sup, qry = batch(1200, n_owners=3, seed=4), batch(600, n_owners=3, seed=5)
    prof, seq = torch.randint(0, 3, (3, 2)), torch.randint(0, N_ITEMS + 1, (3, L))
    dev = DeviceTrainConfig(steps=5, lr=0.1, keep_if_worse=False)

    def adaptation_gain():
        """Query loss at φ = 0 minus query loss after the device's steps on the support data."""
        from cloud_trainer.personalize import per_owner_loss
        phi, _ = personalize_all(m, torch.zeros(3, 6), sup, None, dev)
        with torch.no_grad():
            return float(per_owner_loss(m, qry, torch.zeros(3, 6), 3).mean() - per_owner_loss(m, qry, phi, 3).mean())

    before = adaptation_gain()
    theta0 = {k: v.clone() for k, v in m.cloud_parameters().items()}
    hist = meta_train(m, enc, sup, qry, prof, seq, MetaTrainConfig(epochs=60, user_batch=3, inner_steps=5, inner_lr=0.1,
                                                                   outer_lr=0.03, max_samples_per_user=400,
                                                                   episodes=episodes),
                      support_positives=np.array([0, 60, 100]))
    assert hist[-1] < hist[0]
    assert abs(before) < 0.005  # an untrained, small Θ: φ is inert
    assert adaptation_gain() > before + 0.01
    assert all(torch.equal(theta0[k], v) for k, v in m.cloud_parameters().items())  # W_f frozen


def test_device_episodes_adapt_on_each_users_newest_positives_and_their_negatives():
    """episodes="device": a user's support is the newest k positives of its older history, each with
    the negatives that follow it, k drawn from the devices' fresh-window counts (capped by what the
    user has); the rows outside it are never read."""
    from cloud_trainer.patch_generator import _by_owner, _newest
    owner = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    label = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0.0])
    groups = _by_owner({"owner": owner}, 3)
    is_pos = label.numpy() > 0
    rng = np.random.default_rng(0)
    rows = _newest(groups, is_pos, np.array([0, 1, 2]), np.array([2]), rng)
    assert rows.tolist() == [2, 3, 4, 5, 6, 7, 8]  # user 0: its last 2 positives; user 1 holds 1; user 2 none
    seen = set()
    for _ in range(50):
        seen.add(tuple(_newest(groups, is_pos, np.array([0]), np.array([1, 3]), rng).tolist()))
    assert seen == {(4, 5), (0, 1, 2, 3, 4, 5)}  # both drawn sizes occur
    with pytest.raises(ValueError, match="positive counts"):
        m = tiny(MetaPatchConfig(phi_dim=6, bottleneck=2))
        enc = PatchEncoder(EncoderConfig(n_items=N_ITEMS, phi_dim=6, profile_vocab=[4, 3], emb_dim=4))
        b = batch(30, n_owners=3)
        meta_train(m, enc, b, b, torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, L, dtype=torch.long),
                   MetaTrainConfig(epochs=1, episodes="device"), support_positives=np.zeros(3))


def test_momodistill_steps_touch_the_right_parameters():
    m = tiny()
    enc = PatchEncoder(EncoderConfig(n_items=N_ITEMS, phi_dim=6, profile_vocab=[4, 3], emb_dim=4))
    data = batch(256, n_owners=3, seed=6)
    phi = torch.randn(3, 6)
    teacher = device_logits(m, data, phi)
    assert teacher.shape == (256,)
    theta0 = {k: v.clone() for k, v in m.shared_parameters().items()}
    wf0 = {k: v.clone() for k, v in m.cloud_parameters().items()}
    h1, t1 = step1(m, data, phi, MoMoDistillConfig(step1_epochs=3, lam=0.5, batch_size=64), N_ITEMS)
    assert torch.equal(t1, teacher)  # the teachers are the device models before W_f moves
    assert all(torch.equal(theta0[k], v) for k, v in m.shared_parameters().items())
    assert any(not torch.equal(wf0[k], v) for k, v in m.cloud_parameters().items())
    assert h1[-1] < h1[0]
    wf1 = {k: v.clone() for k, v in m.cloud_parameters().items()}
    enc0 = [p.clone() for p in enc.parameters()]
    h2 = step2(m, enc, data, teacher, phi, torch.randint(0, 3, (3, 2)), torch.randint(0, N_ITEMS + 1, (3, L)),
               MoMoDistillConfig(step2_epochs=3, batch_size=64))
    assert all(torch.equal(wf1[k], v) for k, v in m.cloud_parameters().items())
    assert any(not torch.equal(theta0[k], v) for k, v in m.shared_parameters().items())
    assert any(not torch.equal(a, b) for a, b in zip(enc0, enc.parameters()))
    assert np.isfinite(h2).all()


def test_step1_candidates_are_the_positives_rows_with_fresh_items_per_epoch():
    from cloud_trainer.momodistill import candidates

    data = batch(200, n_owners=3, seed=8)
    pos = torch.nonzero(data["label"] > 0.5).squeeze(1)
    extra = candidates(data, N_ITEMS, 4, seed=1)
    P = len(pos)
    assert len(extra["item"]) == 4 * P and torch.all(extra["label"] == 0)
    for j in range(4):  # row j * P + i: the i-th positive's j-th candidate (same owner, history, profile)
        block = slice(j * P, (j + 1) * P)
        for k in ("owner", "hist", "profile"):
            assert torch.equal(extra[k][block], data[k][pos])
    assert extra["item"].min() >= 1 and extra["item"].max() <= N_ITEMS
    # Each epoch trains on its own block: the two halves (2 epochs x 2 per positive) draw different items.
    assert not torch.equal(extra["item"][: 2 * P], extra["item"][2 * P:])
    m = tiny()
    h, _ = step1(m, data, torch.randn(3, 6), MoMoDistillConfig(step1_epochs=2, kd_extra=2, batch_size=32), N_ITEMS)
    assert len(h) == 2 and all(np.isfinite(h))
    with pytest.raises(ValueError, match="kd_extra"):
        MoMoDistillConfig(kd_extra=-1)


def test_kd_balance_gives_every_device_model_the_same_weight():
    """kd_balance 1: each device's rows share one device's worth of the distillation term, however many
    rows it holds; 0 (the default) leaves step 1 as it was (every row alike)."""
    from cloud_trainer.train import device_balance

    owner = torch.tensor([0] * 6 + [1] * 3 + [2])
    w = device_balance(owner, 1.0)
    assert torch.isclose(w.mean(), torch.tensor(1.0))
    per_device = torch.zeros(3).index_add(0, owner, w)
    assert torch.allclose(per_device, per_device[0].expand(3))
    half = torch.zeros(3).index_add(0, owner, device_balance(owner, 0.5))
    assert per_device[0] < half[0] < torch.tensor(6.0) and half[2] < per_device[2]   # between the two extremes
    assert torch.allclose(device_balance(owner, 0.0), torch.ones(10))

    data = batch(200, n_owners=3, seed=8)
    phi = torch.randn(3, 6)
    runs = {}
    for bal in (0.0, 1.0):
        m = tiny()
        runs[bal] = step1(m, data, phi, MoMoDistillConfig(step1_epochs=2, kd_balance=bal, batch_size=32), N_ITEMS)[0]
        assert all(np.isfinite(runs[bal]))
    assert runs[0.0] != runs[1.0], "the weights reach the loss"
    with pytest.raises(ValueError, match="kd_balance = 1.5"):
        MoMoDistillConfig(kd_balance=1.5)


def test_step2_balance_weighs_every_device_alike():
    """step2_balance 1: step 2's loss is the mean over devices of each device's mean row loss (a tail
    device counts as much as an active one); 0 (the default) the mean over rows, as before."""
    from cloud_trainer.train import device_balance

    data = batch(120, n_owners=3, seed=5)
    data["owner"] = torch.tensor([0] * 90 + [1] * 25 + [2] * 5)
    phi = torch.randn(3, 6)
    enc_cfg = EncoderConfig(n_items=N_ITEMS, profile_vocab=[4, 3], phi_dim=6, emb_dim=8, profile_dim=4, hidden=8)
    first = {}
    for bal in (0.0, 1.0):
        m = tiny()
        torch.manual_seed(0)
        enc = PatchEncoder(enc_cfg)
        teacher = device_logits(m, data, phi)
        profile, seq = torch.randint(0, 3, (3, 2)), torch.randint(0, N_ITEMS + 1, (3, L))
        cfg = MoMoDistillConfig(step2_epochs=1, step2_lr=0.0, step2_balance=bal, batch_size=1000)
        first[bal] = step2(m, enc, data, teacher, phi, profile, seq, cfg)[0]
        with torch.no_grad():
            out = m(data["item"], data["hist"], data["profile"], phi=enc(profile[data["owner"]], seq[data["owner"]],
                                                                      phi[data["owner"]]))
            rows = (torch.nn.functional.binary_cross_entropy_with_logits(out, torch.sigmoid(teacher), reduction="none")
                    + cfg.label_weight * torch.nn.functional.binary_cross_entropy_with_logits(
                        out, data["label"], reduction="none"))
        per_device = torch.stack([rows[data["owner"] == d].mean() for d in range(3)])
        want = per_device.mean() if bal == 1.0 else rows.mean()
        assert first[bal] == pytest.approx(float(want), rel=1e-5)
    assert first[0.0] != pytest.approx(first[1.0])
    with pytest.raises(ValueError, match="step2_balance = 1.5"):
        MoMoDistillConfig(step2_balance=1.5)


def test_update_balance_weighs_every_devices_fresh_data_alike_in_both_cloud_updates():
    """cloud.update_balance 1: the label term of model-over-data's update (`fit_cloud`) and of
    MoMoDistill step 1 (with or without unlabelled candidates) is the mean over devices of each
    device's mean row loss; 0 the mean over rows, as before. Checked on the first epoch's loss with a
    zero learning rate (one batch holds every row)."""
    from cloud_trainer.train import _unpatched, fit_cloud

    data = batch(120, n_owners=3, seed=5)
    data["owner"] = torch.tensor([0] * 90 + [1] * 25 + [2] * 5)
    m = tiny()
    with torch.no_grad():
        rows = torch.nn.functional.binary_cross_entropy_with_logits(_unpatched(m, data), data["label"], reduction="none")
    want = {0.0: float(rows.mean()), 1.0: float(torch.stack([rows[data["owner"] == d].mean() for d in range(3)]).mean())}
    assert want[0.0] != pytest.approx(want[1.0])
    for bal in (0.0, 1.0):
        got = fit_cloud(m, data, list(m.cloud_parameters().values()), 1, 0.0, batch_size=1000, balance=bal)[0]
        assert got == pytest.approx(want[bal], rel=1e-5)
        for kd in (0, 1):
            cfg = MoMoDistillConfig(step1_epochs=1, step1_lr=0.0, lam=0.0, kd_extra=kd, batch_size=1000)
            got = step1(m, data, torch.randn(3, 6), cfg, N_ITEMS, label_balance=bal)[0][0]
            assert got == pytest.approx(want[bal], rel=1e-5), (bal, kd)


def test_encoder_from_cloud_starts_meta_training_from_the_cloud_models_embeddings():
    from cloud_trainer.patch_generator import init_encoder_from_cloud

    m = tiny()
    enc = PatchEncoder(EncoderConfig(n_items=N_ITEMS, profile_vocab=[4, 3], phi_dim=6, emb_dim=8, profile_dim=4,
                                     hidden=8))
    base = m.base
    copied = init_encoder_from_cloud(enc, m)
    assert "item_emb.weight" in copied and torch.equal(enc.item_emb.weight, base.item_emb.weight)
    for j, emb in enumerate(base.profile_emb):
        if emb.weight.shape == enc.profile_emb[j].weight.shape:
            assert f"profile_emb.{j}.weight" in copied and torch.equal(enc.profile_emb[j].weight, emb.weight)
    other = PatchEncoder(EncoderConfig(n_items=N_ITEMS, profile_vocab=[4, 3], phi_dim=6, emb_dim=5, profile_dim=4,
                                       hidden=8))
    before = other.item_emb.weight.clone()
    assert "item_emb.weight" not in init_encoder_from_cloud(other, m)  # another width: left as it was
    assert torch.equal(other.item_emb.weight, before)


def test_step2_delta_target_is_the_new_cloud_model_plus_the_devices_shift():
    """step2_target "delta": step 2 distils f(x; W_f) + (f_n(x) − f(x; W_f⁻)) — what each device added
    to the cloud model it trained on, moved onto the cloud model step 1 produced. A device that added
    nothing (f_n = the old cloud model) then teaches the new cloud model itself, not the old one."""
    from cloud_trainer.train import logits

    data = batch(120, n_owners=3, seed=5)
    phi = torch.randn(3, 6)
    enc_cfg = EncoderConfig(n_items=N_ITEMS, profile_vocab=[4, 3], phi_dim=6, emb_dim=8, profile_dim=4, hidden=8)
    profile, seq = torch.randint(0, 3, (3, 2)), torch.randint(0, N_ITEMS + 1, (3, L))
    m = tiny()
    before = logits(m, data)
    teacher = device_logits(m, data, phi)
    step1(m, data, phi, MoMoDistillConfig(step1_epochs=2, lam=0.0, batch_size=32), N_ITEMS)
    after = logits(m, data)
    assert not torch.allclose(before, after)  # step 1 moved W_f
    torch.manual_seed(0)
    enc = PatchEncoder(enc_cfg)
    cfg = MoMoDistillConfig(step2_epochs=1, step2_lr=0.0, step2_target="delta", batch_size=1000)
    losses = []
    for t, target in ((teacher, teacher - before + after), (before, after)):
        losses.append(step2(m, enc, data, t, phi, profile, seq, cfg, before=before)[0])
        with torch.no_grad():
            out = m(data["item"], data["hist"], data["profile"],
                    phi=enc(profile[data["owner"]], seq[data["owner"]], phi[data["owner"]]))
            want = (torch.nn.functional.binary_cross_entropy_with_logits(out, torch.sigmoid(target))
                    + cfg.label_weight * torch.nn.functional.binary_cross_entropy_with_logits(out, data["label"]))
        assert losses[-1] == pytest.approx(float(want), rel=1e-5)
    device_loss = step2(m, enc, data, teacher, phi, profile, seq, replace(cfg, step2_target="device"))[0]
    assert device_loss != pytest.approx(losses[0])
    with pytest.raises(ValueError, match="before"):
        step2(m, enc, data, teacher, phi, profile, seq, cfg)
    with pytest.raises(ValueError, match="step2_target = 'x'"):
        MoMoDistillConfig(step2_target="x")
