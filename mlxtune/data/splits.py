"""Records -> train / valid / test splits.

Either the config names the files (``data.train`` and optionally ``data.valid`` /
``data.test``), or one file (``data.path``) is split by ``data.split``: records sharing the
value of ``split.by`` (the user who wrote them, say) stay in one split, so the held-out
splits measure generalisation to new groups rather than memorised neighbours. Every file is
read and validated before anything else happens.
"""

from __future__ import annotations

import json

import numpy as np

from mlxtune.config import DataConfig, SplitConfig
from mlxtune.data.encode import resolve_mask_prompt
from mlxtune.data.records import Record, read_records
from mlxtune.errors import DataError

SPLITS = ("train", "valid", "test")


def load_splits(cfg: DataConfig, seed: int) -> tuple[dict[str, list[Record]], str]:
    """Read and validate the data files; return {'train','valid','test': records} and the
    format shared by all of them. valid / test may be empty lists."""
    if cfg.path:
        records, fmt = read_records(cfg.path)
        splits = split_records(records, cfg.split, seed, str(cfg.path))
    else:
        splits, fmt = _read_split_files(cfg)
    resolve_mask_prompt(cfg.mask_prompt, fmt, splits["train"][0].source)
    return splits, fmt


def _read_split_files(cfg: DataConfig) -> tuple[dict[str, list[Record]], str]:
    if not cfg.train:
        raise DataError("data.train: no training data file given")
    read = {name: read_records(getattr(cfg, name)) for name in SPLITS if getattr(cfg, name)}
    fmt = read["train"][1]
    for name, (records, other) in read.items():
        if other != fmt:
            raise DataError(f"{records[0].source}: this file is {other} data but data.train "
                            f"({cfg.train}) is {fmt} data; all data files must use one format")
    return {name: read[name][0] if name in read else [] for name in SPLITS}, fmt


def split_records(records: list[Record], split: SplitConfig, seed: int,
                  path: str) -> dict[str, list[Record]]:
    """Assign whole groups to valid / test / train at random (deterministic in `seed`)."""
    group_of = _group_ids(records, split.by)
    n = max(group_of, default=-1) + 1
    n_valid, n_test = _count(split.valid, n), _count(split.test, n)
    if n - n_valid - n_test < 1:
        what = f"distinct values of \"{split.by}\"" if split.by else "records"
        raise DataError(f"{path}: data.split: {n} {what} are too few to give valid "
                        f"({split.valid}) and test ({split.test}) at least one each and keep "
                        "some for training; add data or lower the fractions")
    rng = np.random.default_rng(int(seed) % 2**64)  # numpy wants seeds >= 0
    rank = np.empty(n, dtype=np.int64)
    rank[rng.permutation(n)] = np.arange(n)  # rank[g]: where group g landed in the shuffle
    out: dict[str, list[Record]] = {name: [] for name in SPLITS}
    # File order inside each split: easier to read, and batching reorders anyway.
    for record, g in zip(records, group_of):
        r = rank[g]
        out["valid" if r < n_valid else "test" if r < n_valid + n_test else "train"].append(record)
    return out


def _group_ids(records: list[Record], by: str | None) -> list[int]:
    """The group number of each record, numbered in order of first appearance."""
    if by is None:
        return list(range(len(records)))
    ids: dict[str, int] = {}
    out = []
    for record in records:
        if by not in record.data:
            raise DataError(f"{record.source}: no \"{by}\" key, which data.split.by groups "
                            "records by")
        # JSON text as the key: values may be lists or objects, which do not hash.
        key = json.dumps(record.data[by], sort_keys=True)
        out.append(ids.setdefault(key, len(ids)))
    return out


def _count(fraction: float, n: int) -> int:
    """Groups for a held-out split: a nonzero fraction always gets at least one."""
    return 0 if fraction <= 0 else max(1, round(fraction * n))

