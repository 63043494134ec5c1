"""Sequence packing: several examples per row, no attention across them.

A packed row holds whole examples back to back; `segments` numbers them so the model's
attention mask is block-diagonal (mlxtune.forward). Each example's first token is never a
target (encode guarantees mask[0] is False), so no example learns to predict the next
one's start. Rows are filled first-fit-decreasing within shuffled windows, so the order is
still random from epoch to epoch while rows stay full; everything is a function of
(lengths, row length, batch size, seed, epoch), so a resumed run finds the same batches.

Whether packing pays is decided per dataset and model (`packing_pays`): packing removes
padding and gives the compiled step one shape, but attention inside a packed row costs
row_len^2, not the sum of each example's length^2.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlxtune.data.encode import Example

WINDOW = 512  # examples sorted together when filling rows; keeps epochs shuffled


def pack_rows(lengths: list[int], row_len: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices grouped into rows of at most row_len tokens."""
    too_long = [n for n in lengths if n > row_len]
    if too_long:
        raise ValueError(f"an example of {max(too_long)} tokens does not fit a row of {row_len}")
    rng = np.random.default_rng([int(seed) % 2**64, int(epoch), 1])
    order = [int(i) for i in rng.permutation(len(lengths))]
    rows: list[list[int]] = []
    for w in range(0, len(order), WINDOW):
        window = sorted(order[w:w + WINDOW], key=lambda i: -lengths[i])
        free: list[int] = []
        start = len(rows)
        for i in window:
            for r, space in enumerate(free):
                if lengths[i] <= space:
                    rows[start + r].append(i)
                    free[r] -= lengths[i]
                    break
            else:
                rows.append([i])
                free.append(row_len - lengths[i])
    return rows


def packed_batch_order(lengths: list[int], row_len: int, batch_size: int, seed: int,
                       epoch: int) -> list[list[list[int]]]:
    """Batches of `batch_size` packed rows (the last may be short), in shuffled order."""
    rows = pack_rows(lengths, row_len, seed, epoch)
    # Rows of similar fill share a batch, so a batch pads little.
    rows.sort(key=lambda r: -sum(lengths[i] for i in r))
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    rng = np.random.default_rng([int(seed) % 2**64, int(epoch), 2])
    return [batches[i] for i in rng.permutation(len(batches))]


def collate_packed(rows: list[list[Example]], pad_id: int,
                   pad_multiple: int = 8) -> tuple[mx.array, mx.array, mx.array]:
    """tokens int32 [B, L], mask float32 [B, L], segments int32 [B, L]; padding gets
    segment id -1 (its own block, never a target)."""
    longest = max(sum(len(e.tokens) for e in row) for row in rows)
    width = -(-longest // pad_multiple) * pad_multiple if pad_multiple > 1 else longest
    tokens = np.full((len(rows), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=np.float32)
    segments = np.full((len(rows), width), -1, dtype=np.int32)
    for r, row in enumerate(rows):
        start = 0
        for s, e in enumerate(row):
            end = start + len(e.tokens)
            tokens[r, start:end] = e.tokens
            mask[r, start:end] = e.mask
            mask[r, start] = 0  # never predict an example's first token from the one before
            segments[r, start:end] = s
            start = end
    return mx.array(tokens), mx.array(mask), mx.array(segments)


def row_cost(width: int, flops_per_token: float, attention_flops_per_pair: float) -> float:
    """Model FLOPs of one row of `width` positions: every position pays the linear layers;
    attention pays for every causal (query, key) pair of the row, since the attention
    kernel computes them all whether the mask then drops them or not."""
    return width * flops_per_token + width * width / 2 * attention_flops_per_pair


def packing_pays(lengths: list[int], row_len: int, batch_size: int,
                 flops_per_token: float, attention_flops_per_pair: float,
                 pad_multiple: int = 8) -> bool:
    """True when an epoch of packed rows costs at least 5% less than an epoch of
    length-bucketed batches (as data.batches cuts them), by the model's own FLOP counts."""
    from mlxtune.data.batches import batch_order

    def rounded(n):
        return -(-n // pad_multiple) * pad_multiple

    bucketed = 0.0
    for idx in batch_order(lengths, batch_size, seed=0, epoch=0):
        width = rounded(max(lengths[i] for i in idx))
        bucketed += len(idx) * row_cost(width, flops_per_token, attention_flops_per_pair)
    packed = 0.0
    for batch in packed_batch_order(lengths, row_len, batch_size, seed=0, epoch=0):
        width = rounded(max(sum(lengths[i] for i in row) for row in batch))
        packed += len(batch) * row_cost(width, flops_per_token, attention_flops_per_pair)
    # Pack only for a clear gain: one example per row is bucketing with extra masking.
    return packed < 0.95 * bucketed
