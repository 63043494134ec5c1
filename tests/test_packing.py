"""Sequence packing: rows hold whole examples, and packing changes nothing but speed."""

import mlx.core as mx
import numpy as np
import pytest

from mlxtune import forward
from mlxtune.data.encode import Example
from mlxtune.data.packing import (collate_packed, pack_rows, packed_batch_order,
                                  packing_pays)
from tests.tiny import build_model, model_args


def _lengths(n=300, seed=0):
    return [int(x) for x in np.random.default_rng(seed).integers(3, 120, size=n)]


def test_rows_hold_every_example_once_and_fit():
    lengths = _lengths()
    rows = pack_rows(lengths, 128, seed=0, epoch=0)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    # first-fit-decreasing fills rows: close to the lower bound on the row count
    assert len(rows) <= 1.1 * sum(lengths) / 128 + 2


def test_order_is_a_function_of_seed_and_epoch():
    lengths = _lengths()
    a = packed_batch_order(lengths, 128, 4, seed=1, epoch=0)
    assert a == packed_batch_order(lengths, 128, 4, seed=1, epoch=0)
    assert a != packed_batch_order(lengths, 128, 4, seed=1, epoch=1)
    assert a != packed_batch_order(lengths, 128, 4, seed=2, epoch=0)
    assert sorted(i for b in a for r in b for i in r) == list(range(len(lengths)))


def test_an_example_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([10, 300], 256, 0, 0)


def test_collate_packed_segments_and_masks():
    a = Example([1, 2, 3], [False, True, True], "a")
    b = Example([4, 5], [False, True], "b")
    c = Example([6, 7, 8, 9], [True, True, True, True], "c")  # a text example
    tokens, mask, segments = collate_packed([[a, b], [c]], pad_id=0, pad_multiple=4)
    assert tokens.tolist() == [[1, 2, 3, 4, 5, 0, 0, 0], [6, 7, 8, 9, 0, 0, 0, 0]]
    assert segments.tolist() == [[0, 0, 0, 1, 1, -1, -1, -1], [0, 0, 0, 0, -1, -1, -1, -1]]
    # an example's first token is never a target, even when its own mask says so
    assert mask.tolist() == [[0, 1, 1, 0, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0]]


def _example(rng, n):
    toks = rng.integers(1, 200, size=n).tolist()
    mask = [False] + [bool(x) for x in rng.random(n - 1) > 0.4]
    return Example(toks, mask, "t")


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_packed_losses_equal_unpacked_losses(model_type):
    """Each example's summed loss is the same packed with others as alone."""
    model = build_model(model_args(model_type))
    rng = np.random.default_rng(3)
    examples = [_example(rng, n) for n in (7, 12, 5, 20, 9, 3)]
    lengths = [len(e.tokens) for e in examples]
    rows = pack_rows(lengths, 32, seed=0, epoch=0)
    tokens, mask, segments = collate_packed([[examples[i] for i in r] for r in rows], 0)
    losses = forward.chunked_token_losses(model, tokens[:, :-1], tokens[:, 1:],
                                          segments[:, :-1], chunk=16) * mask[:, 1:]
    seg = np.array(segments[:, 1:])
    for r, row in enumerate(rows):
        for s, i in enumerate(row):
            packed = float(np.array(losses[r])[seg[r] == s].sum())
            t = mx.array(examples[i].tokens)[None]
            m = mx.array(examples[i].mask, dtype=mx.float32)[None]
            alone = forward.chunked_token_losses(model, t[:, :-1], t[:, 1:], chunk=0) * m[:, 1:]
            assert packed == pytest.approx(alone.sum().item(), rel=1e-4, abs=1e-4)


def test_packing_pays_for_short_examples_not_for_full_rows():
    flops, attention = 2 * 10e6, 4 * 576  # a SmolLM2-like block, per token and per pair
    # Short examples padded to multiples of 32 waste much of each row; packed they do not.
    short = [int(x) for x in np.random.default_rng(0).integers(3, 40, size=400)]
    assert packing_pays(short, 128, 4, flops, attention, pad_multiple=32)
    # Rows that would hold one example each: packing only adds masking.
    full = [1000 + (i % 20) for i in range(100)]
    assert not packing_pays(full, 1024, 4, flops, attention, pad_multiple=32)
    # Long rows of short examples: attention over the whole row costs more than the
    # padding that bucketing (pad to 8) leaves.
    assert not packing_pays(_lengths(400), 4096, 4, flops, attention, pad_multiple=8)
