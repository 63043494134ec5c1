"""The GPU profile (MLXTUNE_PROFILE=gpu): every backend-dependent choice as on Metal/CUDA,
computed on the CPU; and the numerics that must hold on both paths (float32 adapters,
quantization scales never rounded through bfloat16). docs/profiles.md lists each
GPU-only branch with the test that runs it."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxtune import adapters, attention, backend, fastmath, models, quant
from mlxtune.config import AdapterConfig, ModelConfig


def test_profile_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("MLXTUNE_PROFILE", raising=False)
    assert backend.profile() == "cpu" and not backend.gpu_profile()
    assert backend.compute_dtype() == mx.float32
    assert backend.plan_backend() == "cpu"
    monkeypatch.setenv("MLXTUNE_PROFILE", "GPU")
    assert backend.profile() == "gpu" and backend.gpu_profile()
    assert backend.compute_dtype() == mx.bfloat16
    assert backend.compute_dtype("float32") == mx.float32  # an explicit dtype is kept
    assert backend.plan_backend() == "metal"
    assert backend.name() == "cpu"  # the hardware is what it is
    assert backend.device_info()["profile"] == "gpu"
    monkeypatch.setenv("MLXTUNE_PROFILE", "tpu")
    with pytest.raises(ValueError, match="MLXTUNE_PROFILE='tpu'"):
        backend.profile()


def test_bad_profile_is_one_line_from_the_cli(monkeypatch, tmp_path, capsys):
    from mlxtune.cli import main

    monkeypatch.setenv("MLXTUNE_PROFILE", "tpu")
    (tmp_path / "c.yaml").write_text("model: {path: nowhere}\n")
    with pytest.raises(SystemExit) as e:
        main(["plan", str(tmp_path / "c.yaml")])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert "MLXTUNE_PROFILE" in err and len(err.splitlines()) == 1


def test_cpu_only_paths_are_off_under_the_gpu_profile(monkeypatch):
    from mlxtune.evaluate import generate
    from mlxtune.memory import tiers
    from mlxtune.train import streams

    for profile, cpu in (("cpu", True), ("gpu", False)):
        monkeypatch.setenv("MLXTUNE_PROFILE", profile)
        monkeypatch.delenv("MLXTUNE_FASTMATH", raising=False)
        assert fastmath.enabled() is cpu
        assert streams.resolve(3) == (3 if cpu else 1)
        assert (tiers.this_machine(usable_gb=8).backend == "cpu") is cpu


def _tiny_quantized(tiny_quantized_model_dir, dtype="auto"):
    return models.load(ModelConfig(path=str(tiny_quantized_model_dir), dtype=dtype))


def test_quantized_layers_keep_their_scales_and_compute_dtype(tiny_quantized_model_dir,
                                                               monkeypatch):
    from mlx_lm.utils import load_model

    stored, _ = load_model(tiny_quantized_model_dir)
    stored_scales = np.array(stored.model.layers[0].self_attn.q_proj.scales)
    ids = mx.array([[1, 5, 9, 200, 3, 7]])

    monkeypatch.setenv("MLXTUNE_PROFILE", "cpu")
    cpu = _tiny_quantized(tiny_quantized_model_dir).model
    q = cpu.model.layers[0].self_attn.q_proj
    assert type(q) is quant.DequantizedLinear  # dequantize-then-BLAS
    monkeypatch.setenv("MLXTUNE_PROFILE", "gpu")
    gpu = _tiny_quantized(tiny_quantized_model_dir).model
    q = gpu.model.layers[0].self_attn.q_proj
    # MLX's own quantized layer (its forward and backward), scales as stored (float32
    # here, never bfloat16), output in the compute dtype.
    assert isinstance(q, nn.QuantizedLinear) and not isinstance(q, quant.DequantizedLinear)
    assert q.scales.dtype == mx.float32
    np.testing.assert_array_equal(np.array(q.scales), stored_scales)
    x = mx.random.normal((3, q.weight.shape[1] * 32 // q.bits)).astype(mx.bfloat16)
    assert q(x).dtype == mx.bfloat16
    assert gpu(ids).dtype == mx.bfloat16
    # The whole model in float32 under the GPU profile is the CPU path's function.
    gpu32 = _tiny_quantized(tiny_quantized_model_dir, "float32").model
    np.testing.assert_allclose(np.array(gpu32(ids)), np.array(cpu(ids)), rtol=1e-5, atol=1e-5)


def test_float16_scales_are_not_rounded_through_bfloat16():
    """A GGUF's float16 scales kept as stored: the layer computes the file's function and
    rounds only its output to bfloat16. Rounding the scales to bfloat16 first (what
    cast_floats did) moves the output by about 2^-9 of the scales' values."""
    mx.random.seed(0)
    layer = nn.QuantizedLinear(256, 64, bias=False, group_size=32, bits=4)
    layer.scales = (mx.random.uniform(shape=layer.scales.shape) * 0.02 + 0.001
                    ).astype(mx.float16)
    layer.biases = (mx.random.normal(layer.biases.shape) * 0.01).astype(mx.float16)
    model = nn.Sequential(layer)
    exact = mx.dequantize(layer.weight, layer.scales.astype(mx.float32),
                          layer.biases.astype(mx.float32), group_size=32, bits=4)
    quant.cast_floats(model, mx.bfloat16)
    assert layer.scales.dtype == layer.biases.dtype == mx.float16
    assert quant.keep_compute_dtype(model, mx.bfloat16) == 1
    x = mx.random.normal((8, 256)).astype(mx.bfloat16)
    y = layer(x)
    assert y.dtype == mx.bfloat16
    want = (x.astype(mx.float32) @ exact.T)
    # Only the output's rounding to bfloat16 (2^-9 relative) separates the two.
    err = np.abs(np.array(y.astype(mx.float32)) - np.array(want))
    assert (err <= 2 ** -8 * np.abs(np.array(want)) + 1e-6).all()
    rounded = mx.quantized_matmul(x, layer.weight, layer.scales.astype(mx.bfloat16),
                                  layer.biases.astype(mx.bfloat16), transpose=True,
                                  group_size=32, bits=4).astype(mx.float32)
    assert np.abs(np.array(rounded) - np.array(want)).max() > 4 * err.max()


def test_lora_weights_and_a_loaded_adapter_stay_float32(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLXTUNE_PROFILE", "gpu")
    loaded = models.load(ModelConfig(path=str(tiny_model_dir)))
    model = loaded.model
    config = adapters.apply_lora(model, AdapterConfig(rank=4, alpha=8))
    weights = adapters.adapter_weights(model)
    assert weights and {w.dtype for w in weights.values()} == {mx.float32}
    ids = mx.array([[1, 5, 9, 200, 3, 7]])
    assert model(ids).dtype == mx.bfloat16
    # A trained float32 adapter is loaded without being cast down.
    new = {k: mx.random.normal(v.shape) * 0.1 for k, v in weights.items()}
    model.load_weights(list(new.items()), strict=False)
    adapters.save(model, config, tmp_path / "a")
    again = models.load(ModelConfig(path=str(tiny_model_dir))).model
    adapters.load(again, tmp_path / "a")
    for k, v in adapters.adapter_weights(again).items():
        assert v.dtype == mx.float32
        np.testing.assert_array_equal(np.array(v), np.array(new[k]))
    # Gradients (and so AdamW's state) are float32 too.
    loss = lambda m: m(ids).astype(mx.float32).sum()  # noqa: E731
    grads = nn.value_and_grad(model, loss)(model)[1]
    from mlx.utils import tree_flatten
    assert {g.dtype for _, g in tree_flatten(grads)} == {mx.float32}


def test_attention_goes_to_mlx_under_the_gpu_profile(tiny_model_dir, monkeypatch):
    """The routed attention calls MLX's scaled_dot_product_attention (the fused kernel on
    a GPU) under the GPU profile, mlxtune's CPU forms under the CPU profile."""
    calls = []
    real = attention.blockwise_attention
    monkeypatch.setattr(attention, "blockwise_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(attention, "native_attention", lambda *a, **k: None)
    long = mx.array([list(range(1, 200)) * 2])[:, :attention.BLOCK + 10]
    for profile, routed in (("gpu", False), ("cpu", True)):
        monkeypatch.setenv("MLXTUNE_PROFILE", profile)
        model = models.load(ModelConfig(path=str(tiny_model_dir), dtype="float32")).model
        calls.clear()
        mx.eval(model(long))
        assert bool(calls) is routed, profile
        if profile == "gpu":  # a GPU's attention computes a packed row's every pair
            assert attention.skips_other_examples(model, mx.float32) is False


def test_densified_generation_only_on_the_cpu_profile(tiny_quantized_model_dir, monkeypatch):
    from mlxtune.evaluate import generate

    for profile, dense in (("cpu", True), ("gpu", False)):
        monkeypatch.setenv("MLXTUNE_PROFILE", profile)
        model = _tiny_quantized(tiny_quantized_model_dir).model
        assert generate.should_densify(model, "auto", backend.compute_dtype()) is dense
