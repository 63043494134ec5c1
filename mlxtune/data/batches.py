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


class Widths:
    """The widths a batch's rows are padded to (data.shape_buckets), so that the compiled
    step sees few distinct shapes: each shape is traced and compiled on its first call.

    `per_doubling` 0: the longest row rounded up to `multiple` (one width per `multiple`
    tokens: up to 128 at 4,096). Otherwise the multiples of `multiple` up to
    per_doubling x multiple (the floor: 256 for 32 x 8), then `per_doubling` equal steps
    per doubling, each a multiple of `multiple` (256, 288, ..., 512, 576, ..., 1,024, 1,152,
    ...): a row rounds up by less than 1/per_doubling of its width past the floor, and
    there are at most per_doubling x (1 + log2(cap / floor)) widths. Never wider than
    `cap` rounded up to `multiple` (the widest row the layout makes, e.g. data.max_seq_len),
    which is itself a width."""

    def __init__(self, multiple: int, per_doubling: int = 0, cap: int | None = None):
        if multiple < 1 or per_doubling < 0:
            raise ValueError(f"bad widths: multiple {multiple}, per_doubling {per_doubling}")
        self.multiple, self.per_doubling = multiple, per_doubling
        self.cap = None if cap is None else round_up(cap, multiple)

    def __call__(self, longest: int) -> int:
        width = round_up(longest, self.multiple)
        if self.per_doubling and width > self.multiple * self.per_doubling:
            floor = self.multiple * self.per_doubling
            doubling = floor << max(0, (width - 1) // floor).bit_length() - 1
            step = doubling // self.per_doubling
            width = -(-width // step) * step
        if self.cap is not None and longest <= self.cap:
            width = min(width, self.cap)
        return width

    def all(self, up_to: int | None = None) -> list[int]:
        """Every width up to `up_to` (default: the cap), in order."""
        top = round_up(up_to, self.multiple) if up_to is not None else self.cap
        if top is None:
            raise ValueError("Widths.all needs up_to when there is no cap")
        out, w = [], self.multiple
        while w < top:
            out.append(self(w))
            w = out[-1] + 1
        return sorted(set(out + [self(top)]))

    def describe(self) -> str:
        if not self.per_doubling:
            return f"multiples of {self.multiple}"
        return (f"multiples of {self.multiple} to {self.multiple * self.per_doubling}, then "
                f"{self.per_doubling} per doubling")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def as_widths(pad: int | Widths) -> Widths:
    """A pad multiple (the old argument) as Widths; Widths as they are."""
    return pad if isinstance(pad, Widths) else Widths(max(1, int(pad)))


def collate(examples: list[Example], pad_id: int,
            pad_multiple: int | Widths = 8) -> tuple[mx.array, mx.array]:
    """tokens int32 [B, L] padded with pad_id, mask float32 [B, L] (0 on padding); L is the
    longest example rounded up to pad_multiple, or to a width of `Widths` (shape buckets),
    so compiled steps see few distinct shapes."""
    longest = max(len(e.tokens) for e in examples)
    width = as_widths(pad_multiple)(longest)
    tokens = np.full((len(examples), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(examples), width), dtype=np.float32)
    for row, e in enumerate(examples):
        tokens[row, : len(e.tokens)] = e.tokens
        mask[row, : len(e.mask)] = e.mask
    return mx.array(tokens), mx.array(mask)
