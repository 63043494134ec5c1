"""Greedy decoding for evaluation, through mlxtune.decode's batched decoder.

Prompts are sorted by length and decoded `batch_size` at a time: each batch's shared
prompt prefix is computed once, the rest of each prompt left-padded after it, every row
with its own positions starting at 0 and its own tokens only in its attention, so a row
decodes as it would alone (tests/test_evaluate.py and tests/test_decode.py check this
against one-at-a-time full forward passes and against mlx_lm's own `generate`). A row
stops at its first end-of-turn / EOS token or after `max_new_tokens`.

Models whose cache is not a plain KV cache (sliding windows, state-space layers) are
decoded one prompt at a time with their own `make_prompt_cache`.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlxtune import decode, quant


@dataclass
class Generation:
    tokens: list[int]  # the generated ids, without the stop token
    steps: int  # tokens produced, the stop token included (each one a forward step)
    stopped: bool  # ended on a stop token (False: ran out of max_new_tokens)


def greedy(model: nn.Module, prompts: list[list[int]], stop_ids: set[int],
           max_new_tokens: int, batch_size: int = 16,
           on_batch=None) -> tuple[list[Generation], float]:
    """Greedy continuations of every prompt (in the order given) and the wall time taken.
    `on_batch(done, generated_tokens, seconds)` is called after each batch (progress)."""
    rows, seconds = decode.generate(model, prompts, stop_ids, max_new_tokens, batch_size,
                                    on_batch=on_batch)
    return [Generation(r.tokens, r.steps, r.stopped) for r in rows], seconds


# ----------------------------------------------------------------------------- dense base


def dense_bytes(model: nn.Module, dtype: mx.Dtype) -> int:
    """Bytes a dense copy of the model's quantized layers would take in `dtype`."""
    n = 0
    for _, m in model.named_modules():
        if isinstance(m, (quant.QuantLinear, quant.QuantEmbedding)):
            n += quant.dense_size(m)
        elif isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            n += m["weight"].size * 32 // m.bits
    return n * dtype.size


def should_densify(model: nn.Module, setting, dtype: mx.Dtype) -> bool:
    """eval.dense_base (and GRPO's objective.dense_base): quant.dense_copy_wanted."""
    quantized = quant.is_quantized(model)
    return quant.dense_copy_wanted(setting, quantized,
                                   dense_bytes(model, dtype) if quantized else 0)


def densify(model: nn.Module, dtype: mx.Dtype) -> int:
    """Replace every quantized linear / embedding layer by a dense one holding exactly the
    dequantized weights the quantized layer computes with: the same function, without
    dequantizing at every decoding step. Run before adapters are applied. Returns the
    number of layers replaced."""
    from mlxtune.quant import layouts

    swaps = []
    for path, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(m["weight"], m["scales"], m.get("biases"), group_size=m.group_size,
                              bits=m.bits, mode=m.mode, dtype=dtype)
        elif isinstance(m, (quant.QuantLinear, quant.QuantEmbedding)):
            w = layouts.dequantize(m.format, {k: m[k] for k in layouts.KEYS[m.format]}, dtype)
        else:
            continue
        if isinstance(m, (nn.QuantizedEmbedding, quant.QuantEmbedding)):
            dense = nn.Embedding(1, 1)
        else:
            dense = nn.Linear(1, 1, bias="bias" in m)
            if "bias" in m:
                dense.bias = m["bias"].astype(dtype)
        dense.weight = w
        swaps.append((path, dense))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
        model.freeze()
        mx.eval(model.parameters())
    return len(swaps)
