"""Records -> token ids and a loss mask.

``mask[i]`` is True when token i is a target (predicted from position i - 1), so
``mask[0]`` is always False. With ``mask_prompt`` (the default for chat and completions
data) the targets are exactly the assistant turns: their content and the end-of-turn token
the template writes after it; with ``mask_history``, only the last assistant turn is (the
earlier ones are context). Text data has no prompt: every token is a target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mlxtune.data.records import Record
from mlxtune.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Example:
    tokens: list[int]
    mask: list[bool]  # same length as tokens; True = loss-bearing target
    source: str  # "file:line" of the record it came from


@dataclass
class EncodedSplit:
    examples: list[Example]
    format: str  # 'chat' | 'completions' | 'text'
    n_truncated: int  # examples cut to max_seq_len
    n_dropped: int  # examples with no loss-bearing token left (not in `examples`)


def resolve_mask_prompt(mask_prompt: bool | None, fmt: str, where: str) -> bool:
    """The effective mask_prompt for a format; True asked of text data is an error."""
    if fmt == "text":
        if mask_prompt:
            raise DataError(f"{where}: data.mask_prompt is true, but this file is text data, "
                            "which has no prompt to mask; use chat or prompt/completion "
                            "records, or leave data.mask_prompt unset")
        return False
    return True if mask_prompt is None else bool(mask_prompt)


def encode(records: list[Record], tokenizer, max_seq_len: int, mask_prompt: bool | None,
           fmt: str, mask_history: bool = False) -> EncodedSplit:
    """Tokenize and mask every record; truncate to max_seq_len (keeping the start) and drop
    examples left without a target. Both are counted for the caller to report."""
    out = EncodedSplit([], fmt, 0, 0)
    if not records:
        return out
    if fmt == "preference":
        raise DataError(f"{records[0].source}: preference pairs are not single examples; "
                        "they are encoded by mlxtune.data.preference.encode_pairs")
    mask_prompt = resolve_mask_prompt(mask_prompt, fmt, records[0].source)
    if mask_history and not mask_prompt:
        raise DataError(f"{records[0].source}: data.mask_history puts the loss on the last "
                        "assistant turn only, which needs the prompt masked; unset "
                        "data.mask_prompt (or set it true), or data.mask_history false")
    encoder = _Encoder(tokenizer, mask_prompt, mask_history)
    for record in records:
        tokens, mask = encoder.encode(record, fmt)
        if len(tokens) > max_seq_len:
            tokens, mask = tokens[:max_seq_len], mask[:max_seq_len]
            out.n_truncated += 1
        mask = [False, *mask[1:]] if mask else mask
        if not any(mask):
            out.n_dropped += 1
            continue
        out.examples.append(Example(tokens, mask, record.source))
    return out


class _Encoder:
    """The tokenizer-facing half of `encode`; remembers whether it has warned."""

    def __init__(self, tokenizer, mask_prompt: bool, mask_history: bool = False):
        self.tok, self.mask_prompt, self.mask_history = tokenizer, mask_prompt, mask_history
        self.has_template = _has_chat_template(tokenizer)
        self.eos_ids = _eos_ids(tokenizer)
        self.eos = getattr(tokenizer, "eos_token_id", None)
        self.warned = False

    def encode(self, record: Record, fmt: str) -> tuple[list[int], list[bool]]:
        d = record.data
        if fmt == "text":
            return self._with_eos(self._ids(d["text"], special=True), [])
        if fmt == "completions" and not self.has_template:
            return self._plain_completion(d["prompt"], d["completion"])
        if fmt == "completions":
            messages = [{"role": "user", "content": d["prompt"]},
                        {"role": "assistant", "content": d["completion"]}]
        else:
            messages = d["messages"]
        if not self.has_template:
            raise DataError(f"{record.source}: chat data needs a tokenizer with a chat "
                            "template, and this model's tokenizer has none; use "
                            "prompt/completion or text records")
        return self._chat(messages, d.get("tools") or None, record.source)

    # ------------------------------------------------------------------ text, completions

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=special))

    def _with_eos(self, prompt: list[int], target: list[int]) -> tuple[list[int], list[bool]]:
        """prompt + target (+ EOS unless already there); text data passes all as target."""
        tokens = prompt + target
        if self.eos is not None and (not tokens or tokens[-1] != self.eos):
            tokens.append(self.eos)
        n_prompt = len(prompt) if target else 0
        return tokens, [i >= n_prompt for i in range(len(tokens))]

    def _plain_completion(self, prompt: str, completion: str):
        # Tokenized apart, as at inference: the prompt's tokens are fixed before generating.
        prompt_ids = self._ids(prompt, special=True)
        tokens, mask = self._with_eos(prompt_ids, self._ids(completion, special=False))
        return tokens, mask if self.mask_prompt else [True] * len(tokens)

    # ------------------------------------------------------------------ chat

    def _render(self, messages: list[dict], tools, generation_prompt: bool) -> list[int]:
        kwargs = {"tools": tools} if tools else {}
        out = self.tok.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                           tokenize=True, **kwargs)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def _chat(self, messages: list[dict], tools, source: str):
        try:
            full = self._render(messages, tools, False)
        except Exception as e:  # jinja raises on conversations a template refuses
            raise DataError(f"{source}: the chat template cannot render this conversation: "
                            f"{e}") from None
        if not self.mask_prompt:
            return full, [True] * len(full)
        spans = self._assistant_spans(messages, tools, full)
        if spans is None:
            start = self._last_turn_start(messages, tools, full, source)
            spans = [(start, self._end_of_turn(full, start))]
        if self.mask_history:
            spans = spans[-1:]
        mask = [False] * len(full)
        for start, end in spans:
            mask[start:end] = [True] * (end - start)
        return full, mask

    def _assistant_spans(self, messages, tools, full) -> list[tuple[int, int]] | None:
        """[start, end) of each assistant turn, from renders of growing prefixes of the
        conversation; None when the template does not render prefixes as prefixes."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            try:
                prompt = self._render(messages[:i], tools, True)
                upto = full if i == len(messages) - 1 else self._render(messages[: i + 1],
                                                                         tools, False)
            except Exception:  # e.g. a template that refuses a conversation without a user turn
                return None
            if not (_is_prefix(prompt, upto) and _is_prefix(upto, full)):
                return None
            spans.append((len(prompt), self._end_of_turn(upto, len(prompt))))
        return spans

    def _end_of_turn(self, tokens: list[int], start: int) -> int:
        """End of the turn's targets: just after its last end-of-turn token, so the newline
        or spacing a template puts after it (never generated) is not learned."""
        for j in range(len(tokens) - 1, start - 1, -1):
            if tokens[j] in self.eos_ids:
                return j + 1
        return len(tokens)

    def _last_turn_start(self, messages, tools, full, source: str) -> int:
        """Fallback when prefixes do not render as prefixes: mask everything before the
        last assistant message (the common prefix with the rendered prompt)."""
        if not self.warned:
            log.warning("%s: the chat template does not render a conversation's prefixes as "
                        "prefixes of it; the loss covers only the last assistant message "
                        "(not every assistant turn) for such conversations", source)
            self.warned = True
        try:
            prompt = self._render(messages[:-1], tools, True)
        except Exception:
            return 0
        n = 0
        while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
            n += 1
        return n


def _is_prefix(a: list[int], b: list[int]) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


def _has_chat_template(tokenizer) -> bool:
    flag = getattr(tokenizer, "has_chat_template", None)
    return bool(flag) if flag is not None else bool(getattr(tokenizer, "chat_template", None))


def _eos_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "eos_token_ids", None) or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
