"""Batched decoding with a KV cache: one decoder for evaluation's greedy answers
(`mlxtune eval`, `mlxtune compare`) and GRPO's sampled rollouts.

`generate(model, prompts, stop_ids, max_new_tokens, ...)` continues every prompt, greedy
at temperature 0, else sampled (temperature, top-p) from one PRNG key. A row stops at its
first stop token or after max_new_tokens.

What makes it fast on this project's machines (docs/performance.md, "Decoding"):

- **Shared prefill.** The prompts of a batch share their opening (eval's system prompt:
  84 of the quickstart's ~110 prompt tokens; GRPO's group_size copies of each prompt
  share all of it). The common prefix is computed once, for one row, and its keys and
  values are copied to every row; identical prompts (GRPO's groups) are prefilled once
  and their cache rows copied. The rest of each prompt is prefilled left-padded
  between the shared prefix and the first generated token.
- **One cache for the batch** (`_Batch`): keys and values preallocated for the whole
  decode, written in place, a per-row mask of the slots that hold the row's tokens and a
  per-row position (rotary offset), so padding anywhere costs nothing but its slots; the
  attention is mlx_lm's own, with the mask this cache makes.
- **No host round trip on the critical path.** The next step is queued (`mx.async_eval`)
  before the previous step's tokens are read back for stop checks; finished rows are
  dropped from the batch and its cache only once they are worth the copy (a quarter of
  the batch, or every row), their extra tokens discarded.

Each row decodes as it would alone: its positions start at 0, it attends only to its own
tokens (tests/test_decode.py checks greedy decoding against full forward passes without a
cache, per row, under both compute profiles).

Models whose cache is not a plain KV cache (sliding windows, state-space layers) are
decoded one prompt at a time with their own `make_prompt_cache`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlxtune import forward


@dataclass
class Row:
    tokens: list[int]        # the generated ids, without the stop token
    steps: int = 0           # tokens produced, the stop token included
    stop: int | None = None  # the stop token it ended on (None: ran out of max_new_tokens)

    @property
    def stopped(self) -> bool:
        return self.stop is not None


# ----------------------------------------------------------------------------- picking


def pick(logits: mx.array, temperature: float, top_p: float, key) -> mx.array:
    """One token per row: greedy at temperature 0, else sampled from softmax(logits / T)
    restricted to the smallest set of tokens whose probability reaches top_p."""
    logits = logits.astype(mx.float32)
    if temperature == 0:
        return mx.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        sorted_logits = mx.where(before < top_p, sorted_logits, -mx.inf)
        choice = mx.random.categorical(sorted_logits, key=key)
        return mx.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return mx.random.categorical(logits, key=key)


def last_logits(model: nn.Module, tokens: mx.array, cache) -> mx.array:
    """Logits of the last position only: the output head never sees the prompt's other
    positions (for a big vocabulary that is most of a prefill's memory)."""
    if forward.splits_head(model):
        h = model.model(tokens, cache)
        return forward.apply_head(model, h[:, -1, :])
    return model(tokens, cache=cache)[:, -1, :]


# ----------------------------------------------------------------------------- the cache


class _Rows:
    """What every layer's cache of one batch shares: the slots written so far (`idx`),
    which slots hold each row's own tokens (`valid`, [B, capacity]) and each row's
    position for its next token (`offset`, [B])."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.idx = 0
        self.valid = mx.zeros((1, capacity), dtype=mx.bool_)
        self.offset = mx.zeros((1,), dtype=mx.int32)

    def append(self, pads: list[int] | None, n: int) -> None:
        """The next n slots receive each row's next tokens, the first pads[row] of them
        padding (masked, no position)."""
        start, end = self.idx, self.idx + n
        if end > self.capacity:
            raise ValueError(f"decode cache full ({self.capacity} slots)")
        slots = mx.arange(self.capacity)[None]
        if pads is None:
            first = mx.array(start)
        else:
            first = mx.array([start + p for p in pads])[:, None]
        self.valid = self.valid | ((slots >= first) & (slots < end))
        # Rotary position of the chunk's first slot: the row's next position, less its
        # padding (whose slots then get positions nothing attends to).
        self.chunk_offset = self.offset - (mx.array(pads, dtype=mx.int32) if pads else 0)
        self.offset = self.offset + n - (mx.array(pads, dtype=mx.int32) if pads else 0)
        self.pending = n

    def advance(self) -> None:
        self.idx += self.pending
        self.pending = 0

    def mask(self, n: int) -> mx.array:
        """[B, 1, n, idx + n] bool: a query sees its row's tokens up to itself (and itself,
        so that a padding query sees something and stays finite)."""
        width = self.idx + n
        keys = mx.arange(width)
        queries = mx.arange(self.idx, width)[:, None]
        causal = keys[None] <= queries
        own = self.valid[:, None, :width] | (keys[None] == queries)[None]
        return (own & causal[None])[:, None]

    def take(self, index: mx.array) -> None:
        self.valid = self.valid[index]
        self.offset = self.offset[index]


class _LayerCache:
    """One layer's keys and values, [B, kv heads, capacity, head dim], written in place."""

    def __init__(self, rows: _Rows):
        self.rows = rows
        self.keys = self.values = None

    @property
    def offset(self):
        return self.rows.chunk_offset

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        rows = self.rows
        if self.keys is None:
            b, h, _, dk = keys.shape
            self.keys = mx.zeros((b, h, rows.capacity, dk), keys.dtype)
            self.values = mx.zeros((b, h, rows.capacity, values.shape[3]), values.dtype)
        start, end = rows.idx, rows.idx + keys.shape[2]
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        return self.keys[..., :end, :], self.values[..., :end, :]

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        return self.rows.mask(n)

    def take(self, index: mx.array) -> None:
        if self.keys is not None:
            self.keys = self.keys[index]
            self.values = self.values[index]

    # mlx_lm's cache protocol, for code that inspects a cache
    def empty(self) -> bool:
        return self.keys is None

    @property
    def state(self):
        return self.keys, self.values

    def is_trimmable(self) -> bool:
        return False


class _Batch:
    """A batch of rows decoding together through `_LayerCache`s."""

    def __init__(self, model: nn.Module, capacity: int):
        self.model = model
        self.rows = _Rows(capacity)
        self.layers = [_LayerCache(self.rows) for _ in range(len(model.layers))]

    def forward(self, tokens: mx.array, pads: list[int] | None = None) -> mx.array:
        self.rows.append(pads, tokens.shape[1])
        logits = last_logits(self.model, tokens, self.layers)
        self.rows.advance()
        return logits

    def take(self, index: list[int]) -> None:
        ix = mx.array(index, dtype=mx.int32)
        self.rows.take(ix)
        for c in self.layers:
            c.take(ix)


def _common_prefix(rows: list[list[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows) - 1  # every row keeps a token of its own to prefill
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def prefill(model: nn.Module, rows: list[list[int]], max_new_tokens: int,
            share: bool = True) -> tuple[_Batch, mx.array]:
    """A `_Batch` holding every row's prompt, and the logits of each row's last prompt
    token [B, vocab]. With `share`, the rows' common prefix is computed once and identical
    rows once (their cache rows copied)."""
    if share:
        prefix = _common_prefix(rows)
        unique: dict[tuple, int] = {}
        owner = [unique.setdefault(tuple(r), len(unique)) for r in rows]
        distinct = [list(k) for k in unique]
    else:
        prefix, owner, distinct = 0, list(range(len(rows))), rows
    suffixes = [r[prefix:] for r in distinct]
    width = max(len(s) for s in suffixes)
    batch = _Batch(model, prefix + width + max_new_tokens)
    if prefix:
        batch.forward(mx.array([rows[0][:prefix]], dtype=mx.int32))
    batch.take([0] * len(distinct))  # one row per distinct prompt (the prefix copied)
    pads = [width - len(s) for s in suffixes]
    tokens = mx.array([[0] * p + s for p, s in zip(pads, suffixes)], dtype=mx.int32)
    logits = batch.forward(tokens, pads)
    if len(distinct) < len(rows):
        batch.take(owner)
        logits = logits[mx.array(owner, dtype=mx.int32)]
    return batch, logits


# ----------------------------------------------------------------------------- decoding


DROP_SHARE = 0.25  # drop finished rows once they are this share of the batch


def batchable(model: nn.Module) -> bool:
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    return all(type(c) is KVCache for c in make_prompt_cache(model))


def generate(model: nn.Module, prompts: list[list[int]], stop_ids: set[int],
             max_new_tokens: int, batch_size: int | None = None, temperature: float = 0.0,
             top_p: float = 1.0, key=None, sort: bool = True,
             on_batch=None) -> tuple[list[Row], float]:
    """Continuations of every prompt (in the order given) and the wall seconds taken.

    Batches of `batch_size` prompts (all in one batch when None), sorted by length first
    when `sort`. Sampling (temperature > 0) draws from `key` (a fresh split of it for each
    batch and step), so the same key gives the same rows. `on_batch(done, tokens,
    seconds)` after each batch."""
    if temperature > 0 and key is None:
        raise ValueError("sampling needs a PRNG key")
    alone = not batchable(model)
    size = 1 if alone else (batch_size or len(prompts) or 1)
    order = (sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i)) if sort
             else list(range(len(prompts))))
    out: list[Row | None] = [None] * len(prompts)
    start = time.perf_counter()
    steps = 0
    n_batches = -(-len(order) // size)
    keys = mx.random.split(key, n_batches) if key is not None else [None] * n_batches
    for n, b in enumerate(range(0, len(order), size)):
        idx = order[b:b + size]
        rows = [prompts[i] for i in idx]
        decode = _decode_alone if alone else _decode
        for i, r in zip(idx, decode(model, rows, stop_ids, max_new_tokens, temperature,
                                    top_p, keys[n])):
            out[i] = r
            steps += r.steps
        if on_batch is not None:
            on_batch(b + len(idx), steps, time.perf_counter() - start)
    return out, time.perf_counter() - start


def _decode(model, rows, stop_ids, max_new_tokens, temperature, top_p, key) -> list[Row]:
    gens = [Row([]) for _ in rows]
    if max_new_tokens < 1:
        return gens
    keys = (mx.random.split(key, max_new_tokens) if temperature > 0
            else [None] * max_new_tokens)
    batch, logits = prefill(model, rows, max_new_tokens)
    y = pick(logits, temperature, top_p, keys[0])
    mx.async_eval(y)
    live = list(range(len(rows)))  # the batch's rows -> their generation
    done = [False] * len(rows)
    n_done = 0  # finished rows still in the batch
    for step in range(max_new_tokens):
        last = step == max_new_tokens - 1
        if not last:  # queue the next step before reading this one back
            nxt = pick(batch.forward(y[:, None]), temperature, top_p, keys[step + 1])
            mx.async_eval(nxt)
        for pos, token in enumerate(y.tolist()):
            r = live[pos]
            if done[r]:
                continue
            g = gens[r]
            g.steps += 1
            if token in stop_ids:
                g.stop = token
                done[r] = True
                n_done += 1
            else:
                g.tokens.append(token)
        if last or n_done == len(live):
            break
        y = nxt
        if n_done and n_done >= DROP_SHARE * len(live):
            keep = [p for p, r in enumerate(live) if not done[r]]
            batch.take(keep)
            live = [live[p] for p in keep]
            y = y[mx.array(keep, dtype=mx.int32)]
            n_done = 0
    return gens


def _decode_alone(model, rows, stop_ids, max_new_tokens, temperature, top_p,
                  key) -> list[Row]:
    """One prompt through the model's own cache (sliding windows, state-space layers)."""
    from mlx_lm.models.cache import make_prompt_cache

    (prompt,) = rows
    g = Row([])
    if max_new_tokens < 1:
        return [g]
    keys = (mx.random.split(key, max_new_tokens) if temperature > 0
            else [None] * max_new_tokens)
    cache = make_prompt_cache(model)
    y = pick(last_logits(model, mx.array([prompt], mx.int32), cache), temperature, top_p,
             keys[0])
    for step in range(max_new_tokens):
        token = y.item()
        g.steps += 1
        if token in stop_ids:
            g.stop = token
            break
        g.tokens.append(token)
        if step < max_new_tokens - 1:
            y = pick(last_logits(model, y[:, None], cache), temperature, top_p,
                     keys[step + 1])
    return [g]
