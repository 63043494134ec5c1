"""The few-shot side of an evaluation: the base with k training examples as earlier turns.

Which examples. For every held-out record, the k training records whose request is
nearest by word overlap: the Jaccard similarity of the two sets of casefolded words
(`\\w+`) of the user turns (the prompt, for prompt/completion data), ties broken by the
earlier training record, so the choice is deterministic and needs no model. A training
record whose request is the held-out request itself (the same words, a leaked copy) is
never a shot. Shots come from the train split only: `build` is given the train records,
never the held-out ones.

How they are laid out. A chat conversation: the held-out record's system message (if
any), then each shot's turns (user, assistant, ... without its own system message), the
least similar first and the nearest last, just before the held-out request; then the
held-out conversation up to its last answer. Prompt/completion data without a chat
template is plain text: each shot as prompt + completion + a blank line, then the prompt.

Fitted to the context. The prompt plus `max_new_tokens`, and the whole conversation with
the reference answer (for the loss), must fit the model's context window
(max_position_embeddings); shots that would overflow it are dropped, the least similar
first. (data.max_seq_len bounds the training examples, not these prompts.)

The loss of the few-shot side is the reference answer's cross-entropy in that context:
the held-out record's assistant turns only, never the shots' answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlxtune.data import Example, Record
from mlxtune.data.encode import _Encoder, _is_prefix
from mlxtune.errors import DataError

_WORD = re.compile(r"\w+")
SELECTION = ("nearest by word overlap (Jaccard similarity of the casefolded words of the "
             "request), least similar first; copies of the held-out request excluded")


@dataclass
class Turns:
    """A record as a conversation: system text, turns (ending with the answer), tools;
    or, for prompt/completion data without a chat template, `plain` (prompt, completion)."""
    system: str | None
    turns: list[dict]
    tools: list | None
    request: str  # the text similarity is computed on
    plain: tuple[str, str] | None = None


@dataclass
class Shot:
    prompt: list[int]          # the prompt to generate from
    example: Example | None    # the reference answer in this context, for the loss
    shots: list[int]           # indices (into the train records) of the shots used
    dropped: int               # shots left out to fit the context


def to_turns(record: Record, fmt: str, has_template: bool) -> Turns | None:
    """The record as a conversation; None for text data (nothing to answer)."""
    d = record.data
    if fmt == "text":
        return None
    if fmt == "preference":
        from mlxtune.data.preference import parts

        prompt, chosen, _, tools = parts(record)
        if isinstance(prompt, str):
            d, fmt = {"prompt": prompt, "completion": chosen if isinstance(chosen, str)
                      else (chosen[-1].get("content") or "")}, "completions"
        else:
            d, fmt = {"messages": list(prompt) + list(chosen[-1:]), "tools": tools}, "chat"
    if fmt == "completions":
        if not has_template:
            return Turns(None, [], None, d["prompt"], (d["prompt"], d["completion"]))
        return Turns(None, [{"role": "user", "content": d["prompt"]},
                            {"role": "assistant", "content": d["completion"]}],
                     None, d["prompt"])
    messages = d["messages"]
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0].get("content") or "", messages[1:]
    request = " ".join(m.get("content") or "" for m in messages if m["role"] == "user")
    return Turns(system, list(messages), d.get("tools") or None, request)


def words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.casefold()))


def similarity(a: frozenset, b: frozenset) -> float:
    """Jaccard similarity of two word sets (0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


class Selector:
    """The k nearest training records of a request (module docstring)."""

    def __init__(self, train: list[Turns]):
        self.train = train
        self.sets = [words(t.request) for t in train]
        self.index: dict[str, list[int]] = {}
        for i, s in enumerate(self.sets):
            for w in s:
                self.index.setdefault(w, []).append(i)

    def nearest(self, request: str, k: int) -> list[int]:
        """Indices of the k nearest training records, nearest first."""
        if k <= 0 or not self.train:
            return []
        q = words(request)
        shared: dict[int, int] = {}
        for w in q:
            for i in self.index.get(w, ()):
                shared[i] = shared.get(i, 0) + 1
        scored = []
        for i, n in shared.items():
            if self.sets[i] == q:
                continue  # the held-out request itself, leaked into train
            scored.append((-(n / (len(q) + len(self.sets[i]) - n)), i))
        scored.sort()
        chosen = [i for _, i in scored[:k]]
        if len(chosen) < k:  # too few with a shared word: the earliest of the others
            taken = set(chosen) | {i for i, s in enumerate(self.sets) if s == q}
            chosen += [i for i in range(len(self.train)) if i not in taken][:k - len(chosen)]
        return chosen


class Builder:
    """Few-shot prompts and loss examples for held-out records."""

    def __init__(self, tokenizer, train: list[Record], train_fmt: str, k: int,
                 context: int, max_new_tokens: int, mask_history: bool = False):
        self.tok = tokenizer
        self.k, self.context, self.max_new = k, context, max_new_tokens
        self.encoder = _Encoder(tokenizer, True, mask_history)
        self.has_template = self.encoder.has_template
        turns = [to_turns(r, train_fmt, self.has_template) for r in train]
        self.train = [t for t in turns if t is not None]
        self.selector = Selector(self.train)

    def build(self, record: Record, fmt: str) -> Shot | None:
        """The few-shot prompt (and loss example) of a held-out record; None for text."""
        held = to_turns(record, fmt, self.has_template)
        if held is None:
            return None
        order = self.selector.nearest(held.request, self.k)[::-1]  # nearest last
        for dropped in range(len(order) + 1):
            used = order[dropped:]
            prompt, example = self._render(held, [self.train[i] for i in used], record.source)
            if (len(prompt) + self.max_new <= self.context
                    and (example is None or len(example.tokens) <= self.context)):
                return Shot(prompt, example, used, dropped)
        return Shot(prompt, example, [], len(order))  # too long even alone: as the base has it

    # ------------------------------------------------------------------ rendering

    def _render(self, held: Turns, shots: list[Turns], source: str):
        if held.plain is not None:
            return self._plain(held, shots, source)
        system = [{"role": "system", "content": held.system}] if held.system is not None else []
        context = system + [m for s in shots for m in s.turns]
        prompt_messages = context + held.turns[:-1]
        kwargs = {"tools": held.tools} if held.tools else {}
        try:
            prompt = _ids(self.tok.apply_chat_template(
                prompt_messages, add_generation_prompt=True, tokenize=True, **kwargs))
        except Exception as e:  # jinja refuses some conversations
            raise DataError(f"{source}: the chat template cannot render the few-shot "
                            f"prompt: {e}") from None
        full = context + held.turns
        tokens, mask = self.encoder._chat(full, held.tools, source)
        if shots:  # the shots' answers are context, not targets
            try:
                prefix = _ids(self.tok.apply_chat_template(context, tokenize=True, **kwargs))
            except Exception:
                prefix = None
            if prefix is not None and _is_prefix(prefix, tokens):
                mask = [False] * len(prefix) + mask[len(prefix):]
            else:  # a template that does not render prefixes as prefixes: the last answer
                last = _last_span(mask)
                mask = [last[0] <= i < last[1] for i in range(len(mask))]
        mask = [False, *mask[1:]] if mask else mask
        return prompt, Example(tokens, mask, source) if any(mask) else None

    def _plain(self, held: Turns, shots: list[Turns], source: str):
        p, c = held.plain
        text = "".join(f"{s.plain[0]}{s.plain[1]}\n\n" for s in shots if s.plain) + p
        prompt = list(self.tok.encode(text, add_special_tokens=True))
        tokens, mask = self.encoder._plain_completion(text, c)
        mask = [False, *mask[1:]]
        return prompt, Example(tokens, mask, source) if any(mask) else None


def _ids(out) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _last_span(mask: list[bool]) -> tuple[int, int]:
    end = max((i + 1 for i, m in enumerate(mask) if m), default=0)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return start, end


def model_context(config: dict, tokenizer=None) -> int:
    """The model's context window in tokens (max_position_embeddings, else the tokenizer's
    model_max_length when plausible, else 2048)."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10_000_000:
        return value
    return 2048
