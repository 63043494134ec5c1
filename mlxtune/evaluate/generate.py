"""Greedy decoding for evaluation: prompts in left-padded batches with a KV cache.

Prompts are sorted by length and decoded `batch_size` at a time through mlx_lm's
`BatchKVCache`, which keeps each row's rotary positions starting at 0 and masks the left
padding, so a row decodes as it would alone (tests/test_evaluate.py checks this against
one-at-a-time decoding and against mlx_lm's own `generate`). A row stops at its first
end-of-turn / EOS token or after `max_new_tokens`; the batch runs until every row stops.

Models whose cache is not a plain KV cache (sliding windows, state-space layers) are
decoded one prompt at a time with their own `make_prompt_cache`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlxtune import backend, forward, quant


@dataclass
class Generation:
    tokens: list[int]  # the generated ids, without the stop token
    steps: int  # tokens produced, the stop token included (each one a forward step)
    stopped: bool  # ended on a stop token (False: ran out of max_new_tokens)


def _last_logits(model: nn.Module, tokens: mx.array, cache) -> mx.array:
    """Logits of the last position only: the output head never sees the prompt's other
    positions (for a big vocabulary that is most of a prefill's memory)."""
    if forward.splits_head(model):
        h = model.model(tokens, cache)
        return forward.apply_head(model, h[:, -1, :])
    return model(tokens, cache=cache)[:, -1, :]


def _batchable(model: nn.Module) -> bool:
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    return all(type(c) is KVCache for c in make_prompt_cache(model))


def greedy(model: nn.Module, prompts: list[list[int]], stop_ids: set[int],
           max_new_tokens: int, batch_size: int = 16,
           on_batch=None) -> tuple[list[Generation], float]:
    """Greedy continuations of every prompt (in the order given) and the wall time taken.
    `on_batch(done, generated_tokens, seconds)` is called after each batch (progress)."""
    from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

    if not _batchable(model):
        batch_size = 1
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    out: list[Generation | None] = [None] * len(prompts)
    start = time.perf_counter()
    steps = 0
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        rows = [prompts[i] for i in idx]
        width = max(len(r) for r in rows)
        pads = [width - len(r) for r in rows]
        tokens = mx.array([[0] * p + r for p, r in zip(pads, rows)], dtype=mx.int32)
        if batch_size == 1:
            cache = make_prompt_cache(model)
        else:
            cache = [BatchKVCache(pads) for _ in range(len(model.layers))]
        for i, gen in zip(idx, _decode(model, tokens, cache, stop_ids, max_new_tokens)):
            out[i] = gen
            steps += gen.steps
        if on_batch is not None:
            on_batch(b + len(idx), steps, time.perf_counter() - start)
    return out, time.perf_counter() - start


def _decode(model, tokens, cache, stop_ids, max_new_tokens) -> list[Generation]:
    gens = [Generation([], 0, False) for _ in range(tokens.shape[0])]
    rows = list(range(len(gens)))  # the batch's rows -> their generation
    y = mx.argmax(_last_logits(model, tokens, cache), axis=-1)
    mx.eval(y)
    for step in range(max_new_tokens):
        keep = []
        for pos, token in enumerate(y.tolist()):
            g = gens[rows[pos]]
            g.steps += 1
            if token in stop_ids:
                g.stopped = True
            else:
                g.tokens.append(token)
                keep.append(pos)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):  # drop finished rows from the batch and its cache
            index = mx.array(keep)
            for c in cache:
                c.filter(index)
            rows, y = [rows[p] for p in keep], y[index]
        y = mx.argmax(_last_logits(model, y[:, None], cache), axis=-1)
        mx.eval(y)
    return gens


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
    """eval.dense_base: true / false as given; auto: on the CPU profile (where quantized
    weights are dequantized for every product anyway) when the copy takes under a quarter
    of the machine's memory."""
    if setting is True or setting is False:
        return setting and quant.is_quantized(model)
    if backend.profile() != "cpu" or not quant.is_quantized(model):
        return False
    return dense_bytes(model, dtype) < backend.system_memory_bytes() / 4


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
