"""Records -> train / valid / test splits.

Either the config names the files (``data.train`` and optionally ``data.valid`` /
``data.test``), or a Hugging Face dataset (``data.hub``, its own splits: see
``mlxtune.data.hub``), or one file (``data.path``) is split by ``data.split``: records sharing the
value of ``split.by`` (the user who wrote them, say) stay in one split, so the held-out
splits measure generalisation to new groups rather than memorised neighbours. Every file is
read and validated before anything else happens.
"""

from __future__ import annotations

import json

import numpy as np

from mlxtune.config import DataConfig, SplitConfig
from mlxtune.data.encode import resolve_mask_prompt
from mlxtune.data.records import Record, read_records, validate
from mlxtune.errors import DataError

SPLITS = ("train", "valid", "test")


def load_splits(cfg: DataConfig, seed: int, skipped: list | None = None,
                prompts: bool = False) -> tuple[dict[str, list[Record]], str]:
    """Read and validate the data (files, or a Hugging Face dataset with data.hub);
    return {'train','valid','test': records} and the format shared by all of them.
    valid / test may be empty lists. With a `skipped` list, records with an empty answer
    are collected there instead of stopping the read (records.read_records). `prompts`:
    the records are read for their prompts (grpo), answers optional."""
    if cfg.hub is not None:
        splits, fmt = _read_hub(cfg, seed, skipped, prompts)
    elif cfg.path:
        records, fmt = read_records(cfg.path, cfg.columns, skipped, prompts)
        splits = split_records(records, cfg.split, seed, str(cfg.path))
    else:
        splits, fmt = _read_split_files(cfg, skipped, prompts)
    resolve_mask_prompt(cfg.mask_prompt, fmt, splits["train"][0].source)
    return splits, fmt


def _read_split_files(cfg: DataConfig, skipped=None,
                      prompts: bool = False) -> tuple[dict[str, list[Record]], str]:
    if not cfg.train:
        raise DataError("data.train: no training data file given")
    read = {name: read_records(getattr(cfg, name), cfg.columns, skipped, prompts)
            for name in SPLITS if getattr(cfg, name)}
    fmt = read["train"][1]
    for name, (records, other) in read.items():
        if other != fmt:
            raise DataError(f"{records[0].source}: this file is {other} data but data.train "
                            f"({cfg.train}) is {fmt} data; all data files must use one format")
    return {name: read[name][0] if name in read else [] for name in SPLITS}, fmt


def _read_hub(cfg: DataConfig, seed: int, skipped=None,
              prompts: bool = False) -> tuple[dict[str, list[Record]], str]:
    """data.hub's splits; a held-out split the dataset lacks is carved out of its train
    split by data.split (its fraction of whole groups, as for one file)."""
    from mlxtune.data.hub import hub_rows

    rows = hub_rows(cfg.hub)
    read: dict[str, list[Record]] = {}
    fmt = None
    for name in SPLITS:
        split_rows = getattr(rows, name)
        if split_rows is None:
            continue
        records, other = validate(split_rows, skipped, prompts)
        if other is None or not records:
            raise DataError(f"data.hub.splits.{name}: {rows.name}: the split has no records"
                            + (" with an answer" if other is not None else ""))
        if fmt is not None and other != fmt:
            raise DataError(f"{records[0].source}: this split is {other} data but the train "
                            f"split is {fmt} data; all splits must use one format")
        fmt = fmt or other
        read[name] = records
    missing = [name for name in ("valid", "test") if name not in read]
    if missing:
        rule = SplitConfig(cfg.split.by, *(getattr(cfg.split, n) if n in missing else 0.0
                                           for n in ("valid", "test")))
        carved = split_records(read["train"], rule, seed, f"{rows.name} (train)")
        read["train"] = carved["train"]
        read.update({name: carved[name] for name in missing})
    return read, fmt


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

