"""Load a llama.cpp `.gguf` file as an mlx_lm model, tokenizer and mlx-lm style config.

Everything comes from the file: hyperparameters and tokenizer from its metadata, weights
from its tensors. Tensors are read from a memory map (see gguf_file), not with `mx.load`:
measured with mlx 0.32, `mx.load` decodes Q4_K wrongly, silently drops TQ1_0/TQ2_0/MXFP4
tensors, turns BF16 into float16 and fails on the whole file when one tensor is
Q5_0/Q5_K/Q3_K. Here Q4_0, Q4_1 and Q8_0 become MLX affine triples (group size 32,
bit-exact with what `mx.load` gives) and stay quantized; the other quantized types are
dequantized by gguf-py to float16.

llama.cpp's converter changes two things that are undone here: it interleaves the rows of
Q and K per head for the llama family (its RoPE is the "traditional" one), and it stores
Gemma's RMSNorm weights as 1 + w.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from mlxtune.errors import ModelError
from mlxtune.models import gguf_file
from mlxtune.models.gguf_file import printable
from mlxtune.models.gguf_config import ARCHES, Arch, architecture, model_config

log = logging.getLogger(__name__)

# Tensors in a GGUF that carry no weights of their own for mlx_lm.
_CONSUMED = {"rope_freqs.weight"}


# -- reading the file ----------------------------------------------------------------------

_TOKEN_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                 "tokenizer.ggml.token_type")


def read_gguf_info(path: str | Path) -> dict:
    """Metadata and tensor list of a GGUF file, without reading any weights.

    Returns {"path", "architecture", "metadata" (the token arrays left out), "tensors":
    [{"name", "type", "shape"}] (shape rows first, as in PyTorch / MLX)}."""
    f = gguf_file.read(path, skip=_TOKEN_ARRAYS)
    meta = {k: v for k, v in f.metadata.items() if k not in _TOKEN_ARRAYS}
    tensors = [{"name": t.name, "type": t.type.name, "shape": list(t.shape)}
               for t in f.tensors]
    return {"path": str(path), "architecture": meta.get("general.architecture"),
            "metadata": meta, "tensors": tensors}


# -- tensor types --------------------------------------------------------------------------

def _type_sets():
    from gguf import GGMLQuantizationType as T

    direct = {T.F32, T.F16, T.BF16}
    affine = {T.Q4_0: 4, T.Q4_1: 4, T.Q8_0: 8}
    # Types gguf-py dequantizes (checked: it raises NotImplementedError for the others).
    dense = {T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ1_S, T.IQ1_M,
             T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_NL, T.IQ4_XS,
             T.TQ1_0, T.TQ2_0}
    dense |= {getattr(T, n) for n in ("MXFP4",) if hasattr(T, n)}
    return direct, affine, dense


def supported_types() -> list[str]:
    direct, affine, dense = _type_sets()
    return [t.name for t in sorted(direct | set(affine) | dense, key=int)]


def _check_types(f: gguf_file.GGUFFile) -> None:
    direct, affine, dense = _type_sets()
    known = direct | set(affine) | dense
    for t in f.tensors:
        if t.type not in known:
            raise ModelError(
                f"{f.path}: tensor {t.name} has GGUF type {t.type.name}, which mlxtune "
                f"cannot load yet (supported: {', '.join(supported_types())})")


def _read_tensor(f: gguf_file.GGUFFile, t: gguf_file.TensorInfo) -> dict:
    """{"weight": array} or, for Q4_0/Q4_1/Q8_0, {"weight", "scales", "biases"} as MLX
    affine quantization (rows first, like PyTorch)."""
    import mlx.core as mx
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    _, affine, _ = _type_sets()
    shape, kind, raw = t.shape, t.type, f.data(t)
    if kind == T.F32:
        return {"weight": mx.array(raw.view(np.float32).reshape(shape))}
    if kind == T.F16:
        return {"weight": mx.array(raw.view(np.float16).reshape(shape))}
    if kind == T.BF16:
        return {"weight": mx.array(raw.view(np.uint16)).view(mx.bfloat16).reshape(shape)}
    if kind in affine:
        return _to_affine(raw, kind, shape)
    # gguf-py dequantizes to float32: go by row blocks so a large embedding never
    # exists in float32 as a whole.
    blocks = raw.reshape(int(np.prod(shape[:-1])), -1)
    dense = np.empty((blocks.shape[0], shape[-1]), np.float16)
    step = max(1, (1 << 22) // shape[-1])
    for start in range(0, blocks.shape[0], step):
        dense[start:start + step] = dequantize(blocks[start:start + step], kind)
    return {"weight": mx.array(dense.reshape(shape))}


def _to_affine(raw: np.ndarray, kind, shape: tuple) -> dict:
    """Repack GGML blocks of 32 into MLX affine form: w = scale * q + bias, q unsigned,
    packed little-endian into uint32 (value i of a word in bits [b*i, b*(i+1)))."""
    import mlx.core as mx
    from gguf import GGMLQuantizationType as T

    rows = int(np.prod(shape[:-1]))
    if kind == T.Q8_0:         # fp16 d, 32 x int8;  w = d * q
        blocks = raw.reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16)
        q = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        bias = d * np.float16(-128)
    else:                      # Q4_0: fp16 d, 16 bytes;  Q4_1: fp16 d, fp16 m, 16 bytes
        head = 2 if kind == T.Q4_0 else 4
        blocks = raw.reshape(-1, head + 16)
        d = blocks[:, :2].copy().view(np.float16)
        nib = blocks[:, head:]
        # GGML keeps values 0..15 in the low nibbles, 16..31 in the high ones.
        vals = np.concatenate([nib & 0x0F, nib >> 4], axis=1)
        q = (vals[:, 0::2] | (vals[:, 1::2] << 4)).astype(np.uint8)
        bias = d * np.float16(-8) if kind == T.Q4_0 else blocks[:, 2:4].copy().view(np.float16)
    lead = shape[:-1]
    return {
        "weight": mx.array(q.reshape(rows, -1).view(np.uint32).reshape(*lead, -1)),
        "scales": mx.array(d.reshape(*lead, -1)),
        "biases": mx.array(bias.reshape(*lead, -1)),
    }


# -- weights -------------------------------------------------------------------------------

def _gguf_names(arch_name: str, n_layers: int):
    """gguf-py's own map between Hugging Face tensor names (which mlx_lm's models use)
    and GGUF names, so no name table is kept here."""
    import gguf

    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    return gguf.get_tensor_name_map(arch_id, n_layers)


def _unpermute(x, heads: int):
    """Undo llama.cpp's per-head interleave of Q/K rows; rows are independent in MLX
    affine quantization, so this applies to weight, scales and biases alike."""
    rows = x.shape[0]
    rest = x.shape[1:]
    return x.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(x.shape)


def _fix_layout(param: str, arrays: dict, config: dict, arch: Arch) -> dict:
    if arch.permute_qk and ".self_attn.q_proj." in param:
        return {k: _unpermute(v, config["num_attention_heads"]) for k, v in arrays.items()}
    if arch.permute_qk and ".self_attn.k_proj." in param:
        return {k: _unpermute(v, config["num_key_value_heads"]) for k, v in arrays.items()}
    if arch.norm_offset and param.endswith("norm.weight"):
        return {"weight": arrays["weight"] - arch.norm_offset}
    return arrays


def _quant_params(arrays: dict, in_features: int) -> dict:
    bits = arrays["weight"].shape[-1] * 32 // in_features
    return {"group_size": in_features // arrays["scales"].shape[-1], "bits": bits}


def _collect_weights(model, f: gguf_file.GGUFFile, config: dict, arch_name: str):
    """mlx_lm parameter name -> array, and module path -> quantization params."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    arch = ARCHES[arch_name]
    tensors = {t.name: t for t in f.tensors}
    path = f.path
    names = _gguf_names(arch_name, config["num_hidden_layers"])
    weights, quantized, used = {}, {}, set()
    for param, value in tree_flatten(model.parameters()):
        gname = names.get_name(param, try_suffixes=(".weight", ".bias"))
        if gname not in tensors:
            if param == "lm_head.weight" and config["tie_word_embeddings"]:
                continue
            raise ModelError(f"{path}: tensor {gname or param} is missing "
                             f"(mlx_lm parameter {param})")
        used.add(gname)
        if tuple(tensors[gname].shape) != tuple(value.shape):
            raise ModelError(f"{path}: tensor {gname} has shape {list(tensors[gname].shape)}, "
                             f"the model expects {list(value.shape)} for {param}")
        arrays = _fix_layout(param, _read_tensor(f, tensors[gname]), config, arch)
        module = param.rsplit(".", 1)[0]
        if "scales" in arrays:
            q = _quant_params(arrays, value.shape[-1])
            if hasattr(_submodule(model, module), "to_quantized"):
                quantized[module] = q
                for key, arr in arrays.items():
                    weights[f"{module}.{key}"] = arr
                continue
            arrays = {"weight": mx.dequantize(arrays["weight"], arrays["scales"],
                                              arrays["biases"], **q)}
        weights[param] = arrays["weight"]
    unused = sorted(set(tensors) - used - _CONSUMED)
    if unused:
        raise ModelError(f"{path}: tensors this loader does not know how to use for "
                         f"{arch_name}: {', '.join(unused[:5])}"
                         f"{' ...' if len(unused) > 5 else ''}")
    return weights, quantized


def _submodule(model, dotted: str):
    m = model
    for part in dotted.split("."):
        m = m[int(part)] if isinstance(m, list) else getattr(m, part)
    return m


def quantization_config(quantized: dict) -> dict | None:
    """mlx-lm's per-module form: the most common (group_size, bits) as the default,
    entries for modules that differ."""
    if not quantized:
        return None
    common = Counter((q["group_size"], q["bits"]) for q in quantized.values()).most_common(1)
    group_size, bits = common[0][0]
    config = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for module, q in quantized.items():
        if (q["group_size"], q["bits"]) != (group_size, bits):
            config[module] = dict(q)
    return config


def _build_model(config: dict):
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    return module.Model(module.ModelArgs.from_dict(config))


def load_gguf(path: str | Path):
    """(model, tokenizer, config) from a GGUF file: an mlx_lm model with the file's
    weights in Hugging Face layout (Q4_0/Q4_1/Q8_0 kept quantized), an mlx_lm
    TokenizerWrapper, and the mlx-lm config (with "quantization" when any tensor is).
    Any failure is a one-line ModelError naming the file."""
    path = Path(path)
    try:
        return _load(path)
    except ModelError:
        raise
    except Exception as e:  # a corrupt file can trip many things; say so in one line
        text = str(e).strip().splitlines()
        raise ModelError(f"{path}: cannot load this GGUF file (corrupt or unusual?): "
                         f"{type(e).__name__}: {printable(text[0]) if text else ''}") from e


def _load(path: Path):
    import mlx.core as mx
    import mlx.nn as nn

    from mlxtune.models.gguf_tokenizer import build_tokenizer

    f = gguf_file.read(path)
    _check_types(f)
    meta = f.metadata
    arch_name, _ = architecture(meta, path)
    tensors = {t.name: t for t in f.tensors}
    rope_freqs = tensors.get("rope_freqs.weight")
    if rope_freqs is not None:
        rope_freqs = np.array(_read_tensor(f, rope_freqs)["weight"].astype(mx.float32))
    config = model_config(meta, {n: t.shape for n, t in tensors.items()}, path, rope_freqs)
    tokenizer = build_tokenizer(meta, path)

    model = _build_model(config)
    weights, quantized = _collect_weights(model, f, config, arch_name)
    if hasattr(model, "sanitize"):  # e.g. drops lm_head for tied embeddings
        weights = model.sanitize(weights)
    quant = quantization_config(quantized)
    if quant:
        config["quantization"] = quant
        nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"],
                    class_predicate=lambda p, m: quantized.get(p, False))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    log.info("loaded %s: %s, %d layers, %s", path.name, config["model_type"],
             config["num_hidden_layers"],
             f"{len(quantized)} quantized modules" if quantized else "dense")
    return model, tokenizer, config
