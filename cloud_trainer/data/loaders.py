"""Readers for the original dataset files -> `RecDataset`.

Every rating / review is one positive interaction. Data is read from where it lies
(argument, `DCCL_DATA`, or `../shared/datasets` beside the repo) and never copied.
Bad input raises `DcclError` naming the file and line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from cloud_trainer.data.dataset import RecDataset
from dccl.errors import DcclError

# name -> folder name under a datasets root (DCCL_DATA or ../shared/datasets)
DEFAULT_FOLDERS = {"ml-100k": "ml-100k", "ml-1m": "ml-1m", "amazon": "amazon-beauty"}
DATASET_NAMES = ("synthetic", "ml-100k", "ml-1m", "amazon")

# MovieLens-1M age codes; ML-100K raw ages are bucketed to the same 7 groups so the two
# datasets share one profile layout: age (1..7), gender (1..2), occupation (1..21).
_AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])          # buckets <18, 18-24, ..., 56+
_ML1M_AGE_CODES = {1: 1, 18: 2, 25: 3, 35: 4, 45: 5, 50: 6, 56: 7}
_GENDERS = {"M": 1, "F": 2}
_ML100K_OCCUPATIONS = 21    # u.occupation lists 21; ML-1M codes 0..20 likewise


def load_dataset(name: str, path: str | os.PathLike | None = None, **kw) -> RecDataset:
    """Load dataset `name` ("synthetic", "ml-100k", "ml-1m", "amazon") and validate it.

    `path` is the dataset folder (or, for ml-1m/amazon, the ratings/sequence file);
    without it: `$DCCL_DATA` (a dataset folder or a root holding `ml-100k/`, `ml-1m/`,
    `amazon-beauty/`), then `../shared/datasets` beside the repository. Extra keyword
    arguments go to the generator (synthetic) or the reader (amazon: `max_attrs`).
    """
    if name not in DATASET_NAMES:
        raise DcclError(f"unknown dataset name {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if name == "synthetic":
        from cloud_trainer.data.synthetic import make_synthetic

        return make_synthetic(**kw).validate()
    readers: dict[str, Callable[..., RecDataset]] = {
        "ml-100k": read_ml100k, "ml-1m": read_ml1m, "amazon": read_amazon,
    }
    return readers[name](_resolve_path(name, path), **kw).validate()


def _resolve_path(name: str, path) -> Path:
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise DcclError(f"{name}: path {p} does not exist")
        return p
    folder = DEFAULT_FOLDERS[name]
    roots = []
    if os.environ.get("DCCL_DATA"):
        env = Path(os.environ["DCCL_DATA"]).expanduser()
        roots += [env / folder, env]      # a root of datasets, or the dataset itself
    roots.append(Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / folder)
    for p in roots:
        if p.exists():
            return p
    raise DcclError(
        f"{name}: no data found (looked in {', '.join(str(r) for r in roots)}); "
        f"pass path=... or set DCCL_DATA to the dataset folder"
    )


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DcclError(f"missing file: {path}")
    return path


def _lines(path: Path, encoding: str = "utf-8"):
    """Yield (line_number, stripped line) for non-blank lines; error if there are none."""
    any_line = False
    with open(_need(path), encoding=encoding) as fh:
        for no, line in enumerate(fh, 1):
            line = line.strip()
            if line:
                any_line = True
                yield no, line
    if not any_line:
        raise DcclError(f"{path}: file is empty")


def _int(text: str, path: Path, no: int, field: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DcclError(f"{path}:{no}: field {field!r} is not an integer: {text!r}") from None


def _dense(raw: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Map raw ids to dense ids start.. in sorted raw-id order; return (keys, dense ids)."""
    keys, inv = np.unique(raw, return_inverse=True)
    return keys, inv.astype(np.int64) + start


def _sequences(user: np.ndarray, item: np.ndarray, time: np.ndarray, n_users: int) -> list[np.ndarray]:
    """Group interactions by user, each in time order (ties keep file order)."""
    order = np.lexsort((np.arange(len(user)), time, user))   # last key is primary
    user, item = user[order], item[order]
    cuts = np.searchsorted(user, np.arange(1, n_users))
    return [s.astype(np.int64) for s in np.split(item, cuts)]


def _ratings(path: Path, sep: str, encoding: str = "utf-8") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse `user sep item [sep rating [sep timestamp]]`; without timestamps file order is time."""
    users, items, times = [], [], []
    has_time = None
    for no, line in _lines(path, encoding):
        f = line.split(sep) if sep else line.split()
        if len(f) < 2 or len(f) > 4:
            raise DcclError(f"{path}:{no}: expected user{sep}item[{sep}rating[{sep}timestamp]], got {line[:80]!r}")
        users.append(_int(f[0], path, no, "user"))
        items.append(_int(f[1], path, no, "item"))
        if has_time is None:
            has_time = len(f) == 4
        elif has_time != (len(f) == 4):
            raise DcclError(f"{path}:{no}: timestamp present on some lines but not others")
        times.append(_int(f[3], path, no, "timestamp") if has_time else len(times))
    return np.array(users, np.int64), np.array(items, np.int64), np.array(times, np.int64)


def _pad_lists(rows: list[list[int]], width: int | None = None) -> np.ndarray:
    width = max([len(r) for r in rows] + [1]) if width is None else width
    out = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r[:width])] = r[:width]
    return out


def _check_users(seqs: list[np.ndarray], path: Path) -> None:
    # Dense re-indexing over rated users means nobody is empty; kept as a guard for the contract.
    for u, s in enumerate(seqs):
        if len(s) == 0:
            raise DcclError(f"{path}: user {u} has no interactions")


# --------------------------------------------------------------------------- MovieLens 100K


def read_ml100k(path: Path) -> RecDataset:
    """`u.data` (tab-separated), `u.user` (age|gender|occupation), `u.item` (19 genre flags)."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    data = root / "u.data"
    raw_u, raw_i, ts = _ratings(data, "\t")
    ukeys, user = _dense(raw_u, 0)
    ikeys, item = _dense(raw_i, 1)
    n_users, n_items = len(ukeys), len(ikeys)
    seqs = _sequences(user, item, ts, n_users)
    _check_users(seqs, data)

    occ_file = root / "u.occupation"
    occupations = [line for _, line in _lines(occ_file)] if occ_file.is_file() else []
    occ_id = {o: k + 1 for k, o in enumerate(occupations)}
    profile = np.zeros((n_users, 3), np.int64)
    uf = root / "u.user"
    for no, line in _lines(uf, "latin-1"):
        f = line.split("|")
        if len(f) != 5:
            raise DcclError(f"{uf}:{no}: expected user|age|gender|occupation|zip, got {line[:80]!r}")
        u = np.searchsorted(ukeys, _int(f[0], uf, no, "user"))
        if u == n_users or ukeys[u] != int(f[0]):
            continue   # a user without ratings is not a device here
        age = _int(f[1], uf, no, "age")
        profile[u, 0] = 1 + np.searchsorted(_AGE_EDGES, age, side="right")
        profile[u, 1] = _GENDERS.get(f[2], 0)
        if f[3] not in occ_id:
            occ_id[f[3]] = len(occ_id) + 1   # tolerate a missing u.occupation
        profile[u, 2] = occ_id[f[3]]

    itf = root / "u.item"
    genres: list[list[int]] = [[] for _ in range(n_items + 1)]
    n_genres = 19
    for no, line in _lines(itf, "latin-1"):
        f = line.split("|")
        if len(f) < 1 + n_genres + 1:
            raise DcclError(f"{itf}:{no}: expected id|title|...|19 genre flags, got {len(f)} fields")
        i = np.searchsorted(ikeys, _int(f[0], itf, no, "item"))
        if i == n_items or ikeys[i] != int(f[0]):
            continue   # catalogue entry never rated
        flags = f[-n_genres:]
        if any(x not in ("0", "1") for x in flags):
            raise DcclError(f"{itf}:{no}: genre flags must be 0/1, got {'|'.join(flags)!r}")
        genres[i + 1] = [g + 1 for g, x in enumerate(flags) if x == "1"]

    return RecDataset(
        name="ml-100k", synthetic=False, n_users=n_users, n_items=n_items, sequences=seqs,
        item_attrs=_pad_lists(genres), n_attrs=n_genres + 1, profile=profile,
        profile_vocab=[len(_AGE_EDGES) + 2, len(_GENDERS) + 1, max(len(occ_id), _ML100K_OCCUPATIONS) + 1],
        profile_names=["age", "gender", "occupation"],
    )


# --------------------------------------------------------------------------- MovieLens 1M


def read_ml1m(path: Path) -> RecDataset:
    """`ratings.dat` (user::item::rating[::timestamp]), `users.dat`, `movies.dat` (latin-1).

    `path` is the folder or the ratings file itself (then users.dat/movies.dat sit beside it).
    Users and items are re-indexed densely over the rated ones, in raw-id order.
    """
    path = Path(path)
    rf = path if path.is_file() else path / "ratings.dat"
    root = rf.parent
    raw_u, raw_i, ts = _ratings(rf, "::")
    ukeys, user = _dense(raw_u, 0)
    ikeys, item = _dense(raw_i, 1)
    n_users, n_items = len(ukeys), len(ikeys)
    seqs = _sequences(user, item, ts, n_users)
    _check_users(seqs, rf)

    profile = np.zeros((n_users, 3), np.int64)
    uf = root / "users.dat"
    for no, line in _lines(uf, "latin-1"):
        f = line.split("::")
        if len(f) != 5:
            raise DcclError(f"{uf}:{no}: expected user::gender::age::occupation::zip, got {line[:80]!r}")
        raw = _int(f[0], uf, no, "user")
        u = np.searchsorted(ukeys, raw)
        if u == n_users or ukeys[u] != raw:
            continue
        age = _int(f[2], uf, no, "age")
        occ = _int(f[3], uf, no, "occupation")
        if age not in _ML1M_AGE_CODES or not 0 <= occ < _ML100K_OCCUPATIONS:
            raise DcclError(f"{uf}:{no}: age code {age} or occupation {occ} outside the ML-1M codebook")
        profile[u] = (_ML1M_AGE_CODES[age], _GENDERS.get(f[1], 0), occ + 1)

    mf = root / "movies.dat"
    movie_genres: dict[int, list[str]] = {}
    for no, line in _lines(mf, "latin-1"):
        f = line.split("::")
        if len(f) != 3:
            raise DcclError(f"{mf}:{no}: expected item::title::Genre1|Genre2, got {line[:80]!r}")
        movie_genres[_int(f[0], mf, no, "item")] = [g for g in f[2].split("|") if g]
    vocab = {g: k + 1 for k, g in enumerate(sorted({g for gs in movie_genres.values() for g in gs}))}
    attrs = [[]] + [[vocab[g] for g in movie_genres.get(int(raw), [])] for raw in ikeys]

    return RecDataset(
        name="ml-1m", synthetic=False, n_users=n_users, n_items=n_items, sequences=seqs,
        item_attrs=_pad_lists(attrs), n_attrs=len(vocab) + 1, profile=profile,
        profile_vocab=[len(_ML1M_AGE_CODES) + 1, len(_GENDERS) + 1, _ML100K_OCCUPATIONS + 1],
        profile_names=["age", "gender", "occupation"],
    )


# --------------------------------------------------------------------------- Amazon 5-core


def _amazon_files(path: Path) -> tuple[Path, Path]:
    if path.is_file():
        seq = path
        cands = sorted(path.parent.glob(f"{path.stem}*item2attributes.json")) or sorted(
            path.parent.glob("*item2attributes.json"))
    else:
        txts = sorted(path.glob("*.txt"))
        if len(txts) != 1:
            raise DcclError(f"{path}: expected exactly one sequence .txt file, found {[t.name for t in txts]}")
        seq = txts[0]
        cands = sorted(path.glob("*item2attributes.json"))
    if not cands:
        raise DcclError(f"missing file: {seq.parent}/*item2attributes.json (item attributes for {seq.name})")
    if len(cands) > 1:
        raise DcclError(f"{seq.parent}: several *item2attributes.json files: {[c.name for c in cands]}")
    return seq, cands[0]


def read_amazon(path: Path, max_attrs: int = 8) -> RecDataset:
    """`Beauty.txt`-style `user item1 item2 ...` (time order) + `*item2attributes.json`.

    No user profile (P = 0). Attributes per item are capped at `max_attrs`, in file order.
    """
    seq_file, attr_file = _amazon_files(Path(path))
    raw_users, raw_seqs = [], []
    for no, line in _lines(seq_file):
        f = line.split()
        ids = [_int(x, seq_file, no, "user" if k == 0 else "item") for k, x in enumerate(f)]
        if len(ids) < 2:
            raise DcclError(f"{seq_file}:{no}: user {f[0]} has no interactions")
        raw_users.append(ids[0])
        raw_seqs.append(ids[1:])
    if len(set(raw_users)) != len(raw_users):
        raise DcclError(f"{seq_file}: a user id appears on more than one line")
    lens = np.array([len(s) for s in raw_seqs])
    ikeys, flat = _dense(np.concatenate([np.asarray(s, np.int64) for s in raw_seqs]), 1)
    seqs = np.split(flat, np.cumsum(lens)[:-1])   # users in file order
    n_items = len(ikeys)

    try:
        with open(attr_file, encoding="utf-8") as fh:
            raw_attrs = json.load(fh)
    except json.JSONDecodeError as e:
        raise DcclError(f"{attr_file}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(raw_attrs, dict):
        raise DcclError(f"{attr_file}: expected a JSON object {{item_id: [attribute ids]}}")
    try:
        attr_keys = np.unique(np.array([a for v in raw_attrs.values() for a in v], np.int64))
        lists = [[]] + [
            list(np.searchsorted(attr_keys, raw_attrs.get(str(raw), [])[:max_attrs]) + 1) for raw in ikeys
        ]
    except (TypeError, ValueError):
        raise DcclError(f"{attr_file}: attribute lists must hold integer ids") from None

    return RecDataset(
        name="amazon", synthetic=False, n_users=len(seqs), n_items=n_items, sequences=seqs,
        item_attrs=_pad_lists(lists, min(max_attrs, max(len(x) for x in lists) or 1)),
        n_attrs=len(attr_keys) + 1, profile=np.zeros((len(seqs), 0), np.int64),
        profile_vocab=[], profile_names=[],
    )
