"""The memory planner (mlxtune.memory): each item's arithmetic, checked by hand or against
what MLX actually allocates for a loaded model; the verdicts, hints, guard and CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def make_cfg(model_path: str, **sections):
    from mlxtune import config

    raw = {"name": "m", "model": {"path": model_path}, "data": {"train": "x.jsonl"}}
    for key, value in sections.items():
        raw[key] = value
    return config.from_dict(raw)


def shape(**over):
    from mlxtune.memory.shapes import ModelShape

    args = dict(name="t", model_type="llama", hidden_size=64, num_layers=2,
                intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
                vocab_size=300, tie_embeddings=True)
    args.update(over)
    return ModelShape(**args)


LLAMA8B = "meta-llama/Llama-3.1-8B-Instruct"


# ------------------------------------------------------------------------------ storage


def test_bytes_per_format_by_hand():
    from mlxtune.memory import storage as S

    rows, cols = 256, 4096
    n = rows * cols
    assert S.nbytes(S.DENSE, rows, cols, 4) == 4 * n
    assert S.nbytes(S.DENSE, rows, cols, 2) == 2 * n
    # affine 4-bit, group 64: half a byte per weight + a scale and a bias per 64 weights
    assert S.nbytes(S.affine(4, 64), rows, cols, 2) == n // 2 + 2 * (n // 64) * 2
    assert S.nbytes(S.affine(4, 64), rows, cols, 4) == n // 2 + 2 * (n // 64) * 4
    assert S.nbytes(S.affine(8, 32), rows, cols, 2) == n + 2 * (n // 32) * 2
    # nf4: 4-bit codes, an int8 absmax per 64, a float32 scale per 256 absmaxes, an offset
    assert S.nbytes(S.NF4, rows, cols, 2) == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    # q6_k: 4 + 2 bits, an int8 scale per 16 and a float16 d per 256
    assert S.nbytes(S.Q6_K, rows, cols, 2) == n * 6 // 8 + n // 16 + 2 * (n // 256)
    assert S.bits_per_weight(S.affine(4, 64), 2) == pytest.approx(4.5)
    assert S.bits_per_weight(S.NF4, 2) == pytest.approx(4.127, abs=1e-3)
    assert S.bits_per_weight(S.Q6_K, 2) == pytest.approx(6.5625)


def test_gguf_types_map_to_the_layouts_the_loader_uses():
    from mlxtune.memory import storage as S
    from mlxtune.quant import layouts

    for name, bits in layouts.AFFINE_TYPES.items():
        assert S.from_gguf_type(name) == S.affine(bits, 32)
    assert S.from_gguf_type("Q6_K") == S.Q6_K
    for name in ("F32", "F16", "BF16", "Q2_K", "Q3_K", "IQ4_XS"):
        assert S.from_gguf_type(name) == S.DENSE
    assert S.from_gguf_type("Q4_0", two_d=False) == S.DENSE
    # On disk Q4_K is 4.5 bits; in memory MLX affine with a scale and bias per 32.
    assert S.gguf_file_bytes("Q4_K", 256) == 144


# ------------------------------------------------------------------------------ shapes


def test_catalogue_shapes_match_published_parameter_counts():
    from mlxtune.memory import catalogue

    for repo, published in catalogue.PUBLISHED_PARAMETERS.items():
        got = catalogue.lookup(repo).parameters()
        # keras-hub counts Gemma 3's embedding with 262144 rows, the hub config 262208
        assert got == pytest.approx(published, rel=5e-5), repo
    assert catalogue.lookup("Qwen/Qwen2.5-7B-Instruct").hidden_size == 3584
    q = catalogue.lookup("mlx-community/Llama-3.2-3B-Instruct-4bit")
    assert q.quantization == {"group_size": 64, "bits": 4} and q.num_layers == 28
    assert catalogue.lookup("someone/unknown-model") is None
    for repo in catalogue.names():
        assert "huggingface.co" in catalogue.lookup(repo).source


def test_shape_from_config_defaults_and_multimodal_wrapper():
    from mlxtune.errors import ModelError
    from mlxtune.memory.shapes import from_config

    s = from_config({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                     "intermediate_size": 128, "num_attention_heads": 4,
                     "vocab_size": 100}, "x", "here")
    assert (s.num_kv_heads, s.head_dim, s.tie_embeddings) == (4, 16, True)
    g = from_config({"model_type": "gemma3", "text_config": {
        "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
        "vocab_size": 100}}, "g", "here")
    assert g.model_type == "gemma3_text" and g.head_dim == 32 and g.qk_norm
    q = from_config({"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 1,
                     "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 10,
                     "quantization": {"group_size": 32, "bits": 4}}, "q", "here")
    assert q.attention_bias and q.quantization["bits"] == 4
    with pytest.raises(ModelError, match="here: config has no hidden_size"):
        from_config({"num_hidden_layers": 2}, "x", "here")


@pytest.mark.parametrize("config", [
    {"model_type": "llama"}, {"model_type": "qwen2"},
    {"model_type": "llama", "sliding_window": 8,
     "layer_types": ["full_attention", "sliding_attention"]},
    {"model_type": "gemma3_text", "sliding_window": 8, "sliding_window_pattern": 2,
     "head_dim": 16, "query_pre_attn_scalar": 16}])
def test_plain_kv_cache_as_the_decoder_finds_it(config):
    """The planner's plain_kv_cache (GRPO's shared prompts) from config.json alone agrees
    with mlxtune.decode.batchable on the model mlx_lm builds from the same config."""
    import importlib

    from mlxtune import decode
    from mlxtune.memory.shapes import from_config

    config = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
              "rms_norm_eps": 1e-5, **config}
    family = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = family.Model(family.ModelArgs.from_dict(config))
    assert from_config(config, "x", "here").plain_kv_cache == decode.batchable(model)


def test_shape_of_a_folder_matches_the_loaded_model(tiny_model_dir):
    from mlxtune import models
    from mlxtune.config import ModelConfig
    from mlxtune.memory.shapes import resolve

    s = resolve(ModelConfig(path=str(tiny_model_dir)))
    loaded = models.load(ModelConfig(path=str(tiny_model_dir)))
    from mlxtune import adapters

    assert s.parameters() == adapters.parameter_counts(loaded.model)[1]


# ------------------------------------------------------------------------------ weights


def _resident(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize("quantize", [None, {"format": "affine", "bits": 4, "group_size": 32},
                                      {"format": "nf4"}])
def test_base_weight_bytes_equal_what_the_loader_allocates(tiny_model_dir, quantize):
    from mlxtune import config, models
    from mlxtune.memory import weights
    from mlxtune.memory.shapes import resolve

    cfg = make_cfg(str(tiny_model_dir), model={"path": str(tiny_model_dir),
                                               "quantize": quantize})
    planned = weights.base_weights(resolve(cfg.model), cfg.model, 4)
    loaded = models.load(cfg.model)
    assert sum(w.nbytes for w in planned) == _resident(loaded.model)
    assert config  # the Config type is the one run uses


def test_base_weight_bytes_of_a_quantized_folder(tiny_quantized_model_dir):
    from mlxtune import models
    from mlxtune.config import ModelConfig
    from mlxtune.memory import weights
    from mlxtune.memory.shapes import resolve

    m = ModelConfig(path=str(tiny_quantized_model_dir))
    planned = weights.base_weights(resolve(m), m, 4)
    assert {w.format.label() for w in planned if w.kind != "vector"} == {"affine 4-bit/g32"}
    assert sum(w.nbytes for w in planned) == _resident(models.load(m).model)
    # a request to quantize an already quantized base is ignored, as the loader does
    m2 = ModelConfig(path=str(tiny_quantized_model_dir))
    from mlxtune.config import QuantizeConfig

    m2.quantize = QuantizeConfig(format="nf4")
    assert weights.base_weights(resolve(m2), m2, 4) == planned


def test_mixed_gguf_is_planned_tensor_by_tensor(tmp_path):
    from gguf import GGMLQuantizationType as T

    from mlxtune import models
    from mlxtune.config import ModelConfig
    from mlxtune.memory import weights
    from mlxtune.memory.shapes import resolve
    from tiny import build_model, byte_level_tokenizer, model_args
    from tiny_gguf import write_gguf

    args = model_args("llama", hidden_size=256, intermediate_size=512,
                      num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / "mixed.gguf"
    types = {"q_proj": T.Q4_K, "k_proj": T.Q5_K, "v_proj": T.Q8_0, "o_proj": T.Q4_0,
             "down_proj": T.Q6_K, "gate_proj": T.Q5_0, "up_proj": T.F16,
             "embed_tokens": T.Q4_1}
    write_gguf(path, build_model(args), args, byte_level_tokenizer(), types=types)
    m = ModelConfig(path=str(path))
    s = resolve(m)
    assert {t.type for t in s.tensors} >= {"Q4_K", "Q5_K", "Q8_0", "Q4_0", "Q6_K", "Q5_0",
                                           "F16", "Q4_1", "F32"}
    planned = weights.base_weights(s, m, 4)
    labels = weights.summary(planned)
    assert {"affine 4-bit/g32", "affine 5-bit/g32", "affine 8-bit/g32", "q6_k",
            "dense"} <= set(labels)
    assert sum(w.nbytes for w in planned) == _resident(models.load(m).model)


# ------------------------------------------------------------------------------ adapter


def test_adapter_gradient_and_optimizer_items(tiny_model_dir):
    from mlxtune import adapters, models
    from mlxtune.memory.estimate import estimate, workload
    from mlxtune.memory.shapes import resolve

    for targets, layers in (([], -1), (["q_proj", "v_proj"], 1)):
        cfg = make_cfg(str(tiny_model_dir), adapter={"rank": 4, "targets": targets,
                                                     "layers": layers})
        w = workload(cfg, resolve(cfg.model), "cpu")
        loaded = models.load(cfg.model)
        adapters.apply_lora(loaded.model, cfg.adapter)
        trainable = adapters.parameter_counts(loaded.model)[0]
        assert w.lora_parameters == trainable
        items = estimate(w).items
        assert items["LoRA adapter"] == 4 * trainable
        assert items["gradients"] == 4 * trainable
        assert items["optimizer state"] == 2 * 4 * trainable  # Adam: two states
    s = shape()
    sgd = make_cfg("x", train={"optimizer": "sgd", "momentum": 0.0, "grad_accumulation": 2})
    w = workload(sgd, s, "metal")
    items = estimate(w).items
    assert items["optimizer state"] == 0
    # accumulated + micro; float32 like the adapter whatever the compute dtype (bfloat16)
    assert items["gradients"] == 2 * 4 * w.lora_parameters
    assert items["LoRA adapter"] == 4 * w.lora_parameters
    with pytest.raises(Exception, match="'wq' is not a linear layer"):
        workload(make_cfg("x", adapter={"targets": ["wq"]}), s, "cpu")


def test_dora_items_count_magnitudes_norms_and_saved_outputs(tiny_model_dir):
    """DoRA: the trainable count is the trainer's (A, B and m), the base's row norms are
    kept beside them, every one float32; the layers' outputs kept for m's gradient add
    to the activations; the same config as LoRA otherwise."""
    from mlxtune import adapters, models
    from mlxtune.memory.estimate import estimate, features, workload
    from mlxtune.memory.shapes import resolve

    for targets, layers in (([], -1), (["q_proj", "v_proj"], 1)):
        cfg = make_cfg(str(tiny_model_dir), adapter={"type": "dora", "rank": 4,
                                                     "targets": targets, "layers": layers})
        w = workload(cfg, resolve(cfg.model), "metal")
        loaded = models.load(cfg.model)
        adapters.apply(loaded.model, cfg.adapter)
        trainable = adapters.parameter_counts(loaded.model)[0]
        assert w.lora_parameters == trainable
        norms = sum(m.weight_norm_sq.size for _, m in adapters.lora_layers(loaded.model))
        assert w.adapter_frozen_parameters == norms
        items = estimate(w).items
        assert items["LoRA adapter"] == 4 * (trainable + norms)
        assert items["gradients"] == 4 * trainable
        lora = workload(make_cfg(str(tiny_model_dir), adapter={"rank": 4, "targets": targets,
                                                               "layers": layers}),
                        resolve(cfg.model), "metal")
        assert features(w)["saved_dora"] > 0 and features(lora)["saved_dora"] == 0
        assert estimate(w).items["activations"] > estimate(lora).items["activations"]


# ------------------------------------------------------------------------------ activations


def test_rows_positions_dtype_and_ranks():
    from mlxtune.errors import ConfigError
    from mlxtune.memory.estimate import workload

    s = shape()
    cfg = make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 100},
                   train={"batch_size": 4})
    w = workload(cfg, s, "metal")
    assert (w.rows, w.width, w.positions, w.dtype) == (4, 128, 127, "bfloat16")
    assert workload(cfg, s, "cpu").dtype == "float32"
    assert workload(make_cfg("x", model={"path": "x", "dtype": "float16"}), s,
                    "cpu").dtype == "float16"
    assert workload(cfg, s, "metal", ranks=2).rows == 2
    with pytest.raises(ConfigError, match="not divisible by 3 ranks"):
        workload(cfg, s, "metal", ranks=3)
    dpo = make_cfg("x", objective={"type": "dpo"}, train={"batch_size": 4})
    w = workload(dpo, s, "metal", ranks=2)
    assert w.rows == 4 and w.reference_pass  # 2 pairs per rank = 4 rows


def test_max_batch_tokens_plans_one_micro_batch():
    from mlxtune.memory.estimate import estimate, workload

    s = shape()

    def w(**train):
        return workload(make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 256},
                                 train={"batch_size": 8, **train}), s, "metal")

    whole, split = w(), w(max_batch_tokens=600)
    assert (whole.rows, split.rows) == (8, 2)  # whole rows of 256 tokens, at least one
    assert w(max_batch_tokens=100).rows == 1
    assert w(max_batch_tokens=4096).rows == 8
    assert estimate(split).items["activations"] == pytest.approx(
        estimate(whole).items["activations"] / 4)
    # the gradients of the micro-batches are summed: a second copy of them
    assert estimate(split).items["gradients"] == 2 * estimate(whole).items["gradients"]
    pairs = workload(make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 256},
                              objective={"type": "dpo"},
                              train={"batch_size": 4, "max_batch_tokens": 600}), s, "metal")
    assert pairs.rows == 2  # one pair (two rows) per micro-batch


def test_activation_items_scale_as_they_should():
    from mlxtune.memory.estimate import estimate, features, workload

    s = shape(num_layers=8)

    def items(**train):
        cfg = make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 256},
                       train={"batch_size": 2, **train})
        return estimate(workload(cfg, s, "metal")).items

    one, two = items(), items(batch_size=4)
    for k in ("activations", "attention", "logits and loss"):
        assert two[k] == pytest.approx(2 * one[k], rel=0.02), k  # linear in the batch
    assert two["base weights"] == one["base weights"]
    ck = items(grad_checkpoint=True)
    assert ck["activations"] < 0.5 * one["activations"]
    assert ck["logits and loss"] == one["logits and loss"]
    # Only the adapted blocks keep activations: the last 2 of 8.
    last2 = make_cfg("x", adapter={"layers": 2}, data={"train": "x.jsonl",
                                                       "max_seq_len": 256},
                     train={"batch_size": 2})
    f_all = features(workload(make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 256},
                                       train={"batch_size": 2}), s, "metal"))
    f_two = features(workload(last2, s, "metal"))
    assert f_two["saved_ffn"] == pytest.approx(f_all["saved_ffn"] / 4)
    # bfloat16 on a Mac: half the bytes of float32 for the fitted arrays
    cfg = make_cfg("x", model={"path": "x", "dtype": "float32"},
                   data={"train": "x.jsonl", "max_seq_len": 256})
    f32 = features(workload(cfg, s, "metal"))
    bf16 = features(workload(make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 256}),
                             s, "metal"))
    assert bf16["saved_d"] == pytest.approx(f32["saved_d"] / 2)
    assert bf16["logits"] == f32["logits"]  # the loss is computed in float32 either way


def test_attention_scores_materialised_blockwise_or_fused():
    from mlxtune.memory.estimate import estimate, workload

    s = shape()
    cfg = make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 256})  # 255 positions
    mac = workload(cfg, s, "metal")
    assert mac.score_columns == 255  # every query against every key
    cpu = workload(cfg, s, "cpu", kernels="mlx")
    try:
        from mlxtune import attention
    except ImportError:
        attention = None
    if attention is not None and attention.BLOCK == 128:
        # a block of 128 queries sees 128 keys, the next 127 queries see 255
        assert cpu.score_columns == pytest.approx((128 * 128 + 127 * 255) / 255)
    # mlxtune's CPU kernels: the native attention keeps no scores and no mask (float32);
    # a bfloat16 step keeps the blockwise form
    native = workload(cfg, s, "cpu", kernels="cpu")
    assert native.native_attention and native.score_columns == 0
    assert estimate(native).items["attention"] == 0
    half = workload(make_cfg("x", model={"path": "x", "dtype": "bfloat16"},
                             data={"train": "x.jsonl", "max_seq_len": 256}), s, "cpu",
                    kernels="cpu")
    assert not half.native_attention and half.score_columns == cpu.score_columns
    fused = workload(cfg, s, "metal", attention="fused")
    assert fused.score_columns == 0 and estimate(fused).items["attention"] == 0
    # MLX's causal mask when materialised: positions^2 booleans
    assert estimate(mac).items["attention"] > 255 * 255


def test_logits_full_or_chunked_and_the_packing_mask():
    from mlxtune.memory.estimate import estimate, features, workload

    s = shape(vocab_size=1000)
    small = workload(make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 512},
                              train={"batch_size": 4, "loss_chunk": 2048}), s, "cpu",
                     kernels="mlx")
    assert small.tokens == 4 * 511 and not small.chunked
    assert features(small)["logits"] == 4 * 511 * 1000 * 4  # float32
    big = workload(make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 1024},
                            train={"batch_size": 4}), s, "cpu", kernels="mlx")
    assert big.chunked and features(big)["logits_chunked"] == 4 * 1023 * 1000 * 4
    never = workload(make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 1024},
                              train={"batch_size": 4, "loss_chunk": 0}), s, "cpu")
    assert not never.chunked and not never.cpu_loss
    assert features(never)["logits"] == 4 * 1023 * 1000 * 4
    # mlxtune's CPU kernels, whatever the batch: the native cross-entropy's scratch
    # (min(256, 64 MB / 4V) rows of V logits and two hidden-sized rows) in float32,
    # fastmath's 64 positions of logits in bfloat16
    for cfg in (small, big):
        for dtype, scratch in (("float32", 256 * (1000 + 2 * 64) * 4), ("bfloat16", 64 * 1000 * 4)):
            fast = workload(make_cfg("x", model={"path": "x", "dtype": dtype},
                                     data={"train": "x.jsonl", "max_seq_len": cfg.width},
                                     train={"batch_size": 4}), s, "cpu", kernels="cpu")
            f = features(fast)
            assert f["logits_cpu"] == scratch and f["logits"] == f["logits_chunked"] == 0
    packed = workload(make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 256,
                                          "packing": True}, train={"batch_size": 3}), s, "cpu")
    assert estimate(packed).items["packing mask"] == 3 * 255 * 255
    dpo = workload(make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 256,
                                       "packing": True},
                            objective={"type": "orpo"}), s, "cpu")
    assert not dpo.packed  # preference pairs are never packed
    # SFT's random batches may lay examples out several to a row: their mask is planned;
    # length-grouped batches hold one example a row.
    for grouped, masked in ((None, True), (False, True), (True, False)):
        w = workload(make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 256,
                                         "group_by_length": grouped},
                              train={"batch_size": 3}), s, "cpu")
        assert (estimate(w).items["packing mask"] == 3 * 255 * 255) is masked, grouped


def test_dequantization_transients_only_on_the_cpu_path():
    from mlxtune.memory.estimate import estimate, features, workload

    s = shape(hidden_size=256, intermediate_size=512, num_heads=4, head_dim=64,
              vocab_size=1024)
    cfg = make_cfg("x", model={"path": "x", "quantize": {"format": "affine", "bits": 4,
                                                         "group_size": 64}})
    # MLX's ops on a CPU dequantize for every product; the CPU kernels' fitted count is
    # held with checkpointing (depth-first it fitted 0 without)
    assert estimate(workload(cfg, s, "cpu", kernels="mlx")).items["dequantization (CPU)"] > 0
    ckpt = make_cfg("x", model={"path": "x", "quantize": {"format": "affine", "bits": 4,
                                                          "group_size": 64}},
                    train={"grad_checkpoint": True})
    on_cpu = features(workload(ckpt, s, "cpu", kernels="cpu"))
    assert on_cpu["dequant_block_ckpt"] > 0
    assert not any(v for k, v in features(workload(cfg, s, "metal")).items()
                   if k.startswith("dequant"))
    assert estimate(workload(cfg, s, "metal")).items["dequantization (CPU)"] == 0
    assert estimate(workload(make_cfg("x"), s, "cpu")).items["dequantization (CPU)"] == 0


def test_reference_pass_for_dpo_only():
    from mlxtune.memory.estimate import estimate, workload

    s = shape()
    b = estimate(workload(make_cfg("x", objective={"type": "dpo"}), s, "cpu"))
    assert b.reference_pass is not None and b.peak >= sum(b.items.values())
    assert estimate(workload(make_cfg("x", objective={"type": "orpo"}), s,
                             "cpu")).reference_pass is None


# ------------------------------------------------------------------------------ tiers


def test_tiers_usable_memory_and_verdicts():
    from mlxtune.memory import tiers

    t = {m.name: m for m in tiers.tiers()}
    assert t["32"].usable_bytes == int(32 * 2**30 * 2 / 3)
    assert t["64"].usable_bytes == int(64 * 2**30 * 3 / 4)
    assert t["128"].usable_bytes == 96 * 2**30
    assert all(m.backend == "metal" for m in t.values())
    assert tiers.verdict(90, 100) == "fits"
    assert tiers.verdict(90.1, 100) == "tight"
    assert tiers.verdict(100, 100) == "tight"
    assert tiers.verdict(100.1, 100) == "no"
    here = tiers.this_machine()
    import mlx.core as mx

    from mlxtune import backend

    if backend.name() == "cpu":
        assert here.usable_bytes == mx.get_memory_limit()
    assert tiers.this_machine(12.5).usable_bytes == 12_500_000_000


def test_plan_json_and_hints_that_do_fit():
    from mlxtune import memory
    from mlxtune.memory import tiers

    cfg = make_cfg(LLAMA8B, data={"train": "x.jsonl", "max_seq_len": 2048},
                   train={"batch_size": 2})
    plan = memory.plan(cfg, usable_gb=16)
    d = plan.to_dict()
    assert set(d["tiers"]) == {"32", "64", "128"}
    assert set(d["tiers"].values()) <= {"fits", "tight", "no"}
    assert d["peak_gb"] == pytest.approx(sum(d["breakdown"].values()), abs=0.01)
    assert d["compute_dtype"] == "bfloat16" and d["model"]["parameters"] == 8_030_261_248
    json.dumps(d)
    for f in plan.tiers + [plan.here]:
        assert f.verdict == tiers.verdict(f.breakdown.peak, f.machine.usable_bytes)
        for h in f.hints:  # every single-knob hint, applied, makes the plan fit
            if "together" in h.text:
                continue
            applied = memory.fit(memory.with_changes(cfg, {h.key: h.value}), f.machine,
                                 plan.shape, with_hints=False)
            assert applied.verdict == "fits", h.text
    assert plan.tiers[0].verdict == "no" and plan.tiers[0].hint is not None


def test_editing_one_knob_flips_a_verdict():
    from mlxtune import memory

    def verdict32(**train):
        cfg = make_cfg(LLAMA8B, data={"train": "x.jsonl", "max_seq_len": 2048},
                       train={"batch_size": 1, **train},
                       model={"path": LLAMA8B, "quantize": {"format": "affine", "bits": 4}})
        return memory.plan(cfg, usable_gb=100).tiers[0].verdict

    assert verdict32() != "fits"
    assert verdict32(grad_checkpoint=True) == "fits"


# ------------------------------------------------------------------------------ CLI, run


def test_plan_command_json_and_text(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "c", "model": {"path": LLAMA8B},
                                   "data": {"train": "t.jsonl", "max_seq_len": 1024}}))
    out = subprocess.run([sys.executable, "-m", "mlxtune", "plan", str(cfg), "--json",
                          "--set", "train.batch_size=2", "--ranks", "2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert {"peak_gb", "breakdown", "tiers"} <= set(d) and d["ranks"] == 2
    assert all(isinstance(v, float) for v in d["breakdown"].values())
    text = subprocess.run([sys.executable, "-m", "mlxtune", "plan", str(cfg)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert text.returncode == 0 and "32 GB Mac" in text.stdout and "this machine" in text.stdout
    bad = subprocess.run([sys.executable, "-m", "mlxtune", "plan", str(cfg), "--set",
                          "train.batch_size=3", "--ranks", "2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "not divisible by 2 ranks" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_run_refuses_a_plan_that_does_not_fit_and_can_be_told_to_try(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    cfg = tmp_path / "big.yaml"
    cfg.write_text(yaml.safe_dump({"name": "big", "model": {"path":
                                                            "meta-llama/Llama-3.1-70B-Instruct"},
                                   "data": {"train": "t.jsonl", "max_seq_len": 4096}}))
    out = subprocess.run([sys.executable, "-m", "mlxtune", "run", str(cfg), "--run-dir",
                          str(tmp_path / "r")], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2, out.stderr
    line = out.stderr.strip()
    assert "\n" not in line and "predicted peak" in line and "--ignore-memory-plan" in line
    assert not (tmp_path / "r").exists()


def test_start_event_carries_the_planned_peak(tmp_path, tiny_model_dir, monkeypatch):
    # MLX's ops, whose counts were fitted on models this small; mlxtune's CPU kernels add
    # a few MB that their counts, fitted at real sizes, do not plan (docs/memory.md)
    monkeypatch.setenv("MLXTUNE_FASTMATH", "0")
    monkeypatch.setenv("MLXTUNE_NATIVE", "0")
    from mlxtune import config
    from mlxtune.run import run
    from mlxtune.train.events import read_events

    rows = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "alpha beta " * 40}]}
            for _ in range(8)]
    write_jsonl(tmp_path / "t.jsonl", rows)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "name": "c", "model": {"path": str(tiny_model_dir)}, "adapter": {"rank": 4},
        "data": {"train": "t.jsonl", "max_seq_len": 64, "packing": False},
        "train": {"iters": 3, "batch_size": 4, "eval_every": 0, "save_every": 0,
                  "log_every": 1}, "eval": {"auto": False}}))
    run_dir, _ = run(config.load(path), tmp_path / "run", quiet=True, evaluate=False)
    events = read_events(run_dir)
    planned = events[0]["planned_peak_gb"]
    measured = max(e["peak_memory_gb"] for e in events if e["event"] == "train")
    assert isinstance(planned, float) and planned > 0
    assert math.isclose(planned, measured, rel_tol=0.25), (planned, measured)


def test_hub_shape_from_the_local_cache_before_the_catalogue(tmp_path, monkeypatch):
    from mlxtune.memory.shapes import from_hub

    repo = "meta-llama/Llama-3.1-8B-Instruct"
    snap = tmp_path / "hub" / "models--meta-llama--Llama-3.1-8B-Instruct"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("abc123")
    folder = snap / "snapshots" / "abc123"
    folder.mkdir(parents=True)
    config = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 3,
              "intermediate_size": 256, "num_attention_heads": 4, "vocab_size": 1000}
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    s = from_hub(repo, download=False)
    assert s.hidden_size == 128 and "config.json" in s.source  # the cache wins
    s = from_hub("meta-llama/Llama-3.2-1B-Instruct", download=False)
    assert s.hidden_size == 2048 and "catalogue" in s.source
    from mlxtune.errors import ModelError

    with pytest.raises(ModelError, match="not in the local Hugging Face cache nor in"):
        from_hub("nobody/nothing-7B", download=False)


def test_this_machine_uses_the_reported_working_set(monkeypatch):
    from mlxtune import backend
    from mlxtune.memory import tiers

    monkeypatch.setattr(backend, "device_info", lambda: {
        "backend": "metal", "max_recommended_working_set_size": 51_539_607_552})
    m = tiers.this_machine()
    assert m.usable_bytes == 51_539_607_552 and "working_set" in m.rule


def test_a_starting_adapter_sets_the_rank_and_dpo_keeps_a_frozen_copy(tmp_path):
    from mlxtune.memory.estimate import estimate, workload

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": 1,
        "lora_parameters": {"rank": 2, "scale": 2.0, "keys": ["self_attn.q_proj"]}}))
    s = shape()
    sft = workload(make_cfg("x", model={"path": "x", "adapter": str(folder)},
                            adapter={"rank": 64}), s, "metal")
    assert (sft.rank, sft.adapted_layers, len(sft.lora_modules)) == (2, 1, 1)
    assert sft.lora_parameters == 2 * (64 + 64)  # q_proj of one block: 64 -> 64
    dpo = workload(make_cfg("x", model={"path": "x", "adapter": str(folder)},
                            objective={"type": "dpo"}), s, "metal")
    assert estimate(dpo).items["LoRA adapter"] == 2 * estimate(sft).items["LoRA adapter"]


def test_the_guard_adds_the_measured_margin(monkeypatch):
    """mlxtune run's guard refuses a plan whose peak fits only without the planner's
    margin (its largest measured under-prediction), and passes it with the margin at 0."""
    from mlxtune import memory
    from mlxtune.memory import calibration

    cfg = make_cfg(str(ROOT / "tests"), data={"train": "x.jsonl", "max_seq_len": 256})
    s = shape()
    monkeypatch.setattr(memory, "resolve_shape", lambda _m: s)
    peak = memory.fit(cfg, memory.tiers_mod.this_machine(), s, with_hints=False).peak_gb
    kernels = memory.fit(cfg, memory.tiers_mod.this_machine(), s,
                         with_hints=False).breakdown.workload.kernels
    usable = peak * 1.05  # fits, and is not even tight... without a 10% margin
    monkeypatch.setitem(calibration.GUARD_MARGIN, kernels, 0.10)
    with pytest.raises(memory.MemoryPlanError, match="10% margin"):
        memory.guard(cfg, usable_gb=usable, hints=False)
    monkeypatch.setitem(calibration.GUARD_MARGIN, kernels, 0.0)
    assert memory.guard(cfg, usable_gb=usable, hints=False).peak_gb == pytest.approx(peak)


def test_grpo_plans_the_groups_and_the_rollout(monkeypatch):
    """grpo: a step trains prompts x group_size rows; the rollout before it holds the KV
    cache of every row (prompt + completion, every layer, keys and values, with room for
    the decoder's compaction copy) and the sampling's [rows, vocab] arrays; the peak is the
    larger of the two, and mlxtune run's guard refuses a rollout that does not fit."""
    from mlxtune import memory
    from mlxtune.memory.estimate import CACHE_COMPACTION, estimate, workload

    s = shape(vocab_size=1000)
    grpo = {"type": "grpo", "group_size": 8, "max_completion_tokens": 64, "top_p": 0.9,
            "rewards": [{"name": "json_valid"}]}
    cfg = make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 256},
                   train={"batch_size": 4}, objective=grpo)
    w = workload(cfg, s, "metal")
    assert w.grpo and w.rows == w.rollout_rows == 32 and w.completion_tokens == 64
    b = estimate(w)
    kv = 32 * 255 * s.num_layers * 2 * s.kv_dim * 2 * CACHE_COMPACTION  # bfloat16
    sampling = 32 * 1000 * 4 * 4  # logits, probabilities, sorted, cumulative (top_p < 1)
    resident = sum(b.items[k] for k in ("base weights", "LoRA adapter", "optimizer state"))
    assert b.rollout > resident + kv + sampling
    assert b.peak == max(sum(b.items.values()), b.rollout)
    # The step computes each prompt once for its group: 4 prompts of at most 256 - 1 - 64
    # positions less their last token, 32 rows of 64 + 1; in every adapted block the
    # prompts' keys and values repeated for the group, and joined to the rows' own.
    assert w.shared_prompts and w.tokens == 4 * (191 - 1) + 32 * 65
    assert b.items["attention"] >= s.num_layers * 32 * (190 + 190 + 65) * 2 * s.kv_dim * 2
    # Scores: the prompts' pass causal over 190 positions, the rows' 65 queries over the
    # prompt's 190 keys and their own 65 (materialised on Metal unless fused).
    assert w.attention_scores == s.num_heads * (4 * 190 * 190 + 32 * 65 * 255)
    from dataclasses import replace
    assert replace(w, attention="fused").attention_scores == 0
    # Rows cut into parts (train.max_batch_tokens), or a family whose cache is not a plain
    # KV cache: every row computes its prompt, as an SFT batch of as many rows.
    sft = estimate(workload(make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 256,
                                                "group_by_length": True},
                                     train={"batch_size": 32}), s, "metal"))
    for whole in (workload(make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 256},
                                    train={"batch_size": 4, "max_batch_tokens": 10 ** 6},
                                    objective=grpo), s, "metal"),
                  workload(cfg, shape(vocab_size=1000, plain_kv_cache=False), "metal")):
        assert not whole.shared_prompts and whole.tokens == 32 * 255
        step = sum(estimate(whole).items.values())
        assert step == pytest.approx(sum(sft.items.values()))  # same rows
        assert sum(b.items.values()) < step
    # beta > 0 (or several iterations per rollout): a scoring pass before the step
    assert b.reference_pass is None
    scored = estimate(workload(make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 256},
                                        train={"batch_size": 4},
                                        objective={**grpo, "beta": 0.04}), s, "metal"))
    assert scored.reference_pass is not None
    # a long rollout on a small machine: refused before anything loads
    big = make_cfg(str(ROOT / "tests"), data={"train": "x.jsonl", "max_seq_len": 8192},
                   train={"batch_size": 16},
                   objective={**grpo, "group_size": 16, "max_completion_tokens": 4096})
    monkeypatch.setattr(memory, "resolve_shape", lambda _m: shape(vocab_size=50000))
    here = memory.fit(big, memory.tiers_mod.this_machine(), shape(vocab_size=50000),
                      with_hints=False)
    assert here.breakdown.rollout > 0
    with pytest.raises(memory.MemoryPlanError):
        memory.guard(big, usable_gb=here.breakdown.rollout / 1e9 * 0.9, hints=False)


def test_this_machine_is_planned_with_the_kernels_a_run_takes(monkeypatch):
    """The CPU profile with fastmath on and the native kernels expected: mlxtune's CPU
    kernels and their counts; MLXTUNE_FASTMATH=0, the kernels unavailable, the GPU
    profile or a Mac: MLX's ops."""
    from mlxtune import native
    from mlxtune.memory import calibration
    from mlxtune.memory.estimate import coefficients_for, workload
    from mlxtune.memory.workload import cpu_kernels

    cfg = make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 256})
    monkeypatch.delenv("MLXTUNE_FASTMATH", raising=False)
    monkeypatch.setattr(native, "expected", lambda: True)
    assert cpu_kernels("cpu") == "cpu" and cpu_kernels("metal") == "mlx"
    w = workload(cfg, shape(), "cpu")
    assert w.kernels == "cpu" and coefficients_for(w) is calibration.COEFFICIENTS_CPU
    monkeypatch.setattr(native, "expected", lambda: False)
    assert cpu_kernels("cpu") == "mlx"
    monkeypatch.setattr(native, "expected", lambda: True)
    monkeypatch.setenv("MLXTUNE_FASTMATH", "0")
    assert cpu_kernels("cpu") == "mlx"
    monkeypatch.delenv("MLXTUNE_FASTMATH")
    monkeypatch.setenv("MLXTUNE_PROFILE", "gpu")
    assert cpu_kernels("cpu") == "mlx"
    assert coefficients_for(workload(cfg, shape(), "metal")) is calibration.COEFFICIENTS
    with pytest.raises(ValueError, match="kernels"):
        workload(cfg, shape(), "cpu", kernels="fast")


def test_cpu_kernels_count_a_quantized_head_once_and_gelu_mlps():
    """On the CPU kernels a quantized tied head is one [vocab, hidden] float32 copy for
    the loss (head_dense), not among the blocks' dequantized copies; a GELU MLP (Gemma)
    keeps its own count of [positions, ffn] arrays per adapted block, SwiGLU none."""
    from mlxtune.memory.estimate import features, workload

    q4 = {"format": "affine", "bits": 4, "group_size": 64}
    s = shape(vocab_size=4096, hidden_size=256, intermediate_size=512, num_heads=4,
              head_dim=64)
    cfg = make_cfg("x", model={"path": "x", "quantize": q4},
                   data={"train": "x.jsonl", "max_seq_len": 256})
    f = features(workload(cfg, s, "cpu", kernels="cpu"))
    assert f["head_dense"] == 4096 * 256 * 4
    assert f["dequant_max"] == 512 * 256 * 4  # the largest block matrix, not the head
    mlx = features(workload(cfg, s, "cpu", kernels="mlx"))
    assert mlx["head_dense"] == 0 and mlx["dequant_max"] == 4096 * 256 * 4
    plain = make_cfg("x", data={"train": "x.jsonl", "max_seq_len": 256})
    assert features(workload(plain, s, "cpu", kernels="cpu"))["saved_gelu"] == 0
    gemma = features(workload(plain, shape(model_type="gemma3_text", vocab_size=4096,
                                           hidden_size=256, intermediate_size=512,
                                           num_heads=4, head_dim=64), "cpu", kernels="cpu"))
    assert gemma["saved_gelu"] == 2 * (4 * 255) * 4 * 512  # blocks x tokens x bytes x ffn


def test_a_checkpointed_cpu_step_holds_one_of_its_two_phases():
    """The CPU kernels' checkpointed step: the loss phase (the quantized head's copy) and
    the recomputation phase do not overlap; the estimate counts the larger alone."""
    from mlxtune.memory.calibration import COEFFICIENTS_CPU
    from mlxtune.memory.estimate import (LOSS_PHASE, RECOMPUTE_PHASE, estimate, features,
                                         fixed_bytes, workload)

    q4 = {"format": "affine", "bits": 4, "group_size": 64}
    s = shape(vocab_size=32768, hidden_size=256, intermediate_size=512, num_heads=4,
              head_dim=64)
    cfg = make_cfg("x", model={"path": "x", "quantize": q4},
                   data={"train": "x.jsonl", "max_seq_len": 256},
                   train={"grad_checkpoint": True})
    w = workload(cfg, s, "cpu", kernels="cpu")
    f, c = features(w), COEFFICIENTS_CPU
    loss = sum(c[k] * f[k] for k in LOSS_PHASE)
    recompute = sum(c[k] * f[k] for k in RECOMPUTE_PHASE)
    assert loss > 0 and recompute > 0
    everything = sum(fixed_bytes(w).values()) + sum(c[k] * v for k, v in f.items())
    assert sum(estimate(w).items.values()) == pytest.approx(everything - min(loss, recompute))
    no_ckpt = workload(make_cfg("x", model={"path": "x", "quantize": q4},
                                data={"train": "x.jsonl", "max_seq_len": 256}), s, "cpu",
                       kernels="cpu")
    f2 = features(no_ckpt)
    b = estimate(no_ckpt)
    assert b.items["logits and loss"] == pytest.approx(
        sum(c[k] * f2[k] for k in ("logits", "logits_chunked") + LOSS_PHASE))


@pytest.mark.parametrize("setting", ["auto", True, False])
def test_grpo_plans_the_dense_copy_a_run_computes_with(monkeypatch, setting):
    """objective.dense_base (grpo): where the run dequantizes its quantized base once
    (auto: the CPU profile, a copy under a quarter of the memory), the plan counts the base
    dense, in the compute dtype, and says so; planned for a Mac, auto keeps it quantized."""
    from mlxtune import backend
    from mlxtune.memory.estimate import workload

    monkeypatch.setattr(backend, "profile", lambda: "cpu")
    monkeypatch.setattr(backend, "system_memory_bytes", lambda: 64 << 30)
    q4 = {"format": "affine", "bits": 4, "group_size": 32}
    grpo = {"type": "grpo", "group_size": 4, "rewards": [{"name": "json_valid"}],
            "dense_base": setting}
    s = shape()
    here = workload(make_cfg("x", model={"path": "x", "quantize": q4}, objective=grpo),
                    s, "cpu")
    mac = workload(make_cfg("x", model={"path": "x", "quantize": q4}, objective=grpo),
                   s, "metal")
    sft = workload(make_cfg("x", model={"path": "x", "quantize": q4}), s, "cpu")
    dense = workload(make_cfg("x"), s, "cpu")
    assert any(w.quantized for w in sft.weights)
    assert not any(w.quantized for w in dense.weights)
    assert here.weights == (dense.weights if setting is not False else sft.weights)
    assert mac.weights != dense.weights or setting is True
    assert any("dense_base" in n for n in here.notes) == (setting is not False)
    # auto: not when the copy would take a quarter of the memory or more
    monkeypatch.setattr(backend, "system_memory_bytes",
                        lambda: 4 * sum(w.nbytes for w in dense.weights if w.kind != "vector"))
    small = workload(make_cfg("x", model={"path": "x", "quantize": q4}, objective=grpo),
                     s, "cpu")
    assert (small.weights == dense.weights) == (setting is True)
