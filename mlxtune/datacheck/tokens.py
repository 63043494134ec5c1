"""Token-level facts of a split, from exactly the encoding a run uses.

Every record is encoded by ``mlxtune.data.encode``'s own encoder (same chat template, same
loss mask, ``mask_prompt`` / ``mask_history`` as configured), untruncated, so that what
``data.max_seq_len`` would cut can be counted: a run keeps an example's first
max_seq_len tokens and drops an example left without a loss-bearing token. The only
difference is speed: the renders the encoder asks for are made ahead, a few hundred
conversations per call of the tokenizer's batched ``apply_chat_template`` (the same
template and tokenizer call, on a list), and handed to it from a cache; anything not in
the cache is rendered as the encoder always does. Only the tokenizer is loaded, never
the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxtune.data.encode import _Encoder, resolve_mask_prompt
from mlxtune.errors import DataError, ModelError

log = logging.getLogger(__name__)

BATCH = 256  # records whose renders are made in one batched call
TOKENIZER_PATTERNS = ["*.json", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt",
                      "*.jinja", "*.py"]


def load_tokenizer(model_cfg):
    """(tokenizer, what it is) for model.path without loading any weights: a GGUF file's
    header, an mlx-lm folder's tokenizer files, or a hub repo's (tokenizer files only)."""
    from mlxtune import models

    source = models.resolve(model_cfg.path)
    if source.kind in ("gguf", "packaged"):
        from mlxtune.models import gguf_file
        from mlxtune.models.gguf_tokenizer import build_tokenizer

        header = gguf_file.read(source.location)
        return build_tokenizer(header.metadata, source.location), source.given
    folder = Path(source.location)
    if source.kind == "hub":
        folder = _hub_tokenizer(source.location, model_cfg.revision)
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    try:
        return mlx_load_tokenizer(folder), source.given
    except Exception as e:  # noqa: BLE001  (transformers raises many kinds)
        text = str(e).strip().splitlines()
        raise ModelError(f"model.path: {folder}: cannot load the tokenizer: "
                         f"{type(e).__name__}: {text[0] if text else ''}") from None


def _hub_tokenizer(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - a dependency
        raise ModelError(f"model.path: {repo_id}: huggingface-hub is not installed ({e})")
    try:
        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=TOKENIZER_PATTERNS))
    except LocalEntryNotFoundError:
        raise ModelError(f"model.path: {repo_id} is not in the local Hugging Face cache and "
                         "the hub cannot be reached (offline?); download it once while "
                         "online, or point model.path at a local folder or .gguf file") \
            from None
    except Exception as e:  # noqa: BLE001  (network errors come in many types)
        text = str(e).strip().splitlines()
        raise ModelError(f"model.path: {repo_id}: could not fetch the tokenizer: "
                         f"{type(e).__name__}: {text[0] if text else ''}") from None


# ----------------------------------------------------------------------------- encoding


class _Prerendered(_Encoder):
    """The run's encoder, with its chat renders made ahead in batches (see the module)."""

    def __init__(self, tokenizer, mask_prompt: bool, mask_history: bool):
        super().__init__(tokenizer, mask_prompt, mask_history)
        self.cache: dict = {}
        self.messages: dict[int, list] = {}  # completions records as the encoder builds them
        self.batched = self.has_template and getattr(tokenizer, "_chat_template", None) is None

    def encode(self, record, fmt: str):
        if fmt == "completions" and self.has_template and id(record) in self.messages:
            d = record.data
            return self._chat(self.messages[id(record)], d.get("tools") or None,
                              record.source)
        return super().encode(record, fmt)

    def _render(self, messages, tools, generation_prompt: bool):
        hit = self.cache.get(_key(messages, tools, generation_prompt))
        if hit is not None:
            return hit
        return super()._render(messages, tools, generation_prompt)

    def conversations(self, records, fmt: str) -> list[tuple[list, list | None]]:
        """(messages, tools) the encoder renders for each record (None for plain text)."""
        self.messages.clear()  # the previous chunk's
        out = []
        for record in records:
            d = record.data
            if fmt == "chat":
                out.append((d["messages"], d.get("tools") or None))
            elif fmt == "completions" and self.has_template:
                messages = [{"role": "user", "content": d["prompt"]},
                            {"role": "assistant", "content": d["completion"]}]
                self.messages[id(record)] = messages
                out.append((messages, d.get("tools") or None))
            else:
                out.append((None, None))
        return out

    def prefetch(self, convs) -> None:
        """Render, in batches, what `_chat` will ask for these conversations."""
        self.cache.clear()
        if not self.batched:
            return
        groups: dict = {}
        for messages, tools in convs:
            if messages is None:
                continue
            wanted = [(messages, False)]
            if self.mask_prompt:
                last = len(messages) - 1
                for i, m in enumerate(messages):
                    if m.get("role") == "assistant" and i > 0:
                        wanted.append((messages[:i], True))
                        if i != last:
                            wanted.append((messages[:i + 1], False))
            for msgs, gen in wanted:
                key = _key(msgs, tools, gen)
                group = groups.setdefault((id(tools) if tools else None, gen), (tools, {}))
                group[1].setdefault(key, msgs)
        for (_, gen), (tools, wanted) in groups.items():
            keys, batch = list(wanted), list(wanted.values())
            kwargs = {"tools": tools} if tools else {}
            try:
                out = self.tok.apply_chat_template(batch, add_generation_prompt=gen,
                                                   tokenize=True, **kwargs)
            except Exception:  # noqa: BLE001  (one refused conversation: render one by one)
                continue
            ids = out["input_ids"] if hasattr(out, "keys") else out
            if len(ids) != len(keys):
                continue
            for key, tokens in zip(keys, ids):
                self.cache[key] = list(tokens)

    def rendered_text(self, convs) -> list[str | None]:
        """Each conversation rendered as text (None where there is none or it fails)."""
        out: list[str | None] = [None] * len(convs)
        groups: dict = {}
        for i, (messages, tools) in enumerate(convs):
            if messages is not None:
                groups.setdefault(id(tools) if tools else None, (tools, []))[1].append(i)
        for tools, members in groups.values():
            kwargs = {"tools": tools} if tools else {}
            try:
                texts = self.tok.apply_chat_template([convs[i][0] for i in members],
                                                     tokenize=False, **kwargs)
                if isinstance(texts, str) or len(texts) != len(members):
                    raise ValueError
            except Exception:  # noqa: BLE001
                texts = []
                for i in members:
                    try:
                        texts.append(self.tok.apply_chat_template(convs[i][0], tokenize=False,
                                                                  **kwargs))
                    except Exception:  # noqa: BLE001  (encoding reports it)
                        texts.append(None)
            for i, text in zip(members, texts):
                out[i] = text if isinstance(text, str) else None
        return out


def _key(messages, tools, generation_prompt: bool) -> tuple:
    # The message objects themselves (alive while their records are), not their text.
    return (tuple(map(id, messages)), id(tools) if tools else None, generation_prompt)


# ----------------------------------------------------------------------------- statistics


@dataclass
class SplitTokens:
    """Per example of a split, untruncated: tokens, loss-bearing tokens and those that fall
    within max_seq_len; plus the examples whose answers the template cuts."""
    lengths: np.ndarray
    loss: np.ndarray
    kept_loss: np.ndarray
    turns: np.ndarray
    template_cuts: list[tuple[str, str]] = field(default_factory=list)  # (source, answer)

    def __len__(self) -> int:
        return len(self.lengths)


def split_tokens(records, fmt: str, tokenizer, data_cfg, progress=None) -> SplitTokens:
    """The token facts of one split (see SplitTokens); raises DataError as a run would."""
    n = len(records)
    lengths, loss, kept, turns = (np.zeros(n, np.int64) for _ in range(4))
    if not n:
        return SplitTokens(lengths, loss, kept, turns)
    max_len = data_cfg.max_seq_len
    if fmt == "preference":
        return _pair_tokens(records, tokenizer, max_len)
    mask_prompt = resolve_mask_prompt(data_cfg.mask_prompt, fmt, records[0].source)
    if data_cfg.mask_history and not mask_prompt:
        raise DataError(f"{records[0].source}: data.mask_history puts the loss on the last "
                        "assistant turn only, which needs the prompt masked; unset "
                        "data.mask_prompt (or set it true), or data.mask_history false")
    encoder = _Prerendered(tokenizer, mask_prompt, data_cfg.mask_history)
    cuts: list[tuple[str, str]] = []
    for lo in range(0, n, BATCH):
        chunk = records[lo:lo + BATCH]
        convs = encoder.conversations(chunk, fmt)
        encoder.prefetch(convs)
        for i, record in enumerate(chunk):
            tokens, mask = encoder.encode(record, fmt)
            if mask:
                mask[0] = False  # as data.encode: token 0 is never a target
            lengths[lo + i] = len(tokens)
            loss[lo + i] = sum(mask)
            kept[lo + i] = sum(mask[:max_len])
            turns[lo + i] = _turns(record.data, fmt)
        if mask_prompt and encoder.has_template and fmt in ("chat", "completions"):
            cuts.extend(_cut_answers(chunk, convs, encoder, data_cfg.mask_history))
        if progress is not None:
            progress(min(lo + BATCH, n), n)
    encoder.cache.clear()
    return SplitTokens(lengths, loss, kept, turns, cuts)


@dataclass
class PromptTokens:
    """Per record of a split read for its prompts (grpo): the prompt's tokens as a run
    renders them (chat template and generation prompt), whether it has a reference answer,
    and the reference's own tokens (its text alone, no template; 0 without one). A grpo
    run trains on sampled completions, so no token of the data carries loss."""
    lengths: np.ndarray
    has_reference: np.ndarray
    reference_lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)


def prompt_tokens(records, fmt: str, tokenizer) -> PromptTokens:
    """PromptTokens of one split, by the run's own prompt encoder (objective rollout's
    encode_prompts), untruncated; raises DataError as a run would (e.g. for text data)."""
    from mlxtune.objectives.rollout import encode_prompts

    n = len(records)
    lengths, refs = np.zeros(n, np.int64), np.zeros(n, np.int64)
    has = np.zeros(n, bool)
    if not n:
        return PromptTokens(lengths, has, refs)
    # No room limit: every prompt is kept, in order, so lengths can be set against any.
    prompts = encode_prompts(records, fmt, tokenizer, 1 << 62, 0).examples
    for i, p in enumerate(prompts):
        lengths[i] = len(p.tokens)
        if p.reference is not None:
            has[i] = True
            refs[i] = len(tokenizer.encode(str(p.reference), add_special_tokens=False))
    return PromptTokens(lengths, has, refs)


def render_prompt(record, fmt: str, tokenizer) -> tuple[str, str | None]:
    """(the prompt as the model sees it, generation prompt included; its reference)."""
    from mlxtune.objectives.rollout import encode_prompts

    p = encode_prompts([record], fmt, tokenizer, 1 << 62, 0).examples[0]
    return tokenizer.decode(p.tokens), p.reference


def _turns(data: dict, fmt: str) -> int:
    if fmt == "chat":
        return sum(1 for m in data["messages"] if m.get("role") == "assistant")
    return 1


def _cut_answers(chunk, convs, encoder: _Prerendered, mask_history: bool):
    """Answers that do not appear in the rendered conversation (a template that drops or
    rewrites them: the model never learns them as written)."""
    texts = encoder.rendered_text(convs)
    for record, (messages, _), text in zip(chunk, convs, texts):
        if messages is None or text is None:
            continue
        answers = [m for m in messages if m.get("role") == "assistant"]
        for m in answers[-1:] if mask_history else answers:
            content = m.get("content")
            if isinstance(content, str) and content.strip() and content.strip() not in text:
                yield record.source, content.strip()
                break


def _pair_tokens(records, tokenizer, max_len: int) -> SplitTokens:
    from mlxtune.data.preference import encode_pairs

    n = len(records)
    lengths, loss, kept, turns = (np.zeros(n, np.int64) for _ in range(4))
    big = 1 << 62
    for lo in range(0, n, BATCH):
        chunk = records[lo:lo + BATCH]
        enc = encode_pairs(chunk, tokenizer, big)
        by_source = {p.source: p for p in enc.pairs}
        for i, record in enumerate(chunk):
            pair = by_source.get(record.source)
            turns[lo + i] = 1
            if pair is None:  # a row without an answer token even untruncated
                continue
            rows = (pair.chosen, pair.rejected)
            lengths[lo + i] = max(len(r.tokens) for r in rows)
            loss[lo + i] = sum(sum(r.mask) for r in rows)
            # A run drops a pair when either row loses every answer token.
            row_kept = [sum(r.mask[:max_len]) for r in rows]
            kept[lo + i] = sum(row_kept) if all(row_kept) else 0
    return SplitTokens(lengths, loss, kept, turns)


# ----------------------------------------------------------------------------- one example


def render_example(record, fmt: str, tokenizer, data_cfg) -> list[tuple[str, bool]]:
    """(text, carries loss) pieces of one example as a run encodes it (untruncated)."""
    if fmt == "preference":
        from mlxtune.data.preference import encode_pairs

        enc = encode_pairs([record], tokenizer, 1 << 62)
        if not enc.pairs:
            return []
        tokens, mask = enc.pairs[0].chosen.tokens, enc.pairs[0].chosen.mask
    else:
        mask_prompt = resolve_mask_prompt(data_cfg.mask_prompt, fmt, record.source)
        encoder = _Encoder(tokenizer, mask_prompt, data_cfg.mask_history)
        tokens, mask = encoder.encode(record, fmt)
        mask = [False, *mask[1:]] if mask else mask
    pieces: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or mask[i] != mask[start]:
            pieces.append((tokenizer.decode(tokens[start:i]), bool(mask[start])))
            start = i
    return pieces
