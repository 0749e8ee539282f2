"""Data layer: loaders, synthetic generator, deployment split, samples, eval sets."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cloud_trainer.data import (
    CTRSamples,
    RecDataset,
    build_ctr_samples,
    build_eval_set,
    iterate_batches,
    load_dataset,
    make_split,
    make_synthetic,
    user_rows,
)
from dccl.errors import DcclError

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ml100k(shared_datasets):
    path = shared_datasets / "ml-100k"
    if not (path / "u.data").is_file():
        pytest.skip(f"ML-100K not found at {path}")
    return load_dataset("ml-100k", path)


@pytest.fixture(scope="module")
def amazon(shared_datasets):
    path = shared_datasets / "amazon-beauty"
    if not (path / "Beauty.txt").is_file():
        pytest.skip(f"Amazon Beauty not found at {path}")
    return load_dataset("amazon", path)


@pytest.fixture(scope="module")
def synth():
    return make_synthetic(n_users=200, n_items=300, seed=1)


def write_ml1m(root, ratings: list[str]):
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratings.dat").write_text("\n".join(ratings) + "\n")
    (root / "users.dat").write_text(
        "10::F::1::10::48067\n20::M::56::16::70072\n30::M::25::0::55117\n")
    (root / "movies.dat").write_bytes(
        "100::Toy Story (1995)::Animation|Children's|Comedy\n"
        "200::Jumanji (1995)::Adventure|Children's|Fantasy\n"
        "300::Amélie (2001)::Comedy|Romance\n"
        "400::Heat (1995)::Action|Crime|Thriller\n".encode("latin-1"))
    return root


# ----------------------------------------------------------------------------- real files


def test_ml100k_counts(ml100k, shared_datasets):
    ds = ml100k
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (943, 1682, 100_000)
    assert not ds.synthetic and ds.name == "ml-100k"
    assert ds.lengths().min() >= 20
    assert ds.profile.shape == (943, 3) and (ds.profile > 0).all()   # every user has a known profile
    assert ds.profile_names == ["age", "gender", "occupation"]
    # Toy Story (item 1) is Animation|Children's|Comedy = genre indices 3, 4, 5 -> ids 4, 5, 6
    assert set(ds.item_attrs[1][ds.item_attrs[1] > 0]) == {4, 5, 6}
    # user 1 (index 0): sequence sorted by timestamp, as in u.data
    rows = np.loadtxt(shared_datasets / "ml-100k" / "u.data", dtype=np.int64)
    u1 = rows[rows[:, 0] == 1]
    order = np.lexsort((np.arange(len(u1)), u1[:, 3]))
    assert (ds.sequences[0] == u1[order, 1]).all()


def test_amazon_counts(amazon):
    ds = amazon
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (22_363, 12_101, 198_502)
    assert ds.profile.shape == (22_363, 0) and ds.profile_vocab == []
    assert ds.lengths().min() >= 5
    assert ds.item_attrs.shape[1] <= 8 and ds.n_attrs == 638
    assert (ds.item_attrs[1:] > 0).any(1).mean() > 0.99


def test_amazon_accepts_txt_path(amazon, shared_datasets):
    ds = load_dataset("amazon", shared_datasets / "amazon-beauty" / "Beauty.txt", max_attrs=2)
    assert ds.n_interactions == amazon.n_interactions and ds.item_attrs.shape[1] == 2
    assert all((a == b).all() for a, b in zip(ds.sequences[:100], amazon.sequences[:100]))


# ----------------------------------------------------------------------------- ML-1M format


def test_ml1m_with_timestamps(tmp_path):
    root = write_ml1m(tmp_path / "ml-1m", [
        "20::300::4::500", "10::200::5::300", "10::100::3::100", "20::100::2::400",
        "10::400::4::200", "30::200::1::50", "10::300::2::200",
    ])
    ds = load_dataset("ml-1m", root)
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (3, 4, 7)
    # raw items 100..400 -> 1..4; user 10 in time order, the tie at t=200 keeps file order (400 then 300)
    assert ds.sequences[0].tolist() == [1, 4, 3, 2]
    assert ds.sequences[1].tolist() == [1, 3]
    assert ds.sequences[2].tolist() == [2]
    # profile: age code 1 -> bucket 1, 56 -> 7; gender F=2, M=1; occupation + 1
    assert ds.profile.tolist() == [[1, 2, 11], [7, 1, 17], [3, 1, 1]]
    genres = sorted({"Animation", "Children's", "Comedy", "Adventure", "Fantasy", "Romance",
                     "Action", "Crime", "Thriller"})
    assert ds.n_attrs == len(genres) + 1
    assert {genres[a - 1] for a in ds.item_attrs[3] if a} == {"Comedy", "Romance"}   # latin-1 title read


def test_ml1m_without_timestamps_keeps_file_order(tmp_path):
    root = write_ml1m(tmp_path / "ml-1m", ["10::300::4", "20::100::2", "10::100::3", "10::200::5"])
    ds = load_dataset("ml-1m", root / "ratings.dat")
    assert ds.sequences[0].tolist() == [3, 1, 2]
    assert ds.sequences[1].tolist() == [1]


def test_dccl_data_env_root(tmp_path, monkeypatch):
    write_ml1m(tmp_path / "ml-1m", ["10::100::4::1", "10::200::4::2"])
    monkeypatch.setenv("DCCL_DATA", str(tmp_path))
    assert load_dataset("ml-1m").n_interactions == 2


# ----------------------------------------------------------------------------- bad input


def test_garbled_line_names_file_and_line(tmp_path):
    root = write_ml1m(tmp_path / "ml-1m", ["10::100::4::1", "10::200::4::2", "10::abc::4::3"])
    with pytest.raises(DcclError, match=r"ratings\.dat:3: field 'item'"):
        load_dataset("ml-1m", root)
    (root / "ratings.dat").write_text("10::100::4::1\n10 200 4 2\n")
    with pytest.raises(DcclError, match=r"ratings\.dat:2"):
        load_dataset("ml-1m", root)


def test_mixed_timestamps_rejected(tmp_path):
    root = write_ml1m(tmp_path / "ml-1m", ["10::100::4::1", "10::200::4"])
    with pytest.raises(DcclError, match=r"ratings\.dat:2: timestamp"):
        load_dataset("ml-1m", root)


def test_unknown_name_lists_valid_names():
    with pytest.raises(DcclError, match="unknown dataset name 'ml-10m'.*synthetic, ml-100k, ml-1m, amazon"):
        load_dataset("ml-10m")


def test_missing_file(tmp_path):
    root = write_ml1m(tmp_path / "ml-1m", ["10::100::4::1"])
    (root / "movies.dat").unlink()
    with pytest.raises(DcclError, match=r"missing file: .*movies\.dat"):
        load_dataset("ml-1m", root)
    with pytest.raises(DcclError, match="does not exist"):
        load_dataset("ml-100k", tmp_path / "nowhere")


def test_empty_file(tmp_path):
    root = write_ml1m(tmp_path / "ml-1m", [""])
    with pytest.raises(DcclError, match=r"ratings\.dat: file is empty"):
        load_dataset("ml-1m", root)


def test_amazon_user_without_items_and_missing_attrs(tmp_path):
    (tmp_path / "Toy.txt").write_text("1 1 2 3\n2\n")
    (tmp_path / "Toy_item2attributes.json").write_text('{"1": [5], "2": [6, 5], "3": []}')
    with pytest.raises(DcclError, match=r"Toy\.txt:2: user 2 has no interactions"):
        load_dataset("amazon", tmp_path)
    (tmp_path / "Toy.txt").write_text("1 1 2 3\n2 3 1\n")
    ds = load_dataset("amazon", tmp_path)
    assert ds.item_attrs.tolist() == [[0, 0], [1, 0], [2, 1], [0, 0]]
    (tmp_path / "Toy_item2attributes.json").unlink()
    with pytest.raises(DcclError, match="item2attributes.json"):
        load_dataset("amazon", tmp_path)


def test_validate_names_the_problem(synth):
    bad = replace(synth, sequences=[*synth.sequences[:-1], np.array([synth.n_items + 1])])
    with pytest.raises(DcclError, match="out of range"):
        bad.validate()
    empty = replace(synth, sequences=[*synth.sequences[:3], np.array([], np.int64), *synth.sequences[4:]])
    with pytest.raises(DcclError, match="user 3 has no interactions"):
        empty.validate()


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_labelled_deterministic_and_long_tailed():
    a, b = make_synthetic(seed=7), make_synthetic(seed=7)
    c = make_synthetic(seed=8)
    assert a.name == "synthetic" and a.synthetic and "SYNTHETIC" in a.summary()
    assert (a.n_users, a.n_items) == (600, 800)
    assert all((x == y).all() for x, y in zip(a.sequences, b.sequences))
    assert (a.profile == b.profile).all() and (a.item_attrs == b.item_attrs).all()
    assert any(len(x) != len(y) or (x != y).any() for x, y in zip(a.sequences, c.sequences))
    a.validate()
    lens = a.lengths()
    assert lens.min() >= 8 and lens.max() > 4 * np.median(lens)          # long-tailed activity
    counts = np.sort(np.bincount(np.concatenate(a.sequences), minlength=a.n_items + 1)[1:])[::-1]
    assert counts[: a.n_items // 10].sum() > 0.3 * counts.sum()          # top 10% items: > 30% of plays
    assert all(len(np.unique(s)) == len(s) for s in a.sequences)


def _cluster_shift(ds: RecDataset) -> float:
    """Mean total-variation distance between a user's early and late category mix."""
    cat = ds.item_attrs[:, 0]
    k = ds.item_attrs[:, 0].max() + 1
    tv = []
    for s in ds.sequences:
        h = len(s) // 2
        e, l = (np.bincount(cat[x], minlength=k) / len(x) for x in (s[:h], s[h:]))
        tv.append(0.5 * np.abs(e - l).sum())
    return float(np.mean(tv))


def test_synthetic_taste_drift_and_sequential_structure():
    drifting, static = make_synthetic(seed=3, drift=1.0), make_synthetic(seed=3, drift=0.0)
    assert _cluster_shift(drifting) > _cluster_shift(static) + 0.05
    # consecutive items share a category far more often than chance
    cat = (drifting.item_attrs[:, 0] - 1) // 3
    same = np.mean([(cat[s][1:] == cat[s][:-1]).mean() for s in drifting.sequences])
    chance = ((np.bincount(cat[1:]) / drifting.n_items) ** 2).sum()
    assert same > 2 * chance


# ----------------------------------------------------------------------------- split


@pytest.mark.parametrize("name", ["synth", "ml100k", "amazon"])
@pytest.mark.parametrize("rounds", [1, 3])
def test_split_invariants(request, name, rounds):
    ds = request.getfixturevalue(name)
    sp = make_split(ds, rounds=rounds, seed=5)
    n = ds.lengths()
    warm = sp.warm
    assert sp.cold.sum() == round(0.1 * ds.n_users)
    prev = None
    for r in range(rounds):
        w = sp.round(r)
        cl, fr, ft, va, fu = w.cloud, w.fresh, w.fresh_train, w.val, w.future
        # warm: contiguous, time-ordered, disjoint: cloud | fresh | future
        assert (cl[warm, 0] == 0).all() and (cl[warm, 1] >= 1).all()
        assert (fr[warm, 0] == cl[warm, 1]).all() and (fr[warm, 1] > fr[warm, 0]).all()
        assert (fu[:, 0] == fr[:, 1])[warm].all() and (fu[:, 1] > fu[:, 0]).all() and (fu[:, 1] <= n).all()
        # fresh = fresh_train + val, val at the end
        assert (ft[:, 0] == fr[:, 0]).all() and (ft[:, 1] == va[:, 0]).all() and (va[:, 1] == fr[:, 1]).all()
        assert (ft[warm, 1] > ft[warm, 0]).all()
        # cold users: no training window at all, but a future window
        for win in (cl, fr, ft, va, w.window("cloud+fresh")):
            assert (win[sp.cold, 1] == win[sp.cold, 0]).all()
        assert (fu[sp.cold, 1] > fu[sp.cold, 0]).all()
        if prev is not None:   # round r cloud = round r-1 cloud + fresh; rounds move forward
            assert (cl == prev.window("cloud+fresh")).all()
            assert (fu[warm, 0] > prev.future[warm, 0]).all()
        # activity group: 0..4, monotone in the number of interactions before the future window
        g = w.group[warm]
        before = fu[warm, 0]
        assert set(np.unique(g)) <= set(range(5))
        o = np.argsort(before, kind="stable")
        assert (np.diff(g[o]) >= 0).all()
        prev = w
    assert (sp.round(rounds - 1).future[:, 1] == n).all()   # the last future window ends the sequence


@pytest.mark.parametrize("name", ["synth", "amazon"])
def test_a_device_keeping_the_round0_bundle_trains_on_every_fresh_window_since_it(request, name):
    """`since_round0(r)`: the local data of a device that still holds round 0's bundle is every fresh
    window so far, [a_0, b_r), and its validation slice the newest part, sized by the rule the agent's
    store applies to the same interactions (`dccl.protocol.manifest.val_len`); round 0's windows are
    round(0)'s."""
    from dccl.protocol.manifest import val_len

    ds = request.getfixturevalue(name)
    sp = make_split(ds, rounds=3, seed=5)
    warm = sp.warm
    w0 = sp.round(0)
    k0 = sp.since_round0(0)
    for win in ("fresh", "fresh_train", "val", "cloud", "future"):
        assert (getattr(k0, win) == getattr(w0, win)).all()
    for r in (1, 2):
        w, k = sp.round(r), sp.since_round0(r)
        assert (k.fresh[:, 0] == w0.fresh[:, 0]).all() and (k.fresh[:, 1] == w.fresh[:, 1]).all()
        assert (k.fresh_train[:, 0] == k.fresh[:, 0]).all() and (k.fresh_train[:, 1] == k.val[:, 0]).all()
        assert (k.val[:, 1] == k.fresh[:, 1]).all()
        n = k.fresh[:, 1] - k.fresh[:, 0]
        assert (n[warm] == (r + 1) * sp.fresh_len[warm]).all() and (n[sp.cold] == 0).all()
        V = k.val[:, 1] - k.val[:, 0]
        assert [int(v) for v in V[warm]] == [val_len(int(f), sp.val_frac) for f in n[warm]]
        assert (V[sp.cold] == 0).all() and (k.cloud == w.cloud).all() and (k.future == w.future).all()
    # Where one round's window holds no validation slice, the windows since the bundle can.
    single = warm & (sp.fresh_len == 1)
    if name == "amazon":
        assert single.sum() > 0
    assert (sp.val_len[single] == 0).all()
    assert ((sp.since_round0(1).val[:, 1] - sp.since_round0(1).val[:, 0])[single] == 1).all()


def test_split_groups_balanced_on_ml100k(ml100k):
    w = make_split(ml100k).round(0)
    sizes = np.bincount(w.group[~w.cold], minlength=5)
    assert sizes.min() > 0.15 * sizes.sum() and sizes.max() < 0.25 * sizes.sum()


def test_split_is_seeded(synth):
    assert (make_split(synth, seed=1).cold == make_split(synth, seed=1).cold).all()
    assert (make_split(synth, seed=1).cold != make_split(synth, seed=2).cold).any()


def test_split_errors(synth):
    short = replace(synth, sequences=[*synth.sequences[:4], synth.sequences[4][:3], *synth.sequences[5:]])
    with pytest.raises(DcclError, match="user 4 has 3 interactions"):
        make_split(short, rounds=2)
    make_split(short, rounds=1)   # 3 = 1 cloud + 1 fresh + 1 future is enough
    with pytest.raises(DcclError, match="no cloud history"):
        make_split(synth, rounds=4, fresh_frac=0.25)
    with pytest.raises(DcclError, match="unknown window"):
        make_split(synth).round(0).window("test")


# ----------------------------------------------------------------------------- samples


@pytest.fixture(scope="module")
def synth_split(synth):
    return make_split(synth, rounds=2, seed=0)


def test_ctr_samples_layout_and_hist(synth, synth_split):
    w = synth_split.round(1)
    s = build_ctr_samples(synth, w, "fresh", neg=3, max_len=6, seed=0)
    win = w.fresh
    n_pos = int((win[:, 1] - win[:, 0]).sum())
    assert len(s) == 4 * n_pos and s.hist.shape == (4 * n_pos, 6)
    assert s.label.dtype == np.float32 and s.item.dtype == np.int64 and s.hist.dtype == np.int64
    assert (s.label.reshape(-1, 4) == [1, 0, 0, 0]).all()
    assert (np.diff(s.user) >= 0).all()
    for r in np.flatnonzero(s.label == 1):
        seq = synth.sequences[s.user[r]]
        p = int(np.flatnonzero(seq == s.item[r])[0])
        assert win[s.user[r], 0] <= p < win[s.user[r], 1]
        want = seq[max(0, p - 6): p]
        assert (s.hist[r, 6 - len(want):] == want).all() and (s.hist[r, : 6 - len(want)] == 0).all()
        assert s.item[r] not in s.hist[r]


def test_negatives_never_interacted_and_reproducible(synth, synth_split):
    w = synth_split.round(0)
    seen = [set(x.tolist()) for x in synth.sequences]
    s1 = build_ctr_samples(synth, w, "cloud", neg=4, seed=11)
    s2 = build_ctr_samples(synth, w, "cloud", neg=4, seed=11)
    s3 = build_ctr_samples(synth, w, "cloud", neg=4, seed=12)
    assert all((getattr(s1, f) == getattr(s2, f)).all() for f in ("user", "item", "hist", "label"))
    assert (s1.item != s3.item).any()
    neg = s1.label == 0
    assert all(i not in seen[u] for u, i in zip(s1.user[neg], s1.item[neg]))
    assert ((s1.item >= 1) & (s1.item <= synth.n_items)).all()


def test_negatives_roughly_uniform_over_unseen_items(synth, synth_split):
    # one user, many draws: every unseen item should turn up, no seen item ever
    w = synth_split.round(0)
    s = build_ctr_samples(synth, w, "cloud+fresh", neg=200, seed=0)
    u = int(np.argmax(synth.lengths()))
    rows = user_rows(s, u)
    negs = rows.item[rows.label == 0]
    unseen = np.setdiff1d(np.arange(1, synth.n_items + 1), synth.sequences[u])
    assert set(negs.tolist()) == set(unseen.tolist())


def test_eval_set(synth, synth_split):
    w = synth_split.round(1)
    e = build_eval_set(synth, w, "future", n_neg=50, max_len=8, seed=4)
    fu = w.future
    assert len(e) == int((fu[:, 1] - fu[:, 0]).sum()) and e.candidates.shape == (len(e), 51)
    assert e.cold.sum() == int((fu[w.cold, 1] - fu[w.cold, 0]).sum())
    assert (e.group == w.group[e.user]).all()
    for r in range(len(e)):
        u, seq = e.user[r], synth.sequences[e.user[r]]
        future = seq[fu[u, 0]: fu[u, 1]]
        assert e.candidates[r, 0] in future
        negs = e.candidates[r, 1:]
        assert len(np.unique(negs)) == 50 and not np.isin(negs, seq).any()
        assert not np.isin(e.hist[r], future).any()         # hist never holds future items (or the target)
        want = seq[max(0, fu[u, 0] - 8): fu[u, 0]]
        assert (e.hist[r, 8 - len(want):] == want).all()


def test_eval_negatives_identical_across_calls_and_subsets(synth, synth_split):
    w = synth_split.round(0)
    a = build_eval_set(synth, w, seed=9)
    b = build_eval_set(synth, w, seed=9)
    assert (a.candidates == b.candidates).all() and (a.hist == b.hist).all()
    # Every future positive of a user faces the same negatives.
    for u in np.unique(a.user)[:20]:
        rows = a.candidates[a.user == u, 1:]
        assert (rows == rows[0]).all()
    # Negatives depend only on (seed, user, window): dropping half the users changes nothing else.
    keep = np.arange(synth.n_users) % 2 == 0
    half = replace(w, future=np.where(keep[:, None], w.future, 0))
    c = build_eval_set(synth, half, seed=9)
    assert (c.candidates == a.candidates[keep[a.user]]).all()
    assert (build_eval_set(synth, w, seed=10).candidates[:, 1:] != a.candidates[:, 1:]).any()


def test_hist_never_contains_future_on_ml100k(ml100k):
    w = make_split(ml100k, rounds=2).round(0)
    s = build_ctr_samples(ml100k, w, "cloud+fresh", neg=1, max_len=30, seed=0)
    rows = np.flatnonzero(s.label == 1)
    for r in rows[:: max(1, len(rows) // 3000)]:
        u = s.user[r]
        seq = ml100k.sequences[u]
        assert not np.isin(s.hist[r], seq[w.future[u, 0]:]).any()
        assert s.item[r] not in s.hist[r]


def test_iterate_batches_covers_every_row_once(synth, synth_split):
    s = build_ctr_samples(synth, synth_split.round(0), "fresh", neg=1, seed=0)
    batches = list(iterate_batches(s, 64, shuffle=True, seed=3))
    assert all(isinstance(b, CTRSamples) for b in batches) and max(len(b) for b in batches) == 64
    assert sum(len(b) for b in batches) == len(s)
    key = lambda x: np.sort(x.user * 10_000 + x.item)   # noqa: E731
    assert (key(s) == np.sort(np.concatenate([b.user * 10_000 + b.item for b in batches]))).all()
