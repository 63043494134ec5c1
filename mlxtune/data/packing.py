"""Sequence packing: several examples per row, no attention across them.

A packed row holds whole examples back to back; `segments` numbers them so the model's
attention mask is block-diagonal (mlxtune.forward). Each example's first token is never a
target (encode guarantees mask[0] is False), so no example learns to predict the next
one's start. Rows are filled first-fit-decreasing within shuffled windows, so the order is
still random from epoch to epoch while rows stay full; everything is a function of
(lengths, row length, batch size, seed, epoch), so a resumed run finds the same batches.

Whether packing pays is decided per dataset and model (data.batcher.decide_packing, by
`RowCost`): packing removes padding and gives the compiled step one shape, but attention
inside a packed row costs row_len^2, not the sum of each example's length^2, unless the
attention kernel skips the other examples' keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlxtune.data.batches import Widths, as_widths
from mlxtune.data.encode import Example

WINDOW = 512  # examples sorted together when filling rows; keeps epochs shuffled


def pack_rows(lengths: list[int], row_len: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices grouped into rows of at most row_len tokens."""
    rng = np.random.default_rng([int(seed) % 2**64, int(epoch), 1])
    order = [int(i) for i in rng.permutation(len(lengths))]
    rows: list[list[int]] = []
    for w in range(0, len(order), WINDOW):
        rows += first_fit_decreasing(order[w:w + WINDOW], lengths, row_len)
    return rows


def first_fit_decreasing(indices: list[int], lengths: list[int],
                         row_len: int) -> list[list[int]]:
    """`indices` grouped into rows of at most row_len tokens: longest first, each into the
    first row with room for it."""
    too_long = [lengths[i] for i in indices if lengths[i] > row_len]
    if too_long:
        raise ValueError(f"an example of {max(too_long)} tokens does not fit a row of {row_len}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(indices, key=lambda i: -lengths[i]):
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
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
                   pad_multiple: int | Widths = 8) -> tuple[mx.array, mx.array, mx.array]:
    """tokens int32 [B, L], mask float32 [B, L], segments int32 [B, L]; padding gets
    segment id -1 (its own block, never a target). L: the longest row rounded up to
    pad_multiple, or a width of `Widths` (shape buckets)."""
    longest = max(sum(len(e.tokens) for e in row) for row in rows)
    width = as_widths(pad_multiple)(longest)
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


@dataclass(frozen=True)
class RowCost:
    """Model FLOPs of a batch's rows, for choosing between layouts of the same examples.

    Every position pays the linear layers (`per_token`). Attention pays per causal
    (query, key) pair it computes (`per_pair`): the whole row's pairs, since a kernel
    computes them all whether the mask then drops them or not, except where
    `skips_other_examples` (mlxtune.native's CPU kernel: a block of queries reads no key
    before the first one it can see), where a packed row costs its examples' own pairs.
    """

    per_token: float
    per_pair: float
    skips_other_examples: bool = False

    def of(self, rows: list[list[int]], lengths: list[int], pad_multiple: int | Widths,
           segmented: bool) -> float:
        """FLOPs of `rows` (lists of example indices) padded to the widest, rounded up to
        pad_multiple (or to a width of `Widths`); `segmented`: rows carry segment ids (a
        packed layout)."""
        longest = max(sum(lengths[i] for i in row) for row in rows)
        width = as_widths(pad_multiple)(longest)
        pairs = 0.0
        for row in rows:
            if segmented and self.skips_other_examples:
                # each example's own pairs, and the padding's among itself
                tail = width - sum(lengths[i] for i in row)
                pairs += sum(lengths[i] ** 2 for i in row) / 2 + tail * tail / 2
            else:
                pairs += width * width / 2
        return len(rows) * width * self.per_token + pairs * self.per_pair
