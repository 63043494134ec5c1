"""The quantized layers (CPU path): products and their VJP against float64 numpy on the
reference dequantization; LoRA on top; NF4 for dense bases; embeddings."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxtune import quant
from mlxtune.adapters import LoRALinear
from mlxtune.quant import QuantEmbedding, QuantLinear, formats, layouts

OUT, IN = 96, 512


def make_layer(fmt: str, bias: bool = False, seed: int = 0):
    """(layer, float64 reference weight from the numpy references)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((OUT, IN)) * 0.05).astype(np.float32)
    if fmt == "nf4":
        arrays = layouts.nf4_from_dense(w)
        ref = formats.nf4_dequantize(layouts.nf4_to_reference(arrays))
    else:
        raw = formats.quantize(w, "Q6_K")
        arrays = layouts.gguf_q6_k(raw, w.shape)
        ref = formats.dequantize_raw(raw, "Q6_K", w.shape)
    b = mx.array(rng.standard_normal(OUT).astype(np.float32)) if bias else None
    return QuantLinear(fmt, arrays, IN, OUT, b), ref.astype(np.float64)


@pytest.mark.parametrize("fmt", ["nf4", "q6_k"])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_vjp_against_float64(fmt, bias):
    layer, w = make_layer(fmt, bias)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 7, IN)).astype(np.float32)
    g = rng.standard_normal((3, 7, OUT)).astype(np.float32)
    y, vjp = mx.vjp(layer, [mx.array(x)], [mx.array(g)])
    expected = x.astype(np.float64) @ w.T
    if bias:
        expected += np.array(layer.bias, np.float64)
    np.testing.assert_allclose(np.array(y[0]), expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.array(vjp[0]), g.astype(np.float64) @ w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("fmt", ["nf4", "q6_k"])
def test_lora_gradients_against_float64(fmt):
    base, w = make_layer(fmt)
    lora = LoRALinear(base, rank=4, scale=2.0)
    rng = np.random.default_rng(2)
    a = rng.standard_normal((IN, 4)).astype(np.float32) * 0.1
    b = rng.standard_normal((4, OUT)).astype(np.float32) * 0.1
    lora.lora_a, lora.lora_b = mx.array(a), mx.array(b)
    x = rng.standard_normal((5, IN)).astype(np.float32)
    g = rng.standard_normal((5, OUT)).astype(np.float32)

    def loss(params, x):
        lora.update(params)
        return (lora(x) * mx.array(g)).sum()

    value, grads = mx.value_and_grad(loss)(lora.trainable_parameters(), mx.array(x))
    x64, g64, a64, b64 = (v.astype(np.float64) for v in (x, g, a, b))
    y64 = x64 @ w.T + 2.0 * (x64 @ a64) @ b64
    np.testing.assert_allclose(float(value), (y64 * g64).sum(), rtol=1e-5)
    np.testing.assert_allclose(np.array(grads["lora_a"]), 2.0 * x64.T @ (g64 @ b64.T),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(grads["lora_b"]), 2.0 * (x64 @ a64).T @ g64,
                               rtol=1e-4, atol=1e-5)
    from mlx.utils import tree_flatten

    assert {k for k, _ in tree_flatten(grads)} == {"lora_a", "lora_b"}  # packed base frozen


def test_input_gradient_through_compile():
    layer, w = make_layer("nf4")
    x = mx.array(np.random.default_rng(3).standard_normal((4, IN)).astype(np.float32))
    grad = mx.compile(mx.grad(lambda x: layer(x).sum()))(x)
    np.testing.assert_allclose(np.array(grad), np.tile(w.sum(0), (4, 1)), rtol=1e-4, atol=1e-4)


def test_geometry_and_counts_for_lora():
    layer, _ = make_layer("q6_k")
    assert quant.linear_geometry(layer) == (OUT, IN, mx.float32)
    lora = LoRALinear(layer, rank=8, scale=1.0)
    assert lora.lora_a.shape == (IN, 8) and lora.lora_a.dtype == mx.float32
    assert quant.dense_size(layer) == OUT * IN


def test_embedding_rows_and_tied_output():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((50, 128)).astype(np.float32)
    emb = QuantEmbedding.from_embedding(_embedding(w))
    ref = formats.nf4_dequantize(formats.nf4_quantize(w))
    ids = mx.array([[1, 49, 0], [7, 7, 30]])
    np.testing.assert_allclose(np.array(emb(ids)), ref[np.array(ids)], rtol=1e-6, atol=1e-7)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    np.testing.assert_allclose(np.array(emb.as_linear(mx.array(x))),
                               x.astype(np.float64) @ ref.T.astype(np.float64),
                               rtol=1e-5, atol=1e-5)


def _embedding(w):
    e = nn.Embedding(*w.shape)
    e.weight = mx.array(w)
    return e


def test_quantize_nf4_model_and_train_a_step(tiny_model_dir):
    from mlx_lm.utils import load_model

    from mlxtune.adapters import apply_lora
    from mlxtune.config import AdapterConfig

    from mlx.utils import tree_flatten

    model, _ = load_model(tiny_model_dir)
    reference, _ = load_model(tiny_model_dir)
    ids = mx.array([[3, 17, 42, 99, 5, 8, 120, 7]])
    # The reference: a dense model holding the numpy reference's NF4 round trip.
    reference.load_weights([
        (k, mx.array(formats.nf4_dequantize(formats.nf4_quantize(np.array(v)))))
        for k, v in tree_flatten(reference.parameters())
        if v.ndim == 2 and v.shape[-1] % 64 == 0 and ".layers." in k], strict=False)
    n = quant.quantize_nf4(model)
    assert n == 2 * 7                # 7 linears per block, 2 blocks; embedding kept
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert quant.is_quantized(model)
    quant.cast_floats(model, mx.float32)
    expected = np.array(reference(ids))
    np.testing.assert_allclose(np.array(model(ids)), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())

    apply_lora(model, AdapterConfig(rank=4, alpha=8.0))
    model.train()

    def loss_fn(model):
        logits = model(ids[:, :-1])
        return nn.losses.cross_entropy(logits, ids[:, 1:]).mean()

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    names = [k for k, _ in tree_flatten(grads)]
    assert names and all(k.endswith(("lora_a", "lora_b")) for k in names)
    assert np.isfinite(float(loss))
    assert any(float(mx.abs(v).max()) > 0 for _, v in tree_flatten(grads))


def test_cast_floats_leaves_packed_state_alone():
    layer, _ = make_layer("q6_k", bias=True)
    model = nn.Sequential(layer)
    quant.cast_floats(model, mx.bfloat16)
    assert layer.d.dtype == mx.float16 and layer.scales.dtype == mx.int8
    assert layer.bias.dtype == mx.bfloat16 and layer.dtype == mx.bfloat16


def test_config_nf4_quantizes_a_dense_base_on_load(tiny_model_dir):
    from mlxtune.config import ModelConfig, QuantizeConfig
    from mlxtune.models import load

    loaded = load(ModelConfig(path=str(tiny_model_dir), quantize=QuantizeConfig(format="nf4")))
    assert isinstance(loaded.model.model.layers[1].self_attn.q_proj, QuantLinear)
    assert loaded.config["quantization_formats"]["model.layers.0.mlp.down_proj"] == "nf4"
    assert "model.embed_tokens" not in loaded.config["quantization_formats"]
    assert "quantization" not in loaded.config


def _compiled_backward_peak(fmt: str, n_layers: int, D: int = 512) -> int:
    rng = np.random.default_rng(6)
    layers = []
    for _ in range(n_layers):
        w = (rng.standard_normal((D, D)) * 0.05).astype(np.float32)
        if fmt == "affine":
            lin = nn.Linear(D, D, bias=False)
            lin.weight = mx.array(w)
            q = lin.to_quantized(group_size=64, bits=4)
            q.__class__ = quant.DequantizedLinear
            layers.append(q)
        else:
            arrays = layouts.nf4_from_dense(w) if fmt == "nf4" else \
                layouts.gguf_q6_k(formats.quantize(w, "Q6_K"), w.shape)
            layers.append(QuantLinear(fmt, arrays, D, D))
    x = mx.array(rng.standard_normal((8, D)).astype(np.float32))
    mx.eval([m.parameters() for m in layers], x)

    def f(x):
        for m in layers:
            x = mx.tanh(m(x))
        return x.sum()

    grad = mx.compile(mx.grad(f))
    mx.eval(grad(x))
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(grad(x))
    return mx.get_peak_memory() - base


@pytest.mark.parametrize("fmt", ["nf4", "q6_k", "affine"])
def test_no_dense_weights_pile_up_in_a_compiled_backward(fmt):
    """A layer's dense weight lives only around its own product: the peak of a compiled
    forward + backward does not grow with the number of quantized layers (without
    mx.depends in the VJP it grew by one dense weight per layer)."""
    dense = 512 * 512 * 4
    growth = _compiled_backward_peak(fmt, 16) - _compiled_backward_peak(fmt, 4)
    assert growth < 2 * dense      # 12 more layers; piling up would add >= 12 * dense
