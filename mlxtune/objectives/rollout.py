"""GRPO's rollouts: prompts from the data, completions sampled from the current policy.

Prompts (`encode_prompts`, records read with `prompts=True`: mlxtune.data.records): chat
data gives the conversation up to its last assistant turn, rendered with the generation
prompt, and that turn's content as the reference; a conversation that ends with a user or
tool turn is all prompt, without a reference. Prompt/completion data gives the prompt
(through the chat template when the tokenizer has one, as training encodes it; TRL's
conversational prompt, a message list, always through it) and the completion as the
reference; a record with `prompt` alone has none (reference None). Text data and
preference pairs have no prompt to sample for: refused with one line.

Sampling (`sample`): every prompt repeated group_size times, the rows decoded in one
batch by mlxtune.decode (as evaluation's greedy decoding: each row's positions start at 0,
its padding masked; each prompt prefilled once for its group), temperature and top-p
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

from mlxtune import decode
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


# The one batched decoder (mlxtune.decode) computes the rollouts: eval's greedy answers
# and these samples take the same path.
_last_logits = decode.last_logits
next_tokens = decode.pick


def sample(model: nn.Module, prompts: list[list[int]], group_size: int, stop_ids: set[int],
           max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
           seed: int = 0) -> list[Completion]:
    """group_size completions of every prompt, prompt-major (prompt i's are rows
    i * group_size ... i * group_size + group_size - 1), decoded in one batch (each
    prompt prefilled once for its group, the prompts' common opening once for all)."""
    rows = [p for p in prompts for _ in range(group_size)]
    key = mx.random.key(seed) if temperature > 0 else None
    out, _ = decode.generate(model, rows, stop_ids, max_new_tokens, None, temperature,
                             top_p, key)
    return [Completion(r.tokens, r.stopped, r.stop) for r in out]


def score(tokenizer, rewards, items: list[Prompt], gens: list[Completion], group: int):
    """(the prompt of each completion, the texts, the reward table [N, R], the weighted
    total [N]) of completions sampled `group` per prompt, scored by `rewards`
    (objectives.rewards.Rewards) with TRL's arguments: the prompts, the completions (a
    message list for conversational prompts), the records' other columns and the
    reference."""
    texts = [tokenizer.decode(g.tokens) for g in gens]
    owner = [items[i // group] for i in range(len(gens))]
    completions = [[{"role": "assistant", "content": t}]
                   if isinstance(p.prompt, list) else t for p, t in zip(owner, texts)]
    columns = {key: [p.columns.get(key) for p in owner]
               for key in dict.fromkeys(c for p in items for c in p.columns)}
    columns.setdefault("reference", [p.reference for p in owner])
    table, total = rewards([p.prompt for p in owner], completions,
                           [g.tokens for g in gens], columns)
    return owner, texts, table, total


# ----------------------------------------------------------------------------- the batch


def collate(prompts: list[list[int]], completions: list[Completion], group_size: int,
            pad_id: int, pad_multiple: int, mask_truncated: bool = False
            ) -> tuple[mx.array, mx.array]:
    """(tokens, mask) [R, L]: row i is prompt i // group_size + completion i (and its stop
    token), right-padded to a multiple of pad_multiple; the mask on the completion's tokens
    (none for a truncated completion with mask_truncated)."""
    lead = [prompts[i // group_size] for i in range(len(completions))]
    return _completion_rows(lead, completions, pad_id, pad_multiple, mask_truncated)


def collate_shared(prompts: list[list[int]], completions: list[Completion], group_size: int,
                   pad_id: int, pad_multiple: int, mask_truncated: bool = False
                   ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """The same batch with each prompt once (objectives.grpo, "shared prompts"): (tokens,
    mask) [R, W]: row i is its prompt's last token, then completion i (and its stop token),
    right-padded to a multiple of pad_multiple, the mask as `collate`'s; (prompts [R /
    group_size, P], lengths): each prompt less its last token, right-padded (P >= 1)."""
    lead = [prompts[i // group_size][-1:] for i in range(len(completions))]
    tokens, mask = _completion_rows(lead, completions, pad_id, pad_multiple, mask_truncated)
    heads = [p[:-1] for p in prompts]
    heads_arr, _ = _padded(heads, pad_id, pad_multiple)
    lengths = np.array([len(h) for h in heads], dtype=np.int32)
    return tokens, mask, mx.array(heads_arr), mx.array(lengths)


def _completion_rows(lead: list[list[int]], completions: list[Completion], pad_id: int,
                     pad_multiple: int, mask_truncated: bool) -> tuple[mx.array, mx.array]:
    """Rows lead[i] + completion i (and its stop token), padded; the mask on the
    completion's tokens (none for a truncated one with mask_truncated)."""
    rows = [h + c.tokens + ([c.stop] if c.stopped else []) for h, c in zip(lead, completions)]
    tokens, mask = _padded(rows, pad_id, pad_multiple)
    for i, (h, c) in enumerate(zip(lead, completions)):
        mask[i, :len(h)] = False
        if mask_truncated and not c.stopped:
            mask[i] = False
    return mx.array(tokens), mx.array(mask)


def _padded(rows: list[list[int]], pad_id: int, pad_multiple: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """rows right-padded to a multiple of pad_multiple (at least one column), and where
    they hold tokens."""
    width = max(1, max(len(r) for r in rows))
    width = -(-width // pad_multiple) * pad_multiple
    tokens = np.full((len(rows), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
        mask[i, :len(r)] = True
    return tokens, mask
