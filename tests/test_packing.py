"""Sequence packing and batch layouts: rows hold whole examples, and laying a batch's
examples out several to a row changes nothing but speed."""

import mlx.core as mx
import numpy as np
import pytest

from mlxtune import forward, objectives
from mlxtune.data.batcher import Batcher, decide_packing
from mlxtune.data.batches import collate
from mlxtune.data.encode import Example
from mlxtune.data.packing import RowCost, collate_packed, pack_rows, packed_batch_order
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


SMOL = RowCost(2 * 10e6, 4 * 576)  # a SmolLM2-like block, per token and per pair


def _examples(lengths):
    return [Example(list(range(1, n + 1)), [False] + [True] * (n - 1), "t") for n in lengths]


def _packing_pays(lengths, row_len, pad_multiple, cost=SMOL):
    unpacked = Batcher(_examples(lengths), 4, 0, 0, pad_multiple, "by_length", row_len,
                       cost=cost)
    return decide_packing("auto", unpacked)


def test_packing_pays_for_short_examples_not_for_full_rows():
    # Short examples padded to multiples of 32 waste much of each row; packed they do not.
    short = [int(x) for x in np.random.default_rng(0).integers(3, 40, size=400)]
    assert _packing_pays(short, 128, 32)
    # Rows that would hold one example each: packing only adds masking.
    assert not _packing_pays([1000 + (i % 20) for i in range(100)], 1024, 32)
    # Long rows of short examples: attention over the whole row costs more than the
    # padding that length-grouping (pad to 8) leaves...
    assert not _packing_pays(_lengths(400), 4096, 8)
    # ...unless the attention skips the other examples' keys (here with padding to 32).
    skipping = RowCost(SMOL.per_token, SMOL.per_pair, True)
    assert _packing_pays(_lengths(400), 4096, 32, skipping)
    assert not _packing_pays(_lengths(400), 4096, 32)
    assert decide_packing(True, Batcher([], 4, 0, 0, 8)) is True
    assert decide_packing(False, Batcher(_examples(short), 4, 0, 0, 32, row_len=128)) is False


def test_random_batches_cover_every_example_once_per_epoch():
    lengths = _lengths(50)
    b = Batcher(_examples(lengths), 4, seed=1, pad_id=0, pad_multiple=8, layout="random",
                row_len=128)
    for epoch in (0, 1):
        order = b.order(epoch)
        assert sorted(i for batch in order for i in batch) == list(range(50))
        assert [len(batch) for batch in order] == [4] * 12 + [2]
    assert b.order(0) != b.order(1)
    again = Batcher(_examples(lengths), 4, seed=1, pad_id=0, pad_multiple=8, layout="random",
                    row_len=128)
    assert again.order(0) == b.order(0)
    grouped = Batcher(_examples(lengths), 4, seed=1, pad_id=0, pad_multiple=8, row_len=128)
    # length-grouped batches are sorted runs; random ones mix lengths
    spread = [max(lengths[i] for i in x) - min(lengths[i] for i in x) for x in grouped.order(0)]
    mixed = [max(lengths[i] for i in x) - min(lengths[i] for i in x) for x in b.order(0)]
    assert sum(mixed) > 3 * sum(spread)


def test_random_batch_rows_by_cost():
    lengths = [900, 100, 50, 60]
    ex = _examples(lengths)
    skipping = Batcher(ex, 4, 0, 0, 32, "random", 1024, mix_row_len=4096,
                       cost=RowCost(SMOL.per_token, SMOL.per_pair, True))
    rows, segmented = skipping.rows([0, 1, 2, 3])
    assert segmented and rows == [[0, 1, 3, 2]]  # one row, longest first
    tokens, mask, segments = skipping.arrays([0, 1, 2, 3])
    assert tokens.shape == (1, 1120) and int(mask.sum().item()) == sum(lengths) - 4
    # Rows of max_seq_len: first fit, longest first.
    narrow = Batcher(ex, 4, 0, 0, 32, "random", 1024, cost=SMOL)
    assert narrow.rows([0, 1, 2, 3]) == ([[0, 1], [3, 2]], True)
    # Attention dear enough that a row of three costs more than three padded rows.
    dear = Batcher(_examples([200, 200, 200]), 3, 0, 0, 8, "random", 1024,
                   cost=RowCost(1.0, 1e6))
    assert dear.rows([0, 1, 2]) == ([[0], [1], [2]], False)
    assert len(dear.arrays([0, 1, 2])) == 2
    # Examples that cannot share a row stay one to a row, without segments.
    full = Batcher(_examples([1000, 1000]), 2, 0, 0, 8, "random", 1024, cost=SMOL)
    assert full.rows([0, 1]) == ([[0], [1]], False)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_random_batch_in_one_row_has_the_padded_loss_and_gradient(model_type):
    """The summed loss, its token count and its gradient of a random batch laid out in one
    row equal those of the same examples padded one to a row."""
    import mlx.nn as nn

    from mlxtune import adapters
    from mlxtune.config import AdapterConfig

    model = build_model(model_args(model_type))
    adapters.apply_lora(model, AdapterConfig(rank=4, targets=["q_proj", "v_proj", "down_proj"]))
    rng = np.random.default_rng(5)
    examples = [_example(rng, n) for n in (23, 5, 40, 11)]
    b = Batcher(examples, 4, 0, 0, 8, "random", 64, mix_row_len=256,
                cost=RowCost(SMOL.per_token, SMOL.per_pair, True))
    packed = b.arrays([0, 1, 2, 3])
    assert len(packed) == 3 and packed[0].shape[0] == 1
    padded = collate(examples, 0, 8)

    def loss(m, *arrays):
        total, n = objectives.sft(m, *arrays)
        return total / n, n

    grad = nn.value_and_grad(model, loss)
    (l1, n1), g1 = grad(model, *packed)
    (l2, n2), g2 = grad(model, *padded)
    assert n1.item() == n2.item()
    assert l1.item() == pytest.approx(l2.item(), rel=1e-5)
    from mlx.utils import tree_flatten
    for (k, a), (_, c) in zip(tree_flatten(g1), tree_flatten(g2)):
        np.testing.assert_allclose(np.array(a), np.array(c), rtol=1e-3, atol=1e-6, err_msg=k)


def test_training_batches_follow_the_config():
    from mlxtune import config
    from mlxtune.data.batcher import training_batches
    from mlxtune.data.preference import Pair, PairBatcher

    model_config = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}

    def batches(skips=True, pairs=False, **sections):
        cfg = config.from_dict({"model": {"path": "x"},
                                "data": {"train": "t.jsonl", "max_seq_len": 512,
                                         "packing": False, **sections.get("data", {})},
                                "train": {"batch_size": 4, **sections.get("train", {})}})
        items = _examples([100, 200, 300, 400])
        if pairs:
            items = [Pair(e, e, "t") for e in items]
        return training_batches(items, pairs, cfg.data, cfg.train, 0, 32, model_config, skips)

    b = batches()
    assert b.layout == "random" and b.mix_row_len == 2048 and b.cost.skips_other_examples
    assert batches(skips=False).mix_row_len == 512
    assert batches(train={"cpu_streams": 2}).mix_row_len == 512
    assert batches(train={"max_batch_tokens": 1000}).mix_row_len == 1000
    assert batches(train={"batch_size": 16}).mix_row_len == 4096  # MIX_ROW_CAP
    assert batches(data={"group_by_length": True}).layout == "by_length"
    assert batches(data={"packing": True}).layout == "packed"
    pairs = batches(pairs=True)
    assert isinstance(pairs, PairBatcher) and pairs.layout == "by_length"
    assert batches(pairs=True, data={"group_by_length": False}).layout == "random"
