"""GGUF metadata -> the mlx-lm config of the matching mlx_lm model.

The keys are those llama.cpp's converter writes ({arch}.embedding_length, ...). A few
values GGUF does not record are set the way llama.cpp's own loader sets them (Gemma's
query scale and sliding-window pattern); each such place says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlxtune.errors import ModelError
from mlxtune.models.gguf_file import printable


@dataclass(frozen=True)
class Arch:
    model_type: str             # the mlx_lm.models module
    permute_qk: bool = False    # llama.cpp interleaves Q/K rows for these
    norm_offset: float = 0.0    # llama.cpp stores these norm weights as offset + w


# GGUF general.architecture -> mlx_lm model. llama.cpp permutes Q/K only in LlamaModel
# (which also writes Mistral-style models as "llama"); Qwen and Gemma are written as is.
ARCHES = {
    "llama": Arch("llama", permute_qk=True),
    "qwen2": Arch("qwen2"),
    "qwen3": Arch("qwen3"),
    "gemma": Arch("gemma", norm_offset=1.0),
    "gemma2": Arch("gemma2", norm_offset=1.0),
    "gemma3": Arch("gemma3_text", norm_offset=1.0),
}

_REQUIRED = object()


class _Meta:
    """Metadata access that names the file and key when something is missing."""

    def __init__(self, meta: dict, path, arch: str):
        self.meta, self.path, self.arch = meta, path, arch

    def __call__(self, key: str, default=_REQUIRED):
        full = key if key.startswith(("general.", "tokenizer.")) else f"{self.arch}.{key}"
        value = self.meta.get(full)
        if value is None:
            if default is _REQUIRED:
                raise ModelError(f"{self.path}: required GGUF metadata key {full} is missing")
            return default
        if isinstance(value, list):  # a per-layer list: mlx_lm wants one value
            if not value or any(v != value[0] for v in value):
                raise ModelError(f"{self.path}: metadata {full} differs between layers, "
                                 "which mlx_lm's models do not support")
            value = value[0]
        return value


def architecture(meta: dict, path) -> tuple[str, Arch]:
    name = meta.get("general.architecture")
    if name is None:
        raise ModelError(f"{path}: required GGUF metadata key general.architecture is missing")
    if name not in ARCHES:
        raise ModelError(f"{path}: GGUF architecture '{printable(str(name))}' is not supported "
                         f"(supported: {', '.join(ARCHES)})")
    return name, ARCHES[name]


def model_config(meta: dict, shapes: dict[str, tuple], path,
                 rope_freqs: np.ndarray | None = None) -> dict:
    """The mlx-lm config for the file's architecture. `shapes`: tensor name -> shape;
    `rope_freqs`: the file's rope_freqs tensor, if it has one (Llama 3.1-style RoPE)."""
    name, arch = architecture(meta, path)
    get = _Meta(meta, path, name)
    if get("expert_count", 0):
        raise ModelError(f"{path}: mixture-of-experts models ({name} with "
                         f"{get('expert_count')} experts) are not supported yet")
    if "token_embd.weight" not in shapes:
        raise ModelError(f"{path}: tensor token_embd.weight is missing")
    hidden, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    q_rows = shapes.get("blk.0.attn_q.weight", (hidden,))[0]  # older files lack key_length
    head_dim = int(get("attention.key_length", q_rows // n_head))
    config = {
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        # The embedding's rows decide; llama.cpp pads the token list to match them.
        "vocab_size": int(shapes["token_embd.weight"][0]),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        "tie_word_embeddings": "output.weight" not in shapes,
    }
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ModelError(f"{path}: partial rotary embeddings ({name}.rope.dimension_count="
                         f"{rope_dims}, head size {head_dim}) are not supported")
    scaling = _rope_scaling(get, path)
    if rope_freqs is not None:
        scaling = _llama3_rope(rope_freqs, config, path)
    if scaling:
        config["rope_scaling"] = scaling
    _ARCH_EXTRAS[arch.model_type](config, get, shapes, path)
    return config


def _rope_scaling(get, path) -> dict | None:
    kind = get("rope.scaling.type", "none")
    factor = float(get("rope.scaling.factor", get("rope.scale_linear", 1.0)))
    if kind == "none" and factor == 1.0:
        return None
    if kind in ("linear", "none"):
        return {"type": "linear", "factor": factor}
    if kind == "yarn":
        original = int(get("rope.scaling.original_context_length"))
        return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise ModelError(f"{path}: RoPE scaling type '{printable(str(kind))}' is not supported")


def _llama_extras(config, get, shapes, path):
    config["attention_bias"] = "blk.0.attn_q.bias" in shapes
    config["mlp_bias"] = "blk.0.ffn_up.bias" in shapes


def _qwen2_extras(config, get, shapes, path):
    if config.pop("head_dim") != config["hidden_size"] // config["num_attention_heads"]:
        raise ModelError(f"{path}: qwen2 with a head size other than hidden/heads is not "
                         "supported by mlx_lm's qwen2 model")


def _gemma_scale(config, n_layers_27b: int) -> float:
    # llama.cpp (and Gemma's reference code) scale queries by hidden/heads for the 27B
    # models and by the head size otherwise; GGUF has no key for it.
    if config["num_hidden_layers"] == n_layers_27b:
        return float(config["hidden_size"] // config["num_attention_heads"])
    return float(config["head_dim"])


def _no_rope_scaling(config, get, shapes, path):
    if "rope_scaling" in config:  # mlx_lm's gemma / gemma2 models have no RoPE scaling
        raise ModelError(f"{path}: RoPE scaling is not supported for {config['model_type']}")


def _gemma2_extras(config, get, shapes, path):
    _no_rope_scaling(config, get, shapes, path)
    config["attn_logit_softcapping"] = float(get("attn_logit_softcapping", 50.0))
    config["final_logit_softcapping"] = float(get("final_logit_softcapping", 30.0))
    config["query_pre_attn_scalar"] = _gemma_scale(config, 46)


def _gemma3_extras(config, get, shapes, path):
    if float(get("final_logit_softcapping", 0.0)):
        raise ModelError(f"{path}: gemma3 with final logit softcapping is not supported")
    window = int(get("attention.sliding_window", 0))
    # llama.cpp: every 6th layer global when there is a window, else all global.
    config["sliding_window"] = window or config["max_position_embeddings"]
    config["sliding_window_pattern"] = 6 if window else 1
    config["rope_local_base_freq"] = 10000.0
    config["query_pre_attn_scalar"] = _gemma_scale(config, 62)


_ARCH_EXTRAS = {
    "llama": _llama_extras,
    "qwen2": _qwen2_extras,
    "qwen3": lambda *a: None,
    "gemma": _no_rope_scaling,
    "gemma2": _gemma2_extras,
    "gemma3_text": _gemma3_extras,
}


def _llama3_rope(factors: np.ndarray, config: dict, path) -> dict:
    """Recover Llama 3.1-style RoPE scaling from llama.cpp's rope_freqs tensor (it stores
    the per-frequency divisors, not the parameters). Llama 3.1/3.2/3.3 all use low 1,
    high 4, original context 8192; anything else is refused rather than guessed."""
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    dims = config["head_dim"]
    freqs = config["rope_theta"] ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    wavelen = 2 * np.pi * freqs
    orig, f = scaling["original_max_position_embeddings"], scaling["factor"]
    smooth = (orig / wavelen - 1.0) / (4.0 - 1.0)
    expect = np.where(wavelen < orig / 4.0, 1.0,
                      np.where(wavelen > orig / 1.0, f, 1.0 / ((1 - smooth) / f + smooth)))
    if factors.shape != expect.shape or not np.allclose(factors, expect, rtol=1e-3):
        raise ModelError(f"{path}: tensor rope_freqs.weight does not match Llama 3 RoPE "
                         "scaling; this RoPE variant is not supported")
    return scaling


