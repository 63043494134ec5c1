"""Preference pairs: records -> (chosen, rejected) token rows -> batches of pairs.

A pair is two examples that share their prompt's tokens: prompt + chosen answer and
prompt + rejected answer, each with the mask on its answer's tokens only (the answer's
content and the end-of-turn token the template writes after it, as for SFT's assistant
turns). Records come in TRL's shapes (validated by records.check_preference):

- standard: "prompt", "chosen", "rejected" strings; with a chat template they are rendered
  as one user turn and one assistant turn (as completions records are), without one as
  plain text plus EOS;
- conversational: "prompt" a message list, "chosen" / "rejected" the assistant turns that
  follow it; or, with no "prompt", two whole conversations whose shared leading messages
  are the prompt.

A batch of B pairs is 2B rows: the chosen rows first, then the rejected ones in the same
order (what mlxtune.objectives.preference expects).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlx.core as mx

from mlxtune.data.batches import batch_order, collate
from mlxtune.data.encode import Example, _Encoder
from mlxtune.data.records import Record, split_implicit_prompt
from mlxtune.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    source: str  # "file:line" of the record

    def __len__(self) -> int:  # the wider row: what the pair costs in a batch
        return max(len(self.chosen.tokens), len(self.rejected.tokens))


@dataclass
class EncodedPairs:
    pairs: list[Pair]
    n_truncated: int  # pairs with a row cut to max_seq_len
    n_dropped: int  # pairs with a row left without an answer token (not in `pairs`)
    format: str = "preference"

    @property
    def examples(self) -> list[Pair]:  # the name data.EncodedSplit uses
        return self.pairs


def parts(record: Record) -> tuple:
    """(prompt, chosen, rejected, tools) of a validated record: strings, or message lists."""
    d = record.data
    prompt, chosen, rejected = d.get("prompt"), d["chosen"], d["rejected"]
    if prompt is None:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected, record.source)
    return prompt, chosen, rejected, d.get("tools") or None


def encode_pairs(records: list[Record], tokenizer, max_seq_len: int) -> EncodedPairs:
    """Tokenize and mask every pair; truncate rows to max_seq_len (keeping the start) and
    drop pairs with a row left without an answer token. Both are counted."""
    out = EncodedPairs([], 0, 0)
    if not records:
        return out
    enc = _PairEncoder(tokenizer)
    for record in records:
        rows, truncated = [], False
        prompt, chosen, rejected, tools = parts(record)
        for answer in (chosen, rejected):
            tokens, mask = enc.encode(prompt, answer, tools, record.source)
            if len(tokens) > max_seq_len:
                tokens, mask, truncated = tokens[:max_seq_len], mask[:max_seq_len], True
            rows.append(Example(tokens, [False, *mask[1:]], record.source))
        out.n_truncated += truncated
        if not all(any(r.mask) for r in rows):
            out.n_dropped += 1
            continue
        out.pairs.append(Pair(rows[0], rows[1], record.source))
    return out


class _PairEncoder(_Encoder):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, mask_prompt=True)
        self.warned_prefix = False

    def encode(self, prompt, answer, tools, source: str) -> tuple[list[int], list[bool]]:
        if isinstance(prompt, str) and not self.has_template:
            return self._plain_completion(prompt, answer)
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
            answer = [{"role": "assistant", "content": answer}]
        elif not self.has_template:
            raise DataError(f"{source}: conversational preference data needs a tokenizer with "
                            "a chat template, and this model's tokenizer has none; use "
                            "prompt/chosen/rejected strings")
        try:
            head = self._render(prompt, tools, True)
            full = self._render(prompt + answer, tools, False)
        except Exception as e:  # jinja raises on conversations a template refuses
            raise DataError(f"{source}: the chat template cannot render this pair: {e}") from None
        start = len(head)
        if full[:start] != head:
            # The template renders the prompt differently inside the whole conversation:
            # the answer starts where the two renders part.
            start = 0
            while start < min(len(head), len(full)) and head[start] == full[start]:
                start += 1
            if not self.warned_prefix:
                log.warning("%s: the chat template does not render the prompt as a prefix of "
                            "prompt + answer; the answer is taken to start where they differ",
                            source)
                self.warned_prefix = True
        end = self._end_of_turn(full, start)
        if end <= start:
            raise DataError(f"{source}: the answer has no tokens after the rendered prompt")
        return full, [start <= i < end for i in range(len(full))]


# ----------------------------------------------------------------------------- batches


def collate_pairs(pairs: list[Pair], pad_id: int,
                  pad_multiple: int = 8) -> tuple[mx.array, mx.array]:
    """tokens int32 [2B, L] and mask float32 [2B, L]: chosen rows, then rejected rows."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, pad_multiple)


class PairBatcher:
    """The trainer's batches of pairs: length-grouped by a pair's wider row (or, by_length
    false, random pairs), in a shuffled order that is a function of (lengths, batch size,
    seed, epoch), as data.batcher's."""

    packed = False

    def __init__(self, pairs: list[Pair], batch_size: int, seed: int, pad_id: int,
                 pad_multiple: int, by_length: bool = True):
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.pad_id, self.pad_multiple, self.by_length = pad_id, pad_multiple, by_length
        self.lengths = [len(p) for p in pairs]
        self._orders: dict[int, list] = {}

    @property
    def layout(self) -> str:  # as data.batcher.Batcher's
        return "by_length" if self.by_length else "random"

    def order(self, epoch: int) -> list[list[int]]:
        if epoch not in self._orders:
            self._orders = {epoch: batch_order(self.lengths, self.batch_size, self.seed, epoch,
                                               self.by_length)}
        return self._orders[epoch]

    def arrays(self, batch: list[int]) -> tuple[mx.array, mx.array]:
        return collate_pairs([self.pairs[i] for i in batch], self.pad_id, self.pad_multiple)

    def batches_per_epoch(self) -> int:
        return len(self.order(0))

    def describe(self) -> str:
        kind = "length-grouped" if self.by_length else "random"
        return (f"batches: {self.batches_per_epoch()} per epoch of {self.batch_size} "
                f"{kind} pairs ({2 * self.batch_size} rows)")
