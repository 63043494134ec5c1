"""GRPO's rollouts: prompts from the data, completions sampled from the current policy.

Prompts (`encode_prompts`, records read with `prompts=True`: mlxtune.data.records): chat
data gives the conversation up to its last assistant turn, rendered with the generation
prompt, and that turn's content as the reference; a conversation that ends with a user or
tool turn is all prompt, without a reference. Prompt/completion data gives the prompt
(through the chat template when the tokenizer has one, as training encodes it; TRL's
conversational prompt, a message list, always through it) and the completion as the
reference; a record with `prompt` alone has none (reference None). Text data and
preference pairs have no prompt to sample for: refused with one line.

Sampling (`sample`): every prompt repeated group_size times, the rows left-padded into
one batch decoded with mlx_lm's `BatchKVCache` (each row's positions start at 0, its
padding masked; as mlxtune.evaluate.generate's greedy decoding), temperature and top-p
sampling from one PRNG key per rollout (the same batch again on resume), finished rows
dropped from the batch and its cache. The adapter is on: the current policy samples.
`collate` lays out prompt + completion rows for the loss, the mask on the completion's
tokens and its stop token (a completion cut at max_completion_tokens has none).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxtune import forward
from mlxtune.data.encode import _Encoder
from mlxtune.errors import DataError

# Record keys that make up the prompt (not passed to reward functions as columns).
PROMPT_KEYS = ("messages", "prompt", "tools")


@dataclass
class Prompt:
    tokens: list[int]           # the prompt's ids, generation prompt included
    prompt: object              # TRL's: the text, or the conversation (message list)
    reference: str | None       # the data's answer
    columns: dict               # the record's other keys
    source: str                 # file:line
    mask: list[bool] = field(default_factory=list)  # none: for digests of "examples"


@dataclass
class EncodedPrompts:
    examples: list[Prompt]
    format: str
    n_truncated: int = 0        # prompts dropped: too long for max_seq_len - completion
    n_dropped: int = 0


def encode_prompts(records, fmt: str, tokenizer, max_seq_len: int,
                   max_completion_tokens: int) -> EncodedPrompts:
    """The prompts of a split's records; prompts longer than max_seq_len -
    max_completion_tokens are dropped (counted in n_truncated), not cut."""
    out = EncodedPrompts([], fmt)
    if not records:
        return out
    where = records[0].source
    if fmt not in ("chat", "completions"):
        what = "preference pairs" if fmt == "preference" else f"{fmt} data"
        raise DataError(f"{where}: objective.type grpo samples completions for prompts, and "
                        f"this file holds {what}, which has no prompts to sample from: use "
                        "chat records (the last assistant turn is the reference) or "
                        "prompt/completion records")
    enc = _Encoder(tokenizer, True)
    room = max_seq_len - max_completion_tokens
    if room < 1:
        raise DataError(f"{where}: data.max_seq_len ({max_seq_len}) leaves no room for a "
                        f"prompt beside objective.max_completion_tokens "
                        f"({max_completion_tokens})")
    for r in records:
        d = r.data
        tools = d.get("tools") or None
        if fmt == "chat":
            messages = d["messages"]
            if messages[-1]["role"] == "assistant":
                prompt, reference = messages[:-1], messages[-1].get("content")
            else:  # a prompt-only conversation
                prompt, reference = messages, None
            if not prompt:
                raise DataError(f"{r.source}: grpo needs a prompt: this conversation has "
                                "only the assistant's answer")
            ids = _render(enc, prompt, tools, r.source)
        else:
            prompt, reference = d["prompt"], _answer_text(d.get("completion"))
            if isinstance(prompt, list):  # TRL's conversational prompt
                ids = _render(enc, prompt, tools, r.source)
            elif enc.has_template:
                ids = _render(enc, [{"role": "user", "content": prompt}], tools, r.source)
            else:
                ids = enc._ids(prompt, special=True)
        if len(ids) > room:
            out.n_truncated += 1
            continue
        columns = {k: v for k, v in d.items() if k not in PROMPT_KEYS}
        out.examples.append(Prompt(ids, prompt, reference, columns, r.source))
    if not out.examples:
        raise DataError(f"{where}: no prompt fits data.max_seq_len ({max_seq_len}) minus "
                        f"objective.max_completion_tokens ({max_completion_tokens})")
    return out


def _answer_text(completion) -> str | None:
    """The reference of a completions record: its completion, or the content of its last
    assistant message (TRL's conversational form); None for a prompt-only record."""
    if isinstance(completion, list):
        return completion[-1].get("content") if completion else None
    return completion


def _render(enc: _Encoder, messages, tools, source: str) -> list[int]:
    if not enc.has_template:
        raise DataError(f"{source}: a conversation needs a tokenizer with a chat template, "
                        "and this model's tokenizer has none; use prompt/completion records "
                        "with string prompts")
    try:
        return enc._render(messages, tools, True)
    except Exception as e:  # noqa: BLE001  (jinja refuses some conversations)
        raise DataError(f"{source}: the chat template cannot render this prompt: {e}") from None


# ----------------------------------------------------------------------------- sampling


@dataclass
class Completion:
    tokens: list[int]     # sampled ids, without the stop token
    stopped: bool         # ended on a stop token (False: cut at max_new_tokens)
    stop: int | None = None


def _last_logits(model: nn.Module, tokens: mx.array, cache) -> mx.array:
    if forward.splits_head(model):
        h = model.model(tokens, cache)
        return forward.apply_head(model, h[:, -1, :])
    return model(tokens, cache=cache)[:, -1, :]


def next_tokens(logits: mx.array, temperature: float, top_p: float, key) -> mx.array:
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


def sample(model: nn.Module, prompts: list[list[int]], group_size: int, stop_ids: set[int],
           max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
           seed: int = 0) -> list[Completion]:
    """group_size completions of every prompt, prompt-major (prompt i's are rows
    i * group_size ... i * group_size + group_size - 1), decoded in one batch."""
    from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

    rows = [p for p in prompts for _ in range(group_size)]
    key = mx.random.key(seed)
    if not all(type(c) is KVCache for c in make_prompt_cache(model)):
        out = []
        for i, r in enumerate(rows):  # sliding windows, state-space layers: one at a time
            out += _decode(model, mx.array([r], mx.int32), make_prompt_cache(model), stop_ids,
                           max_new_tokens, temperature, top_p, mx.random.split(key, len(rows))[i])
        return out
    width = max(len(r) for r in rows)
    pads = [width - len(r) for r in rows]
    tokens = mx.array([[0] * p + r for p, r in zip(pads, rows)], dtype=mx.int32)
    cache = [BatchKVCache(pads) for _ in range(len(model.layers))]
    return _decode(model, tokens, cache, stop_ids, max_new_tokens, temperature, top_p, key)


def _decode(model, tokens, cache, stop_ids, max_new_tokens, temperature, top_p, key):
    gens = [Completion([], False) for _ in range(tokens.shape[0])]
    live = list(range(len(gens)))  # the batch's rows -> their completion
    keys = mx.random.split(key, max_new_tokens)
    y = next_tokens(_last_logits(model, tokens, cache), temperature, top_p, keys[0])
    mx.eval(y)
    for step in range(max_new_tokens):
        keep = []
        for pos, token in enumerate(y.tolist()):
            g = gens[live[pos]]
            if token in stop_ids:
                g.stopped, g.stop = True, token
            else:
                g.tokens.append(token)
                keep.append(pos)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(live):
            index = mx.array(keep)
            for c in cache:
                c.filter(index)
            live, y = [live[p] for p in keep], y[index]
        y = next_tokens(_last_logits(model, y[:, None], cache), temperature, top_p,
                        keys[step + 1])
        mx.eval(y)
    return gens


# ----------------------------------------------------------------------------- the batch


def collate(prompts: list[list[int]], completions: list[Completion], group_size: int,
            pad_id: int, pad_multiple: int, mask_truncated: bool = False
            ) -> tuple[mx.array, mx.array]:
    """(tokens, mask) [R, L]: row i is prompt i // group_size + completion i (and its stop
    token), right-padded to a multiple of pad_multiple; the mask on the completion's tokens
    (none for a truncated completion with mask_truncated)."""
    rows, masks = [], []
    for i, c in enumerate(completions):
        p = prompts[i // group_size]
        answer = c.tokens + ([c.stop] if c.stopped else [])
        rows.append(p + answer)
        on = not (mask_truncated and not c.stopped)
        masks.append([False] * len(p) + [on] * len(answer))
    width = max(len(r) for r in rows)
    width = -(-width // pad_multiple) * pad_multiple
    tokens = np.full((len(rows), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(r)] = r
        mask[i, :len(m)] = m
    return mx.array(tokens), mx.array(mask)
