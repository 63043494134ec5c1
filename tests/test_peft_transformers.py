"""The PEFT export, loaded by transformers + peft, moves the logits as mlxtune's adapter does.

Two bases: the packaged SmolLM2 GGUF (llama family: llama.cpp's converter interleaves the
Q/K rows, and transformers' GGUF reader and mlxtune's loader both undo that, so the
exported lora_B rows must be in Hugging Face order), read by transformers itself with
`from_pretrained(dir, gguf_file=...)`; and a tiny qwen2 written by the test as a Hugging
Face folder (q/k/v biases, untied output head). For each: base + adapter in mlxtune
(LoRALinear at run time) and in transformers (PeftModel.from_pretrained on the exported
folder); the shift of the next-token logits must agree, correlation >= 0.999 and slope
within 2% of 1, over >= 100 positions. An export with the lora_B rows of Q and K in
llama.cpp's order is checked too and must fail, so the test can see that mistake.

Marked `peft` (and slow): pip install torch==2.13.0 (the CPU build here) and
pip install -e '.[peft-test]', then pytest -m peft. MLXTUNE_REQUIRE_EXTRAS=1 (CI) turns a
missing torch / peft into a failure instead of a skip.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from export_helpers import make_run, mlxtune_logits, shift_agreement

from mlxtune.export import export

pytestmark = [pytest.mark.slow, pytest.mark.peft]


def need(module: str):
    if os.environ.get("MLXTUNE_REQUIRE_EXTRAS"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def transformers_logits(model, peft_dir: Path | None, tokens: list[int]):
    """(base logits, adapted logits) from transformers (+ peft), float32, positions x vocab."""
    torch = need("torch")
    peft = need("peft")
    x = torch.tensor([tokens])
    model.eval()
    with torch.no_grad():
        plain = model(x).logits[0].float().numpy()
        adapted = None
        if peft_dir is not None:
            wrapped = peft.PeftModel.from_pretrained(model, str(peft_dir))
            wrapped.eval()
            adapted = wrapped(x).logits[0].float().numpy()
            wrapped.unload()   # the base model back, without the LoRA layers
    return plain, adapted


def check_against_transformers(base_model, mlx_base: Path, run: Path, peft_dir: Path,
                               tokens: list[int], name: str):
    assert len(tokens) >= 100
    plain, adapted = mlxtune_logits(mlx_base, run / "adapters", tokens)
    hf_plain, hf_adapted = transformers_logits(base_model, peft_dir, tokens)
    base_corr, _ = shift_agreement(plain, hf_plain)
    assert base_corr > 0.9999, base_corr            # the same base on both sides
    ours, theirs = adapted - plain, hf_adapted - hf_plain
    assert ours.std() > 0.1 * plain.std()           # the adapter moves the logits
    corr, slope = shift_agreement(ours, theirs)
    print(f"\n{name}: {len(tokens)} positions, shift correlation {corr:.7f} (1 - corr = "
          f"{1 - corr:.1e}), slope {slope:.5f}")
    assert corr >= 0.999 and abs(slope - 1) <= 0.02, (corr, slope)
    return corr, slope


def permuted_copy(peft_dir: Path, out: Path, heads: int, kv_heads: int) -> Path:
    """The export with Q/K's lora_B rows in llama.cpp's interleaved order: the mistake."""
    from safetensors.numpy import load_file, save_file

    from mlxtune.export.lora import Base, to_gguf_rows

    base = Base("x", "gguf", "x", "llama", "llama", heads, kv_heads, 0)
    weights = load_file(str(peft_dir / "adapter_model.safetensors"))
    for k, v in weights.items():
        for key in ("self_attn.q_proj", "self_attn.k_proj"):
            if f".{key}.lora_B" in k:
                weights[k] = np.ascontiguousarray(to_gguf_rows(v, key, base))
    out.mkdir()
    save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text((peft_dir / "adapter_config.json").read_text())
    return out


@pytest.fixture(scope="module")
def smollm2_hf():
    """The packaged SmolLM2 GGUF as transformers reads it (dequantized to float32)."""
    transformers = need("transformers")
    need("torch")
    from mlxtune.models import packaged_path

    path = packaged_path("smollm2-135m-instruct")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype="float32")
    return path, model


def test_peft_export_in_transformers_smollm2(smollm2_hf, tmp_path):
    """Every linear layer of all 30 blocks adapted; llama family (Q/K order)."""
    from test_export import LONG_TEXT

    from mlxtune import models
    from mlxtune.config import ModelConfig

    _, model = smollm2_hf
    base = "smollm2-135m-instruct"   # the packaged short name: the export names the hub id
    run = make_run(tmp_path / "run", base, rank=8, alpha=16.0, b_scale=0.05)
    peft_dir = export(run, "peft", tmp_path / "peft").path
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    tokens = models.load(ModelConfig(path=base)).tokenizer.encode(LONG_TEXT)[:128]
    check_against_transformers(model, base, run, peft_dir, tokens, "SmolLM2-135M (GGUF)")
    wrong = permuted_copy(peft_dir, tmp_path / "wrong", model.config.num_attention_heads,
                          model.config.num_key_value_heads)
    with pytest.raises(AssertionError):
        check_against_transformers(model, base, run, wrong, tokens, "SmolLM2, Q/K permuted")


def test_peft_export_in_transformers_tiny_qwen2(tmp_path):
    """A tiny qwen2 written by the test as a Hugging Face folder (mlx-lm's save, which
    uses Hugging Face names), loaded by both; adapters on the last layer only, so the
    export carries layers_to_transform."""
    transformers = need("transformers")
    need("torch")
    from tiny import make_model_dir

    base = make_model_dir(tmp_path / "tiny-qwen2", "qwen2", seed=3, hidden_size=128,
                          intermediate_size=256, num_hidden_layers=3)
    run = make_run(tmp_path / "run", base, rank=8, alpha=16.0, layers=2, b_scale=0.05)
    peft_dir = export(run, "peft", tmp_path / "peft").path
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1, 2]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype="float32")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    tokens = list(np.random.default_rng(0).integers(0, model.config.vocab_size, 160))
    check_against_transformers(model, base, run, peft_dir, [int(t) for t in tokens],
                               "tiny qwen2")


# -- DoRA ------------------------------------------------------------------------------------

def permuted_magnitudes(peft_dir: Path, out: Path, heads: int, kv_heads: int) -> Path:
    """The DoRA export with Q/K's magnitudes in llama.cpp's interleaved row order: the
    mistake a DoRA test must see."""
    from safetensors.numpy import load_file, save_file

    from mlxtune.export.lora import Base, to_gguf_rows

    base = Base("x", "gguf", "x", "llama", "llama", heads, kv_heads, 0)
    weights = load_file(str(peft_dir / "adapter_model.safetensors"))
    for k, v in weights.items():
        for key in ("self_attn.q_proj", "self_attn.k_proj"):
            if f".{key}.lora_magnitude_vector" in k:
                weights[k] = np.ascontiguousarray(to_gguf_rows(v, key, base))
    out.mkdir()
    save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text((peft_dir / "adapter_config.json").read_text())
    return out


def test_peft_dora_export_in_transformers_smollm2(smollm2_hf, tmp_path):
    """A DoRA adapter on the packaged SmolLM2 (trained on its Q4_1 blocks as shipped:
    the magnitudes start at the dequantized rows' norms), every linear layer of all 30
    blocks, exported with use_dora and lora_magnitude_vector; PEFT recomputes the norms
    of W + scale B A from transformers' own dequantization of the same GGUF."""
    from test_export import LONG_TEXT

    from mlxtune import models
    from mlxtune.config import ModelConfig

    _, model = smollm2_hf
    base = "smollm2-135m-instruct"
    run = make_run(tmp_path / "run", base, rank=8, alpha=16.0, b_scale=0.05, kind="dora")
    peft_dir = export(run, "peft", tmp_path / "peft").path
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    tokens = models.load(ModelConfig(path=base)).tokenizer.encode(LONG_TEXT)[:128]
    check_against_transformers(model, base, run, peft_dir, tokens, "SmolLM2-135M DoRA")
    wrong = permuted_magnitudes(peft_dir, tmp_path / "wrong", model.config.num_attention_heads,
                                model.config.num_key_value_heads)
    with pytest.raises(AssertionError):
        check_against_transformers(model, base, run, wrong, tokens, "SmolLM2 DoRA, Q/K "
                                   "magnitudes permuted")


def test_peft_dora_rslora_export_in_transformers_tiny_qwen2(tmp_path):
    """DoRA with rsLoRA on a tiny qwen2 (q/k/v biases: DoRA scales the output without its
    bias), the last two of three blocks."""
    transformers = need("transformers")
    need("torch")
    from tiny import make_model_dir

    base = make_model_dir(tmp_path / "tiny-qwen2", "qwen2", seed=3, hidden_size=128,
                          intermediate_size=256, num_hidden_layers=3)
    run = make_run(tmp_path / "run", base, rank=16, alpha=8.0, layers=2, b_scale=0.05,
                   kind="dora", rslora=True)
    peft_dir = export(run, "peft", tmp_path / "peft").path
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype="float32")
    tokens = list(np.random.default_rng(0).integers(0, model.config.vocab_size, 160))
    check_against_transformers(model, base, run, peft_dir, [int(t) for t in tokens],
                               "tiny qwen2 DoRA + rsLoRA")
