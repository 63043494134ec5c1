"""DPO's reference policy, without a second copy of the model.

The reference is the model being trained, run with its trainable adapter set aside
(`adapters.reference_pass`): the base alone for a fresh adapter, or the base plus a frozen
copy of the adapter the run started from (`model.adapter`, e.g. an SFT run's adapters/;
see `adapters.freeze_reference`; DoRA's copy includes its magnitudes). A full fine-tune
has no adapter to set aside: its reference is its starting weights, so dpo with
`adapter.type: full` requires `objective.precompute_reference` (config.py), computed
before the first update, instead of a second copy of every trained weight. Its log-probs are computed in a forward pass of their
own, outside the policy's gradient graph, and handed to the loss as an input: the policy
step then holds the same activations as an SFT step over the same rows.

Two ways to get them:
- on the fly: one extra forward pass per batch (`Reference.batch`);
- `objective.precompute_reference: true`: once for every pair before training
  (`Reference.precompute`), cached in RUN_DIR/reference/ under a key of the encoded data,
  the base model and the reference adapter's weights, and read back on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxtune import adapters
from mlxtune.data.preference import Pair, collate_pairs
from mlxtune.data.batches import batch_order
from mlxtune.objectives.preference import sequence_logps, split_pairs

CACHE_DIR = "reference"
CACHE_VERSION = 1


def reference_logps(model: nn.Module, tokens: mx.array, mask: mx.array,
                    chunk: int = 0) -> mx.array:
    """The reference policy's summed answer log-probs of each row [R], no gradient."""
    with adapters.reference_pass(model):
        logps, _ = sequence_logps(model, tokens, mask, chunk)
    return mx.stop_gradient(logps)


def pair_logps(model: nn.Module, tokens: mx.array, mask: mx.array, chunk: int = 0,
               reference: bool = True) -> dict[str, np.ndarray]:
    """Log-probs of the chosen and rejected answers of a batch of pairs (rows as
    data.preference.collate_pairs lays them out), for evaluation:

    {"policy_chosen", "policy_rejected"}: summed log-probs under the model as it is (adapter
    on); with `reference`, also {"reference_chosen", "reference_rejected"} under the
    reference policy; and {"chosen_tokens", "rejected_tokens"}: the answers' lengths.
    DPO's implicit reward of an answer is beta * (policy - reference); a pair is ranked
    right when the chosen answer's reward is the higher (TRL's rewards/accuracies)."""
    logps, lengths = sequence_logps(model, tokens, mask, chunk)
    out = {"policy": logps, "tokens": lengths}
    if reference:
        out["reference"] = reference_logps(model, tokens, mask, chunk)
    mx.eval(out)
    result = {}
    for name, value in out.items():
        c, r = split_pairs(value)
        prefix = "" if name == "tokens" else f"{name}_"
        suffix = "_tokens" if name == "tokens" else ""
        result[f"{prefix}chosen{suffix}"] = np.array(c, dtype=np.float64)
        result[f"{prefix}rejected{suffix}"] = np.array(r, dtype=np.float64)
    return result


def score_pairs(model: nn.Module, pairs: list[Pair], pad_id: int, batch_size: int = 8,
                chunk: int = 0, reference: bool = True) -> dict[str, np.ndarray]:
    """`pair_logps` for a list of pairs, in their order (arrays of len(pairs))."""
    out: dict[str, np.ndarray] = {}
    for idx in batch_order([len(p) for p in pairs], batch_size, 0, 0):
        tokens, mask = collate_pairs([pairs[i] for i in idx], pad_id, 32)
        got = pair_logps(model, tokens, mask, chunk, reference)
        for k, v in got.items():
            out.setdefault(k, np.zeros(len(pairs)))[idx] = v
    return out


class Reference:
    """Where a DPO step's reference log-probs come from: computed per batch, or looked up
    in arrays precomputed for a whole split (by the pairs' indices in that split)."""

    def __init__(self, model: nn.Module, pad_id: int, pad_multiple: int, chunk: int = 0,
                 compile: bool = True):
        self.model, self.pad_id, self.pad_multiple, self.chunk = model, pad_id, pad_multiple, chunk
        fn = lambda tokens, mask: reference_logps(model, tokens, mask, chunk)  # noqa: E731
        self._fn = mx.compile(fn, inputs=model.state) if compile else fn
        self.cached: dict[str, np.ndarray] = {}  # split -> [N, 2] (chosen, rejected)

    def batch(self, split: str, indices: list[int], tokens: mx.array,
              mask: mx.array) -> mx.array:
        """Reference log-probs [2B] of the rows of a batch (chosen rows, then rejected)."""
        if split in self.cached:
            rows = self.cached[split][np.asarray(indices)]
            return mx.array(np.concatenate([rows[:, 0], rows[:, 1]]).astype(np.float32))
        out = self._fn(tokens, mask)
        mx.eval(out)
        return out

    def precompute(self, split: str, pairs: list[Pair], run_dir: Path, identity: dict,
                   batch_size: int, log=lambda _msg: None, compute: bool = True) -> Path:
        """Compute (or read back) the reference log-probs of every pair of a split.
        `compute` false: only read back (a full fine-tune past its first step no longer
        holds its reference weights)."""
        key = cache_key(pairs, identity, self.model)
        path = Path(run_dir) / CACHE_DIR / f"{split}-{key[:20]}.npy"
        if path.is_file():
            values = np.load(path)
            if values.shape == (len(pairs), 2):
                self.cached[split] = values
                log(f"reference log-probs: {split}: {len(pairs)} pairs read from {path}")
                return path
        if not compute:
            from mlxtune.errors import TrainingStopped

            raise TrainingStopped(
                f"{path}: the reference log-probs of a full fine-tune are missing and cannot "
                "be recomputed after its first step (the starting weights are overwritten); "
                "start the run again")
        start = time.perf_counter()
        values = np.zeros((len(pairs), 2), dtype=np.float32)
        for idx in batch_order([len(p) for p in pairs], batch_size, 0, 0):
            tokens, mask = collate_pairs([pairs[i] for i in idx], self.pad_id,
                                         self.pad_multiple)
            c, r = split_pairs(self._fn(tokens, mask))
            mx.eval(c, r)
            values[idx, 0], values[idx, 1] = np.array(c), np.array(r)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        with open(tmp, "wb") as f:
            np.save(f, values)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.cached[split] = values
        log(f"reference log-probs: {split}: {len(pairs)} pairs in "
            f"{time.perf_counter() - start:.0f} s, cached in {path}")
        return path


def cache_key(pairs: list[Pair], identity: dict, model: nn.Module) -> str:
    """sha256 of the encoded pairs (tokens and masks), the base model's identity (the
    config's model keys) and the reference adapter's weights (none: the base alone)."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, **identity}, sort_keys=True).encode())
    for p in pairs:
        for row in (p.chosen, p.rejected):
            h.update(np.asarray(row.tokens, dtype=np.int64).tobytes())
            h.update(np.packbits(np.asarray(row.mask, dtype=bool)).tobytes())
            h.update(b"|")
    for name, m in adapters.lora_layers(model):
        if "ref_lora_a" in m:
            h.update(name.encode())
            for w in (m.ref_lora_a, m.ref_lora_b, *([m.ref_m] if "ref_m" in m else [])):
                h.update(np.array(w.astype(mx.float32)).tobytes())
            h.update(str(m.scale).encode())
    return h.hexdigest()
