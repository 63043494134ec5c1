"""Base + adapter merged into one mlx-lm model folder (`mlx_lm.load(folder)`).

The base is loaded as stored (a GGUF's own quantization, an mlx folder's weights; not
the QLoRA re-quantization a run may have applied on load), every adapted weight becomes
W + scale * (A @ B).T computed in float32 (DoRA: each row of that rescaled to its
magnitude; a full fine-tune: its trained block weights), every other quantized layer is
dequantized, and the result is saved dense in the chosen dtype, or re-quantized with
MLX's affine format (group size 64) on request.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxtune.export.lora import Lora

GROUP_SIZE = 64


def dense_weight(module):
    """A linear or embedding layer's weight as a float32 mx.array, whatever its format."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlxtune.quant import QuantEmbedding, QuantLinear, layouts

    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        # In float32: dequantizing with float16 scales would round the result to float16.
        biases = module.get("biases")
        return mx.dequantize(module["weight"], module["scales"].astype(mx.float32),
                             None if biases is None else biases.astype(mx.float32),
                             module.group_size, module.bits, module.mode)
    if isinstance(module, QuantLinear):
        return module.dense_weight(mx.float32)
    if isinstance(module, QuantEmbedding):
        return layouts.dequantize(module.format, {k: module[k] for k in
                                                  layouts.KEYS[module.format]}, mx.float32)
    return module["weight"].astype(mx.float32)


def _submodule(model, dotted: str):
    m = model
    for part in dotted.split("."):
        m = m[int(part)] if isinstance(m, list) else getattr(m, part)
    return m


def load_base(lora: Lora):
    """(model, tokenizer, mlx-lm config) of the base, as stored."""
    base = lora.base
    if base.is_gguf:
        from mlxtune.models.gguf import load_gguf

        return load_gguf(base.location)
    from mlx_lm.utils import load_model, load_tokenizer

    model, config = load_model(Path(base.location), lazy=True)
    return model, load_tokenizer(Path(base.location)), config


def fuse(model, lora: Lora) -> None:
    """Merge the adapter into `model` (an mlx_lm model of the base) and leave every linear
    and embedding layer dense float32."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    if lora.kind == "full":
        _dense_everywhere(model)
        model.load_weights([(k, mx.array(v)) for k, v in lora.weights.items()], strict=False)
        mx.eval(model.parameters())
        return
    swaps = []
    for (layer, key) in sorted(lora.pairs):
        path = f"model.layers.{layer}.{key}"
        module = _submodule(model, path)
        w = mx.array(lora.merged(layer, key, np.array(dense_weight(module))))
        fused = nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
        fused.weight = w
        if "bias" in module:
            fused.bias = module["bias"].astype(mx.float32)
        swaps.append((path, fused))
    model.update_modules(tree_unflatten(swaps))
    mx.eval(model.parameters())
    _dense_everywhere(model)


def _dense_everywhere(model) -> None:
    """Every quantized linear and embedding layer of `model` as a dense float32 one."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    from mlxtune.quant import QuantEmbedding, QuantLinear

    swaps = []
    for path, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, QuantLinear)):
            w = dense_weight(m)
            dense = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            dense.weight = w
            if "bias" in m:
                dense.bias = m["bias"].astype(mx.float32)
            swaps.append((path, dense))
        elif isinstance(m, (nn.QuantizedEmbedding, QuantEmbedding)):
            w = dense_weight(m)
            emb = nn.Embedding(w.shape[0], w.shape[1])
            emb.weight = w
            swaps.append((path, emb))
    if swaps:
        model.update_modules(tree_unflatten(swaps))


def write(lora: Lora, folder: Path, outtype: str = "f16") -> None:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map
    from mlx_lm.utils import save_config, save_model

    model, tokenizer, config = load_base(lora)
    fuse(model, lora)
    dtype = {"f32": mx.float32, "bf16": mx.bfloat16}.get(outtype, mx.float16)
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating)
                          else p, model.parameters()))
    for key in ("quantization", "quantization_config", "quantization_formats"):
        config.pop(key, None)
    if outtype in ("q4", "q8"):
        bits = int(outtype[1:])
        nn.quantize(model, group_size=GROUP_SIZE, bits=bits,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % GROUP_SIZE == 0)
        config["quantization"] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    mx.eval(model.parameters())
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder, model)
    save_config(dict(config), folder / "config.json")
    tokenizer.save_pretrained(str(folder))

