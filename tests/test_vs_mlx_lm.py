"""mlxtune's LoRA training step against mlx-lm's own, the reference: the same base, initial
adapter, batch and loss tokens must give the same loss and, after a few Adam steps, the same
adapter. This covers what mlxtune replaces in the step (on the CPU its native attention and
loss kernels, or the blockwise attention and fastmath loss, and the vectorised SwiGLU; the
chunked loss; summed-then-divided token losses); scripts/bench_vs_mlx_lm.py compares
the two trainers' speed and memory on real data."""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlxtune import adapters, attention, fastmath, forward, native, objectives
from mlxtune.config import AdapterConfig, TrainConfig
from mlxtune.train.optim import make_optimizer
from tiny import build_model, model_args

RANK, ALPHA = 4, 8.0
STEPS, LR = 3, 1e-2


def batch(vocab: int, lengths: list[int], offsets: list[int]):
    """Token rows padded to one width, and mlx-lm's (offset, length) pairs for them."""
    rng = np.random.default_rng(0)
    width = max(lengths) + 1
    tokens = np.zeros((len(lengths), width), dtype=np.int32)
    for row, n in enumerate(lengths):
        tokens[row, :n] = rng.integers(1, vocab, n)
    return mx.array(tokens), mx.array(np.array([offsets, lengths]).T)


def mlx_lm_mask(tokens: mx.array, spans: mx.array) -> mx.array:
    """mlx-lm's loss positions as mlxtune's mask: mask[:, i] says token i is a target, and
    mlx-lm's default_loss targets tokens offset .. length (1-based steps over targets)."""
    i = mx.arange(tokens.shape[1])[None, :]
    return (i >= spans[:, 0:1]) & (i <= spans[:, 1:])


def adapter_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


# "native": mlxtune.native's attention and loss kernels (the CPU default where they are
# built); "composed": the blockwise attention and fastmath loss built from MLX ops.
@pytest.mark.parametrize("kernels", ["native", "composed"])
@pytest.mark.parametrize("chunk", [0, 96], ids=["whole-head", "chunked-loss"])
def test_lora_steps_equal_mlx_lm(chunk, kernels, monkeypatch):
    if kernels == "native" and native._unavailable() is not None:
        pytest.skip(f"native kernels: {native._unavailable()}")
    args = model_args("llama")
    tokens, spans = batch(args["vocab_size"], [200, 150, 131], [20, 90, 5])
    mask = mlx_lm_mask(tokens, spans)
    keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

    # mlx-lm: its LoRA layers, its loss, its attention (MLX's) and activation, Adam. The
    # model module is shared: earlier tests may have routed its functions through mlxtune's.
    reference = build_model(args, seed=1)
    module = sys.modules[type(reference).__module__]
    for name in ("scaled_dot_product_attention", "swiglu"):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, getattr(fn, "_mlxtune_original", fn))
    reference.freeze()
    mx.random.seed(5)
    linear_to_lora_layers(reference, -1, {"rank": RANK, "scale": ALPHA / RANK,
                                          "dropout": 0.0, "keys": keys})
    initial = adapter_state(reference)
    ref_opt = optim.Adam(learning_rate=LR)
    ref_step = nn.value_and_grad(reference, default_loss)
    ref_losses = []
    for _ in range(STEPS):
        (loss, _), grads = ref_step(reference, tokens, spans)
        ref_opt.update(reference, grads)
        mx.eval(reference.parameters(), ref_opt.state)
        ref_losses.append(loss.item())

    # mlxtune: its LoRA layers from the same initial values, its loss and attention.
    model = build_model(args, seed=1)
    adapters.apply_lora(model, AdapterConfig(rank=RANK, alpha=ALPHA))
    model.load_weights(list({k: mx.array(v) for k, v in initial.items()}.items()), strict=False)
    monkeypatch.undo()
    monkeypatch.setenv("MLXTUNE_NATIVE", "1" if kernels == "native" else "0")
    assert attention.install(model) and fastmath.install(model)
    assert hasattr(module.scaled_dot_product_attention, "_mlxtune_original")
    assert hasattr(module.swiglu, "_mlxtune_original")
    opt = make_optimizer(TrainConfig(optimizer="adam", learning_rate=LR), STEPS)

    def loss_fn(m, t, k):
        s, n = objectives.sft(m, t, k, chunk=chunk)
        return s / n

    step = nn.value_and_grad(model, loss_fn)
    losses = []
    for _ in range(STEPS):
        loss, grads = step(model, tokens, mask)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        losses.append(loss.item())

    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    ours, theirs = adapter_state(model), adapter_state(reference)
    assert ours.keys() == theirs.keys() and len(ours) == 2 * len(keys) * args["num_hidden_layers"]
    moved = max(np.abs(theirs[k] - initial[k]).max() for k in theirs)
    assert moved > 10 * LR * 0.1  # the steps did change the adapter
    # Adam turns float32 rounding in a near-zero gradient into up to ~1e-5 of a step of
    # ~LR: the tolerance is 1% of a step. A loss on other tokens misses it by ~LR.
    for k in theirs:
        np.testing.assert_allclose(ours[k], theirs[k], atol=LR * 1e-2, rtol=0, err_msg=k)


@pytest.mark.parametrize("kernels", ["native", "composed"])
def test_mlxtunes_attention_and_loss_were_on_the_path(kernels, monkeypatch):
    """The comparison above is only worth something if mlxtune's step really ran its own
    attention (rows longer than a block) and loss: count their calls in one forward pass."""
    if kernels == "native" and native._unavailable() is not None:
        pytest.skip(f"native kernels: {native._unavailable()}")
    monkeypatch.setenv("MLXTUNE_NATIVE", "1" if kernels == "native" else "0")
    args = model_args("llama")
    model = build_model(args, seed=1)
    adapters.apply_lora(model, AdapterConfig(rank=RANK, alpha=ALPHA))  # a frozen head
    attention.install(model)
    calls = []
    watched = {"native": [(native.load(), "causal_attention"), (native.load(), "cross_entropy")],
               "composed": [(attention, "blockwise_attention"),
                            (forward, "_fast_cross_entropy")]}[kernels]
    for owner, name in watched:
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _o=original, _n=name, **k: (
            calls.append(_n) or _o(*a, **k)))
    tokens, spans = batch(args["vocab_size"], [200, 150, 131], [20, 90, 5])
    mx.eval(objectives.sft(model, tokens, mlx_lm_mask(tokens, spans), chunk=96)[0])
    attention_name, loss_name = (name for _, name in watched)
    assert calls.count(attention_name) == args["num_hidden_layers"]
    assert calls.count(loss_name) == 1
