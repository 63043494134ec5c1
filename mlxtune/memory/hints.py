"""The nearest change of one knob that makes a `tight` or `no` plan fit.

Knobs are tried in the order of what they cost: gradient checkpointing (time only),
micro-batches of the same batch (train.max_batch_tokens: time only), a 4-bit base
(QLoRA: some quality), a shorter sequence length (data cut), a smaller rank (capacity).
For each, the least change that gives `fits` is found; every one that works is returned,
the nearest first. When none does alone, the first four are tried together.
"""

from __future__ import annotations

from mlxtune.memory import tiers as tiers_mod
from mlxtune.memory.estimate import PAD_MULTIPLE, estimate, workload
from mlxtune.memory.shapes import ModelShape
from mlxtune.memory.tiers import Machine


def _peak(cfg, machine: Machine, shape: ModelShape, ranks: int, attention: str) -> float:
    return estimate(workload(cfg, shape, machine.backend, ranks, attention)).peak


def _fits(cfg, machine, shape, ranks, attention) -> tuple[bool, float]:
    peak = _peak(cfg, machine, shape, ranks, attention)
    return tiers_mod.verdict(peak, machine.usable_bytes) == "fits", peak


def nearest(cfg, machine: Machine, shape: ModelShape, ranks: int = 1,
            attention: str = "materialised") -> list:
    from mlxtune.config import QuantizeConfig
    from mlxtune.memory import Hint, with_changes

    out = []

    def attempt(changes: dict, text) -> bool:
        trial = with_changes(cfg, changes)
        ok, peak = _fits(trial, machine, shape, ranks, attention)
        if ok:
            (key, value), = list(changes.items())[:1]
            out.append(Hint(key, value, peak / 1e9, text(peak / 1e9)))
        return ok

    t = cfg.train
    if not t.grad_checkpoint:
        attempt({"train.grad_checkpoint": True},
                lambda gb: f"fits with train.grad_checkpoint=true ({gb:.1f} GB)")

    # The same batch in micro-batches (train.max_batch_tokens): the largest that fits.
    here = workload(cfg, shape, machine.backend, ranks, attention)
    per_pair = 2 if cfg.objective.type in ("dpo", "orpo", "simpo") else 1
    for items in range(here.rows // per_pair - 1, 0, -1):
        tokens = items * per_pair * here.width
        if attempt({"train.max_batch_tokens": tokens},
                   lambda gb, items=items, tokens=tokens:
                   f"fits with train.max_batch_tokens={tokens} (micro-batches of {items} "
                   f"{'pairs' if per_pair == 2 else 'rows'}, the same step; {gb:.1f} GB)"):
            break

    dense_base = not any(w.quantized for w in here.weights)
    if dense_base:
        attempt({"model.quantize": QuantizeConfig(format="affine", bits=4, group_size=64)},
                lambda gb: f"fits with a 4-bit base, model.quantize={{format: affine, bits: 4}}"
                f" ({gb:.1f} GB)")

    # The longest sequence that fits: bisect over multiples of the padding.
    lo, hi = 0, (cfg.data.max_seq_len - 1) // PAD_MULTIPLE
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ok, _ = _fits(with_changes(cfg, {"data.max_seq_len": mid * PAD_MULTIPLE}), machine,
                      shape, ranks, attention)
        lo, hi = (mid, hi) if ok else (lo, mid - 1)
    if lo > 0:
        attempt({"data.max_seq_len": lo * PAD_MULTIPLE},
                lambda gb: f"fits with data.max_seq_len={lo * PAD_MULTIPLE} ({gb:.1f} GB)")

    r = cfg.adapter.rank // 2
    while r >= 1:
        if attempt({"adapter.rank": r}, lambda gb, r=r: f"fits with adapter.rank={r} "
                                                         f"({gb:.1f} GB)"):
            break
        r //= 2
    if not out:
        combined = _combined(cfg, machine, shape, ranks, attention, dense_base)
        if combined is not None:
            out.append(combined)
    return out


def _combined(cfg, machine, shape, ranks, attention, dense_base):
    """No single knob is enough: checkpointing, a 4-bit base, micro-batches of one row
    (one pair) and then the longest sequence that fits, applied together."""
    from mlxtune.config import QuantizeConfig
    from mlxtune.memory import Hint, with_changes

    t = cfg.train
    changes, words = {}, []
    if not t.grad_checkpoint:
        changes["train.grad_checkpoint"] = True
        words.append("train.grad_checkpoint=true")
    if dense_base:
        changes["model.quantize"] = QuantizeConfig(format="affine", bits=4, group_size=64)
        words.append("a 4-bit base")
    here = workload(cfg, shape, machine.backend, ranks, attention)
    per_pair = 2 if cfg.objective.type in ("dpo", "orpo", "simpo") else 1
    if here.rows > per_pair:
        changes["train.max_batch_tokens"] = per_pair * here.width
        words.append(f"train.max_batch_tokens={per_pair * here.width}")
    trial = with_changes(cfg, changes)
    ok, peak = _fits(trial, machine, shape, ranks, attention)
    if not ok:
        lo, hi = 0, (cfg.data.max_seq_len - 1) // PAD_MULTIPLE
        while lo < hi:
            mid = (lo + hi + 1) // 2
            good, _ = _fits(with_changes(trial, {"data.max_seq_len": mid * PAD_MULTIPLE}),
                            machine, shape, ranks, attention)
            lo, hi = (mid, hi) if good else (lo, mid - 1)
        if lo == 0:
            return None
        changes["data.max_seq_len"] = lo * PAD_MULTIPLE
        words.append(f"data.max_seq_len={lo * PAD_MULTIPLE}")
        ok, peak = _fits(with_changes(cfg, changes), machine, shape, ranks, attention)
    if not words:
        return None
    key, value = next(iter(changes.items()))
    return Hint(key, value, peak / 1e9,
                f"fits only with {' + '.join(words)} together ({peak / 1e9:.1f} GB)")
