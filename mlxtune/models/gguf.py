"""Load a llama.cpp `.gguf` file as an mlx_lm model, tokenizer and mlx-lm style config.

Everything comes from the file: hyperparameters and tokenizer from its metadata, weights
from its tensors. Tensors are read from a memory map (see gguf_file), not with `mx.load`:
measured with mlx 0.32, `mx.load` decodes Q4_K wrongly, silently drops TQ1_0/TQ2_0/MXFP4
tensors, turns BF16 into float16 and fails on the whole file when one tensor is
Q5_0/Q5_K/Q3_K. Here every type a QLoRA base is usually stored in stays quantized, so a
mixed file such as a typical Q4_K_M keeps its stored bits: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
Q4_K and Q5_K become MLX affine triples (group size 32, exact: see quant.layouts) and
Q6_K becomes our own q6_k layout (quant.QuantLinear / QuantEmbedding). The remaining
quantized types (Q2_K, Q3_K, IQ*, TQ*) are dequantized by gguf-py to float16.

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
from mlxtune.quant import layouts

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
    affine = {getattr(T, name): bits for name, bits in layouts.AFFINE_TYPES.items()}
    own = {getattr(T, name): fmt for name, fmt in layouts.OWN_TYPES.items()}
    # Types gguf-py dequantizes (checked: it raises NotImplementedError for the others).
    dense = {T.Q2_K, T.Q3_K, T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS,
             T.IQ3_S, T.IQ4_NL, T.IQ4_XS, T.TQ1_0, T.TQ2_0}
    dense |= {getattr(T, n) for n in ("MXFP4",) if hasattr(T, n)}
    return direct, affine, own, dense


def supported_types() -> list[str]:
    direct, affine, own, dense = _type_sets()
    return [t.name for t in sorted(direct | set(affine) | set(own) | dense, key=int)]


def _check_types(f: gguf_file.GGUFFile) -> None:
    direct, affine, own, dense = _type_sets()
    known = direct | set(affine) | set(own) | dense
    for t in f.tensors:
        if t.type not in known:
            raise ModelError(
                f"{f.path}: tensor {t.name} has GGUF type {t.type.name}, which mlxtune "
                f"cannot load yet (supported: {', '.join(supported_types())})")


def _read_tensor(f: gguf_file.GGUFFile, t: gguf_file.TensorInfo) -> dict:
    """{"weight": array}; for the affine types {"weight", "scales", "biases"} as MLX affine
    quantization; for Q6_K our q6_k arrays ({"weight", "weight_high", "scales", "d"}).
    Rows first, like PyTorch."""
    import mlx.core as mx
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    _, affine, own, _ = _type_sets()
    shape, kind, raw = t.shape, t.type, f.data(t)
    if kind == T.F32:
        return {"weight": mx.array(raw.view(np.float32).reshape(shape))}
    if kind == T.F16:
        return {"weight": mx.array(raw.view(np.float16).reshape(shape))}
    if kind == T.BF16:
        return {"weight": mx.array(raw.view(np.uint16)).view(mx.bfloat16).reshape(shape)}
    if kind in affine:
        arrays, _ = layouts.gguf_affine(raw, kind.name, shape)
        return {k: mx.array(v) for k, v in arrays.items()}
    if kind in own and len(shape) == 2:
        return {k: mx.array(v) for k, v in layouts.gguf_q6_k(raw, shape).items()}
    # gguf-py dequantizes to float32: go by row blocks so a large embedding never
    # exists in float32 as a whole.
    blocks = raw.reshape(int(np.prod(shape[:-1])), -1)
    dense = np.empty((blocks.shape[0], shape[-1]), np.float16)
    step = max(1, (1 << 22) // shape[-1])
    for start in range(0, blocks.shape[0], step):
        dense[start:start + step] = dequantize(blocks[start:start + step], kind)
    return {"weight": mx.array(dense.reshape(shape))}


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
    """mlx_lm parameter name -> array, module path -> affine quantization params, and
    module path -> arrays of our own q6_k format."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    arch = ARCHES[arch_name]
    tensors = {t.name: t for t in f.tensors}
    path = f.path
    names = _gguf_names(arch_name, config["num_hidden_layers"])
    weights, quantized, own, used = {}, {}, {}, set()
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
        if "weight_high" in arrays:      # q6_k
            if isinstance(_submodule(model, module), (nn.Linear, nn.Embedding)):
                own[module] = arrays
                weights.update({f"{module}.{k}": v for k, v in arrays.items()})
                continue
            arrays = {"weight": layouts.dequantize("q6_k", arrays, mx.float16)}
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
    return weights, quantized, own


def _own_format_modules(model, own: dict) -> list:
    """(path, QuantLinear | QuantEmbedding) for the modules held in our own formats."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlxtune.quant import QuantEmbedding, QuantLinear

    swaps = []
    for path, arrays in own.items():
        m = _submodule(model, path)
        rows, cols = arrays["weight"].shape[0], arrays["weight"].shape[1] * 8
        if isinstance(m, nn.Embedding):
            swaps.append((path, QuantEmbedding("q6_k", arrays, rows, cols)))
        else:
            bias = mx.zeros((rows,)) if "bias" in m else None   # loaded with the weights
            swaps.append((path, QuantLinear("q6_k", arrays, cols, rows, bias)))
    return swaps


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
    weights in Hugging Face layout (kept in their stored quantization), an mlx_lm
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
    weights, quantized, own = _collect_weights(model, f, config, arch_name)
    if hasattr(model, "sanitize"):  # e.g. drops lm_head for tied embeddings
        weights = model.sanitize(weights)
    quant = quantization_config(quantized)
    if quant:
        config["quantization"] = quant
        nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"],
                    class_predicate=lambda p, m: quantized.get(p, False))
    own = {m: a for m, a in own.items() if f"{m}.weight" in weights}  # sanitize may drop
    if own:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(_own_format_modules(model, own)))
        # Not in "quantization": mlx_lm cannot build these layers; recorded for readers.
        config["quantization_formats"] = {module: "q6_k" for module in own}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    log.info("loaded %s: %s, %d layers, %s", path.name, config["model_type"],
             config["num_hidden_layers"],
             f"{len(quantized) + len(own)} quantized modules" if quantized or own else "dense")
    return model, tokenizer, config
