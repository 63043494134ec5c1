"""Causal attention in query blocks, for the CPU backend.

On Metal and CUDA, `mx.fast.scaled_dot_product_attention` is a fused kernel. On the CPU
backend it is composed of plain ops over the whole [L x L] score matrix of every head:
the mask, the softmax (one `exp` per score, the single most expensive op of a long-sequence
training step there) and, for the backward pass, the scores and probabilities of every
layer kept alive (most of the memory of a long-sequence step).

`blockwise_attention` computes the same function a block of queries at a time, each block
against only the keys it can see (keys 0..end of the block), so the upper triangle of the
score matrix is never computed, masked, exponentiated or kept: about half the softmax work
and half the saved probabilities, and no mask outside the diagonal blocks' columns.

On the CPU backend, float32 attention with a causal or bool mask goes to mlxtune.native's
C++ primitive when it is built (the same function: mask, max, exp and sum in one vectorised
pass per block, the heads on the BLAS's threads, ~2-5x faster); `blockwise_attention` is
the fallback and the reference its tests compare with.

`install(model)` routes the attention of mlx_lm models that use
`mlx_lm.models.base.scaled_dot_product_attention` through it on the CPU backend. mlx_lm's
model modules import that function by name, so the name is replaced in the model's own
module; the architecture code is untouched. Cases the blockwise form does not cover (decoding
against a KV cache with fewer queries than keys, quantized caches, attention sinks, short
sequences) go to the original function. Architectures with their own attention code
(Gemma 2's soft-capped scores) are left as they are.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn

from mlxtune import backend, fastmath, native, routing

BLOCK = 128  # queries per block: smaller wastes less of the diagonal blocks, larger makes
             # fewer, bigger matmuls; 128 measured best at L = 1024 here (docs/performance.md)


def blockwise_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask,
                        block: int = BLOCK) -> mx.array:
    """softmax(q k^T * scale + mask) v for q [B, H, L, D], k / v [B, Hkv, L, Dv] (H a
    multiple of Hkv), mask None, "causal", or an array broadcastable to [B, H, L, L]
    (bool: True = attend; else additive). Causal whenever mask is "causal"; an array mask
    is applied as given, and keys after a block's last query are never read, so the mask
    must itself be causal (mlx_lm's masks for training are)."""
    b, h, length, d = q.shape
    hk = k.shape[1]
    rep = h // hk
    # Grouped-query attention without repeating the keys: [B, Hkv, rep, L, D].
    qg = q.reshape(b, hk, rep, length, d) * mx.array(scale, q.dtype)
    kg, vg = k[:, :, None], v[:, :, None]
    if isinstance(mask, mx.array) and mask.ndim == 4:  # [B, 1 or H, L, L] -> grouped
        per_head = mask.shape[1] == h
        mask = mask.reshape(mask.shape[0], hk if per_head else 1, rep if per_head else 1,
                            *mask.shape[2:])
    outs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        scores = qg[..., start:end, :] @ kg[..., :end, :].swapaxes(-1, -2)
        # Masked scores get the dtype's lowest finite value, not -inf (as mlx_lm does): a
        # query that may see no key at all (the left padding of a batched prompt) then
        # gets a finite, unused output instead of NaN, which would reach every later
        # position through 0 * NaN in the next layer's probs @ values.
        lowest = mx.array(mx.finfo(scores.dtype).min, scores.dtype)
        if isinstance(mask, str):
            keep = mx.arange(end)[None, :] <= mx.arange(start, end)[:, None]
            scores = mx.where(keep, scores, lowest)
        elif mask is not None:
            part = mask[..., start:end, :end]
            if part.dtype == mx.bool_:
                scores = mx.where(part, scores, lowest)
            else:
                scores = mx.maximum(scores + part.astype(scores.dtype), lowest)
        # fastmath: MLX's CPU exp is scalar; one exp per score is this loop's main cost.
        probs = fastmath.softmax(scores.astype(mx.float32)).astype(vg.dtype)
        outs.append(probs @ vg[..., :end, :])
    return mx.concatenate(outs, axis=-2).reshape(b, h, length, v.shape[-1])


def _applies(queries, keys, cache, mask, sinks) -> bool:
    return (sinks is None and not hasattr(cache, "bits")
            and queries.shape[-2] == keys.shape[-2] > BLOCK
            and (mask == "causal" if isinstance(mask, str) else isinstance(mask, mx.array)))


def _native_mask(queries, keys, values, mask):
    """The mask in the native kernel's form (None for causal alone, or bool [1 or B, 1, L,
    L]), or False when the kernel does not cover the call."""
    if not (queries.dtype == keys.dtype == values.dtype == mx.float32
            and queries.ndim == 4 and queries.shape[-2] == keys.shape[-2]):
        return False
    if isinstance(mask, str):
        return None if mask == "causal" else False
    if not isinstance(mask, mx.array) or mask.dtype != mx.bool_:
        return False
    length = queries.shape[-2]
    if mask.ndim == 2:
        mask = mask[None, None]
    if (mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, queries.shape[0])
            or tuple(mask.shape[-2:]) != (length, length)):
        return False
    return mask


def native_attention(queries, keys, values, scale: float, mask) -> mx.array | None:
    """mlxtune.native's kernel on a call it covers (float32; "causal" or a bool mask of
    [B or 1, 1, L, L] or [L, L] that is itself causal), else None (not covered, or the
    kernel is not built / disabled)."""
    kernel_mask = _native_mask(queries, keys, values, mask)
    if kernel_mask is False:
        return None
    module = native.load()
    if module is None:
        return None
    return module.causal_attention(queries, keys, values, float(scale), kernel_mask)


def _routed(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None,
                                     **kwargs):
        if not kwargs and backend.profile() == "cpu" and _applies(queries, keys, cache, mask,
                                                                sinks):
            out = native_attention(queries, keys, values, scale, mask)
            return out if out is not None else blockwise_attention(queries, keys, values,
                                                                   scale, mask, BLOCK)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask,
                        sinks=sinks, **kwargs)

    return scaled_dot_product_attention


def skips_other_examples(model: nn.Module, dtype: mx.Dtype) -> bool:
    """Whether `model`'s attention, computing in `dtype` on this backend, costs a packed
    row only its examples' own (query, key) pairs: mlxtune.native's kernel (CPU, float32,
    the model's module routed by `install`) reads no key before the first one a block of
    queries can see. Elsewhere a row of several examples pays attention across the row."""
    if backend.profile() != "cpu" or dtype != mx.float32 or native.load() is None:
        return False
    fn = getattr(sys.modules.get(type(model).__module__), "scaled_dot_product_attention", None)
    return hasattr(fn, "_mlxtune_original")


def install(model: nn.Module) -> bool:
    """Route `model`'s attention through blockwise_attention on the CPU profile (a no-op
    elsewhere, the GPU profile included: the decision is taken per call). Returns whether the model's module uses
    mlx_lm's shared attention function (and so is covered)."""
    return routing.route(model, "scaled_dot_product_attention", _routed)
