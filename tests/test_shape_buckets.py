"""data.shape_buckets: every batch's row width comes from a bounded set of widths, the
padding stays under the set's step, the rows (and so the layout, the batches and the
steps) are those without buckets, and the padding changes no loss or gradient."""

import math

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten

from mlxtune import objectives
from mlxtune.data.batcher import Batcher, decide_packing, training_batches
from mlxtune.data.batches import Widths, collate
from mlxtune.data.encode import Example
from mlxtune.data.packing import RowCost
from mlxtune.train.events import read_events
from test_train import run_cli
from tiny import write_jsonl
from tests.tiny import build_model, model_args

SKIPPING = RowCost(2 * 10e6, 4 * 576, True)  # a SmolLM2-like block, the CPU's attention
PLAIN = RowCost(2 * 10e6, 4 * 576, False)


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [Example(rng.integers(1, 200, size=n).tolist(),
                    [False] + [bool(x) for x in rng.random(n - 1) > 0.3], "t") for n in lengths]


def _lengths(n, top, seed=0):
    """Log-uniform lengths from 8 to `top`, as chat data's (many short, a long tail)."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.exp(rng.uniform(math.log(8), math.log(top), size=n))]


@pytest.mark.parametrize("per_doubling", [1, 2, 4, 8])
def test_widths_are_a_bounded_set_with_bounded_padding(per_doubling):
    cap = 4001
    w = Widths(32, per_doubling, cap)
    every = w.all()
    floor = 32 * per_doubling
    assert every[-1] == 4032 == w(cap)  # the cap rounded up to 32, and no wider
    assert all(x % 32 == 0 for x in every) and every == sorted(set(every))
    assert len(every) <= per_doubling * (1 + math.ceil(math.log2(cap / floor))) + 1
    assert [x for x in every if x <= floor] == list(range(32, floor + 1, 32))
    plain = Widths(32, 0, cap)
    for n in range(1, cap + 1):
        width = w(n)
        assert width in every and width >= plain(n) == -(-n // 32) * 32
        # under the floor: multiples of 32, as without buckets; past it, less than
        # 1/per_doubling of the width (the step of its doubling) plus the 32-rounding
        if n <= floor:
            assert width == plain(n)
        else:
            assert width - n < max(32, width / per_doubling)
    assert len(plain.all()) == 4032 // 32
    with pytest.raises(ValueError):
        Widths(32, -1)


@pytest.mark.parametrize("layout,cost,mix", [("random", SKIPPING, 4096), ("random", PLAIN, 0),
                                             ("by_length", PLAIN, 0), ("packed", PLAIN, 0)])
def test_batches_take_bucket_widths_and_keep_their_rows(layout, cost, mix):
    """Over three epochs of 600 log-uniform examples: each batch's width is one of the
    set's, the distinct shapes are bounded by it, and the rows are those without buckets
    (the same examples in the same rows, the same order), only wider."""
    lengths = _lengths(600, 1024)
    examples = _examples(lengths)
    make = lambda b: Batcher(examples, 4, 1, 0, 32, layout, 1024, mix_row_len=mix,  # noqa: E731
                             cost=cost, buckets=b)
    plain, bucketed = make(0), make(8)
    shapes_plain, shapes_bucketed = set(), set()
    for epoch in range(3):
        assert plain.order(epoch) == bucketed.order(epoch)
        for batch in bucketed.order(epoch):
            rows, segmented = bucketed.rows(batch)
            assert (rows, segmented) == plain.rows(batch)
            n, width, seg = bucketed.shape(batch)
            arrays = bucketed.arrays(batch)
            assert arrays[0].shape == (n, width) and (len(arrays) == 3) == seg
            assert width in bucketed.row_widths(seg).all()
            assert width >= plain.shape(batch)[1]
            shapes_bucketed.add((n, width, seg))
            shapes_plain.add(plain.shape(batch))
    widths = {w for _, w, _ in shapes_bucketed}
    top = 4096 if mix else 1024
    assert len(widths) <= 8 * (1 + math.log2(top / 256)) + 1
    rows = {n for n, _, _ in shapes_bucketed}
    assert len(shapes_bucketed) <= len(widths) * len(rows) * 2
    assert len(shapes_bucketed) <= len(shapes_plain)
    if layout != "packed":  # packed rows are nearly full: few shapes either way
        assert len(shapes_bucketed) < len(shapes_plain)


def test_buckets_never_change_the_layout():
    """data.packing auto decides on widths rounded to 32, so buckets cannot flip it (which
    would change the batches, and the steps, of an epoch)."""
    from mlxtune import config

    model_config = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
                    "intermediate_size": 1536}
    for seed in range(4):
        examples = _examples(_lengths(300, 1024, seed), seed)
        layouts = set()
        for b in (0, 2, 4, 8):
            cfg = config.from_dict({"model": {"path": "x"},
                                    "data": {"train": "t.jsonl", "max_seq_len": 1024,
                                             "shape_buckets": b},
                                    "train": {"batch_size": 4, "seed": seed}})
            for skips in (True, False):
                batches = training_batches(examples, False, cfg.data, cfg.train, 0, 32,
                                           model_config, skips)
                assert batches.buckets == b
                layouts.add((skips, batches.layout))
        assert len(layouts) == 2  # one layout per attention path, whatever the buckets
    unpacked = Batcher(examples, 4, 0, 0, 32, "random", 1024, 4096, SKIPPING, buckets=4)
    same = Batcher(examples, 4, 0, 0, 32, "random", 1024, 4096, SKIPPING)
    assert decide_packing("auto", unpacked) == decide_packing("auto", same)
    assert unpacked.epoch_cost(False) == same.epoch_cost()
    assert unpacked.epoch_cost() > same.epoch_cost()  # the padding it adds, counted


@pytest.mark.parametrize("layout,cost,mix,row_len", [("random", SKIPPING, 1024, 256),
                                                     ("by_length", PLAIN, 0, 256),
                                                     ("packed", PLAIN, 0, 1024)])
def test_padding_changes_no_loss_or_gradient(layout, cost, mix, row_len):
    """The summed loss, its token count and the LoRA gradients of a batch are those
    without buckets (per_doubling 2: widths past 64 differ at these lengths)."""
    import mlx.nn as nn

    from mlxtune import adapters
    from mlxtune.config import AdapterConfig

    model = build_model(model_args("llama"))
    adapters.apply_lora(model, AdapterConfig(rank=4, targets=["q_proj", "v_proj", "down_proj"]))
    examples = _examples([140, 13, 41, 99, 66, 30, 120, 9], seed=3)
    make = lambda b: Batcher(examples, 4, 0, 0, 32, layout, row_len, mix_row_len=mix,  # noqa: E731,E501
                             cost=cost, buckets=b)
    plain, bucketed = make(0), make(2)
    grad = nn.value_and_grad(model, lambda m, *a: objectives.sft(m, *a))
    wider = 0
    for batch in plain.order(0):
        a, b = plain.arrays(batch), bucketed.arrays(batch)
        wider += b[0].shape[1] > a[0].shape[1]
        (s1, n1), g1 = grad(model, *a)
        (s2, n2), g2 = grad(model, *b)
        assert n1.item() == n2.item()
        assert s2.item() == pytest.approx(s1.item(), rel=1e-5)
        for (k, x), (_, y) in zip(tree_flatten(g1), tree_flatten(g2)):
            np.testing.assert_allclose(np.array(y), np.array(x), rtol=1e-3, atol=1e-5,
                                       err_msg=k)
    assert wider  # the test compares something


def test_collate_with_widths():
    ex = _examples([300, 10])
    tokens, mask = collate(ex, 7, Widths(32, 8))
    assert tokens.shape == (2, 320) and int(mask.sum().item()) == sum(sum(e.mask) for e in ex)
    assert collate(ex, 7, 32)[0].shape == (2, 320)
    tokens, _ = collate(_examples([520]), 7, Widths(32, 8, 1024))
    assert tokens.shape == (1, 576) and np.all(np.array(tokens)[0, 520:] == 7)


def test_a_run_with_buckets_trains_as_one_without(tmp_path, tiny_model_dir, capsys):
    """The same steps on the same examples: every train event's loss equal with
    data.shape_buckets 0 and 2 (whose widths differ from multiples of 32 past 64 tokens),
    and the batches line names the widths."""
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "amber", "violet", "tea", "map", "sky"]
    write_jsonl(tmp_path / "train.jsonl", [
        {"messages": [{"role": "user", "content": " ".join(rng.choice(words, rng.integers(3, 30)))},
                      {"role": "assistant",
                       "content": " ".join(rng.choice(words, rng.integers(2, 25)))}]}
        for _ in range(16)])
    cfg = {"name": "buckets", "model": {"path": str(tiny_model_dir)},
           "adapter": {"rank": 4, "alpha": 8},
           "data": {"train": "train.jsonl", "max_seq_len": 256},
           "train": {"iters": 4, "batch_size": 4, "learning_rate": 3e-3, "eval_every": 0,
                     "save_every": 0, "log_every": 1, "seed": 3},
           "eval": {"auto": False}}
    workdir = tmp_path
    losses = {}
    for b in (0, 2):
        cfg["data"]["shape_buckets"] = b
        path = workdir / f"config-{b}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        code, out = run_cli(["run", str(path), "--run-dir", str(workdir / f"run-{b}")], capsys)
        assert code == 0, out.err
        losses[b] = [e["loss"] for e in read_events(workdir / f"run-{b}")
                     if e["event"] == "train"]
        assert ("row widths: multiples of 32" + (", then 2 per doubling" if b else "")
                in out.err.replace(" to 64", ""))
    assert len(losses[0]) == 4
    np.testing.assert_allclose(losses[2], losses[0], rtol=1e-5)


def test_default_follows_the_profile(monkeypatch):
    """Unset, data.shape_buckets is 8 under the GPU profile and 0 on the CPU profile; a
    value given is kept."""
    from mlxtune import config

    cfg = config.from_dict({"model": {"path": "x"}, "data": {"train": "t.jsonl"}})
    assert cfg.data.shape_buckets is None
    model_config = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}
    examples = _examples([100, 200, 300, 400])

    def buckets():
        return training_batches(examples, False, cfg.data, cfg.train, 0, 32, model_config,
                                False).buckets

    monkeypatch.setenv("MLXTUNE_PROFILE", "cpu")
    assert buckets() == 0
    monkeypatch.setenv("MLXTUNE_PROFILE", "gpu")
    assert buckets() == 8
    cfg.data.shape_buckets = 3
    assert buckets() == 3
