"""LoRA adapters: mlx-lm loads what mlxtune saves and computes the same logits."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxtune import adapters, models, quant
from mlxtune.config import AdapterConfig, ModelConfig, QuantizeConfig
from mlxtune.errors import ConfigError

TOKENS = mx.array([[1, 87, 85, 71, 84, 201, 74, 75, 261, 84, 71, 2, 201, 1, 67, 85]])


def _trained_looking(model, seed=1):
    """Give the adapter non-zero weights, as training would."""
    mx.random.seed(seed)
    new = [(k, mx.random.normal(v.shape) * 0.05) for k, v in
           tree_flatten(model.trainable_parameters())]
    model.load_weights(new, strict=False)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_quantized_model_dir"])
def test_mlx_lm_load_gives_same_logits(fixture, request, tmp_path):
    from mlx_lm import load as mlx_lm_load

    base = request.getfixturevalue(fixture)
    loaded = models.load(ModelConfig(path=str(base)))
    cfg = adapters.apply_lora(loaded.model, AdapterConfig(rank=4, alpha=8, targets=[]))
    _trained_looking(loaded.model)
    ours = loaded.model(TOKENS)
    adapters.save(loaded.model, cfg, tmp_path / "adapters")

    model, _ = mlx_lm_load(str(base), adapter_path=str(tmp_path / "adapters"))
    theirs = model(TOKENS)
    assert np.abs(np.array(ours) - np.array(theirs)).max() < 1e-4
    # The adapter really changes the output (the comparison is not vacuous).
    plain, _ = mlx_lm_load(str(base))
    assert np.abs(np.array(plain(TOKENS)) - np.array(theirs)).max() > 1e-3


def test_quantized_base_uses_dequantize_path_on_cpu(tiny_quantized_model_dir):
    loaded = models.load(ModelConfig(path=str(tiny_quantized_model_dir)))
    q = loaded.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, quant.DequantizedLinear)


def test_quantize_on_load_and_counts(tiny_model_dir):
    dense = models.load(ModelConfig(path=str(tiny_model_dir)))
    qlora = models.load(ModelConfig(path=str(tiny_model_dir),
                                    quantize=QuantizeConfig(format="affine", bits=4,
                                                            group_size=32)))
    assert quant.is_quantized(qlora.model) and not quant.is_quantized(dense.model)
    assert qlora.config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    for m in (dense.model, qlora.model):
        adapters.apply_lora(m, AdapterConfig(rank=4, targets=["q_proj", "v_proj"], layers=1))
    t_dense, total_dense = adapters.parameter_counts(dense.model)
    t_q, total_q = adapters.parameter_counts(qlora.model)
    # rank 4 on q (64->64) and v (64->32) of the last block only
    assert t_dense == t_q == 4 * (64 + 64) + 4 * (64 + 32)
    assert total_dense == total_q
    # Quantization error on random weights: 4-bit is rough, 8-bit nearly exact.
    q8 = models.load(ModelConfig(path=str(tiny_model_dir),
                                 quantize=QuantizeConfig(format="affine", bits=8, group_size=32)))
    d = np.array(dense.model(TOKENS)).ravel()
    assert np.corrcoef(d, np.array(qlora.model(TOKENS)).ravel())[0, 1] > 0.8
    assert np.corrcoef(d, np.array(q8.model(TOKENS)).ravel())[0, 1] > 0.999


def test_unknown_target_is_a_config_error(tiny_model_dir):
    loaded = models.load(ModelConfig(path=str(tiny_model_dir)))
    with pytest.raises(ConfigError, match="adapter.targets: 'qproj'.*available:.*self_attn.q_proj"):
        adapters.apply_lora(loaded.model, AdapterConfig(targets=["qproj"]))


def test_load_back_round_trip(tiny_model_dir, tmp_path):
    a = models.load(ModelConfig(path=str(tiny_model_dir)))
    cfg = adapters.apply_lora(a.model, AdapterConfig(rank=2, alpha=4, targets=["mlp.down_proj"]))
    _trained_looking(a.model)
    adapters.save(a.model, cfg, tmp_path)
    b = models.load(ModelConfig(path=str(tiny_model_dir)))
    adapters.load(b.model, tmp_path)
    assert np.allclose(np.array(a.model(TOKENS)), np.array(b.model(TOKENS)), atol=1e-6)
    adapters.set_enabled(b.model, False)
    plain = models.load(ModelConfig(path=str(tiny_model_dir)))
    assert np.allclose(np.array(plain.model(TOKENS)), np.array(b.model(TOKENS)), atol=1e-6)
