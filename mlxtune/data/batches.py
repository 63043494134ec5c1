"""Examples -> batches: which examples share a batch, and padding.

Two orders. Length-grouped: batches cut from examples sorted by length, so a batch pads
little, the order of the batches shuffled per epoch. Random: batches cut from the examples
shuffled per epoch, so every batch mixes short and long examples (data.batcher lays such a
batch out in rows without padding where the model allows). Everything is a function of
(lengths, seed, epoch), which is what lets a resumed run pick up at the same batch.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlxtune.data.encode import Example


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int,
                by_length: bool = True) -> list[list[int]]:
    """Indices into `lengths`, in batches of `batch_size` (the last may be short):
    length-grouped batches in shuffled order, or (by_length false) shuffled examples."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # numpy wants non-negative seed words; map negative seeds without colliding.
    seed_word = int(seed) % 2**64
    if not by_length:
        rng = np.random.default_rng([seed_word, int(epoch), 3])
        shuffled = [int(i) for i in rng.permutation(len(lengths))]
        return [shuffled[i:i + batch_size] for i in range(0, len(shuffled), batch_size)]
    ordered = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    rng = np.random.default_rng([seed_word, int(epoch)])
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(examples: list[Example], pad_id: int,
            pad_multiple: int = 8) -> tuple[mx.array, mx.array]:
    """tokens int32 [B, L] padded with pad_id, mask float32 [B, L] (0 on padding); L is the
    longest example rounded up to pad_multiple, so compiled steps see few distinct shapes."""
    longest = max(len(e.tokens) for e in examples)
    width = -(-longest // pad_multiple) * pad_multiple if pad_multiple > 1 else longest
    tokens = np.full((len(examples), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(examples), width), dtype=np.float32)
    for row, e in enumerate(examples):
        tokens[row, : len(e.tokens)] = e.tokens
        mask[row, : len(e.mask)] = e.mask
    return mx.array(tokens), mx.array(mask)
