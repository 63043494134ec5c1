"""The TUI's plan view: the data's leakage count and truncation share, cached.

``summary(cfg)`` reads the data as a run does and counts held-out examples with a copy in
train (the cheap, text-only part of the check); ``truncation(cfg)`` tokenizes the train
split once per (data, tokenizer, mask settings) and then answers for any
``data.max_seq_len`` from the cached lengths, so stepping the sequence-length knob costs
nothing. Both are keyed on the data files' modification times as well, and run in the
view's worker threads (never on its event loop).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading

import numpy as np

from mlxtune.config import Config, DedupConfig
from mlxtune.data.splits import SPLITS

_LOCK = threading.Lock()
_SUMMARIES: dict = {}
_LENGTHS: dict = {}


def _data_key(cfg: Config, *extra) -> str:
    d = dataclasses.asdict(cfg.data)
    d.pop("max_seq_len", None)
    stamps = []
    for name in (*SPLITS, "path"):
        path = getattr(cfg.data, name)
        if path:
            try:
                stamps.append(os.stat(path).st_mtime_ns)
            except OSError:
                stamps.append(None)
    return json.dumps([d, cfg.train.seed, stamps, *extra], sort_keys=True, default=str)


def summary(cfg: Config) -> dict:
    """{"examples": {split: n}, "format", "leakage": {"valid", "test", "split_key"}}."""
    from mlxtune.datacheck.overlap import load, leakage, similar, split_key_leakage

    key = _data_key(cfg)
    with _LOCK:
        if key in _SUMMARIES:
            return _SUMMARIES[key]
    loaded = load(cfg)
    pairs = leakage(loaded, similar(loaded, cfg.data.dedup or DedupConfig()))["pairs"]
    out = {"examples": {name: len(loaded.splits[name]) for name in SPLITS},
           "format": loaded.fmt,
           "leakage": {"valid": sum(1 for p in pairs if p[0] == "valid"),
                       "test": sum(1 for p in pairs if p[0] == "test"),
                       "split_key": split_key_leakage(loaded, cfg.data.split.by)["values"]},
           "empty_answers": len(loaded.skipped)}
    with _LOCK:
        _SUMMARIES[key] = out
    return out


def truncation(cfg: Config) -> dict:
    """{"examples", "truncated", "share", "max_seq_len"} for the train split (grpo: its
    prompts, "truncated" those a run leaves out, longer than data.max_seq_len -
    objective.max_completion_tokens)."""
    from mlxtune.data.splits import load_splits
    from mlxtune.datacheck import tokens
    from mlxtune.datacheck.overlap import reads_prompts

    grpo = reads_prompts(cfg)
    key = _data_key(cfg, cfg.model.path, cfg.model.revision, grpo)
    with _LOCK:
        lengths = _LENGTHS.get(key)
    if lengths is None:
        splits, fmt = load_splits(cfg.data, cfg.train.seed, [], prompts=grpo)
        tokenizer, _ = tokens.load_tokenizer(cfg.model)
        lengths = (tokens.prompt_tokens(splits["train"], fmt, tokenizer).lengths if grpo else
                   tokens.split_tokens(splits["train"], fmt, tokenizer, cfg.data).lengths)
        with _LOCK:
            _LENGTHS[key] = lengths
    n = len(lengths)
    room = cfg.data.max_seq_len - (cfg.objective.max_completion_tokens if grpo else 0)
    over = int((np.asarray(lengths) > room).sum())
    return {"examples": n, "truncated": over, "share": over / n if n else 0.0,
            "max_seq_len": cfg.data.max_seq_len}
