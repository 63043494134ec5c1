"""What the text-level checks compare: each record as normalised words, hashed.

Normalising is ``normalise``: lower case (casefold), every Unicode punctuation character
(category P*) a space, runs of whitespace one space: "Buy milk!" and "buy  milk" are the
same text. ``index`` computes the same words for every record at once (numpy over the
code points; 50,000 conversations in a few seconds where Python's str.split alone takes
longer) and keeps, per record, 64-bit hashes:

- ``exact``: the whole record (every message with its role, system prompts and tools
  included): records with the same are exact duplicates;
- ``prompt`` / ``answer``: the messages before the last assistant message / from it on
  (completions: prompt / completion; preference pairs: the prompt / (chosen, rejected),
  and ``reverse``, the pair with its answers swapped): the same prompt with another
  answer is a conflict;
- the words near-duplicates are measured on (``near_words``): every message but the
  system prompts (usually one instruction shared by the whole set, which would make
  distinct examples look alike) and tool lists; ``near_key`` hashes them.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Control characters other than tab, newline and carriage return.
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
MASK = (1 << 64) - 1
CHUNK_CHARS = 1 << 23  # code points normalised at once (x 4 + 8 bytes each)

# Segment kinds: a message's role, or a field of the other formats.
ROLES = {"system": 1, "user": 2, "assistant": 3, "tool": 4}
TOOLS, PROMPT, COMPLETION, TEXT = 5, 6, 7, 8
CHOSEN, REJECTED = 16, 32  # added to a role for the answers of a preference pair
NOT_NEAR = {ROLES["system"], TOOLS}  # left out of the near-duplicate words


@lru_cache(maxsize=1)
def separators() -> np.ndarray:
    """[0x110000] bool: True for punctuation (P*) and whitespace (str.isspace)."""
    table = np.zeros(sys.maxunicode + 1, bool)
    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        if ch.isspace() or unicodedata.category(ch).startswith("P"):
            table[cp] = True
    return table


@lru_cache(maxsize=1)
def _punctuation() -> re.Pattern:
    chars = np.flatnonzero(separators())
    return re.compile("[" + "".join(re.escape(chr(c)) for c in chars) + "]+")


def normalise(text: str) -> str:
    """The reference: "Buy milk!" -> "buy milk" (``index`` computes these words)."""
    return " ".join(_punctuation().sub(" ", text.casefold()).split())


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: uint64 -> well-spread uint64 (wrapping)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _mix1(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def _fold(values) -> int:
    h = 0x243F6A8885A308D3
    for v in values:
        h = _mix1((h * 0x100000001B3 + int(v) + 1) & MASK)
    return h


def word_hashes(text: str) -> np.ndarray:
    """The hashes of one text's normalised words (as ``index`` computes them)."""
    words, _ = _words([text.casefold()])
    return words


def _words(segments: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(word hashes, words per segment) of casefolded segments, all at once. A word's hash
    is mix(sum of code point x P^position), P odd, mod 2^64."""
    lengths = np.fromiter((len(s) for s in segments), np.int64, len(segments))
    cps = np.frombuffer("".join(segments).encode("utf-32-le", "surrogatepass"), np.uint32)
    sep = separators()[cps]
    starts = np.zeros(len(segments), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    boundary = np.zeros(len(cps) + 1, bool)  # a segment's start ends the word before it
    boundary[starts[lengths > 0]] = True
    boundary[len(cps)] = True
    word = ~sep
    word_start = word & (np.r_[True, sep[:-1]] | boundary[:-1])
    word_end = word & (np.r_[sep[1:], True] | boundary[1:])
    first = np.flatnonzero(word_start)  # code point where each word starts
    if not len(first):
        return np.zeros(0, np.uint64), np.zeros(len(segments), np.int64)
    size = np.flatnonzero(word_end) - first + 1
    chars = cps[word].astype(np.uint64)
    within = np.arange(len(chars), dtype=np.int64)
    begin = np.zeros(len(size), np.int64)
    np.cumsum(size[:-1], out=begin[1:])
    within -= np.repeat(begin, size)
    with np.errstate(over="ignore"):
        chars *= _powers(int(size.max()))[within]
        hashes = mix(np.add.reduceat(chars, begin) + size.astype(np.uint64))
    segment = np.searchsorted(starts, first, side="right") - 1
    return hashes, np.bincount(segment, minlength=len(segments))


def _powers(n: int) -> np.ndarray:
    """P^0 .. P^(n-1) mod 2^64."""
    out = np.full(n, 0x100000001B3, np.uint64)
    out[0] = 1
    with np.errstate(over="ignore"):
        return np.multiply.accumulate(out)


@dataclass
class Index:
    """Per record: exact / prompt / answer / reverse hashes (python ints; prompt etc.
    None where the format has none), and the near-duplicate words."""
    exact: list[int]
    prompt: list[int | None]
    answer: list[int | None]
    reverse: list[int | None]
    near_words: np.ndarray   # word hashes, record after record
    near_offsets: np.ndarray  # record i's words: near_words[near_offsets[i]:near_offsets[i+1]]
    near_key: list[int]      # hash of a record's near words (equal: identical texts)


def _content(message: dict) -> str:
    text = message.get("content")
    text = text if isinstance(text, str) else ("" if text is None else json.dumps(text))
    if message.get("tool_calls"):
        text += " " + json.dumps(message["tool_calls"], sort_keys=True)
    return text


def segments(data: dict, fmt: str) -> list[tuple[int, str, str]]:
    """(kind, text, part) of a validated record; part is "prompt" or "answer" (chosen /
    rejected for preference pairs)."""
    if fmt == "chat":
        messages = data["messages"]
        # The answer is the last turn when it is the assistant's; a conversation read for
        # its prompt (grpo) may end with a user or tool turn: then it is all prompt.
        last = len(messages) - (messages[-1].get("role") == "assistant")
        out = [(ROLES.get(m.get("role"), 0), _content(m), "prompt" if i < last else "answer")
               for i, m in enumerate(messages)]
        if data.get("tools"):
            out.append((TOOLS, json.dumps(data["tools"], sort_keys=True), "prompt"))
        return out
    if fmt == "completions":
        # Read for prompts (grpo), "prompt" may be TRL's message list and "completion" a
        # list of assistant messages, or absent (a prompt alone).
        out = _side(data["prompt"], PROMPT, "prompt")
        if data.get("completion") is not None:
            out += _side(data["completion"], COMPLETION, "answer")
        return out
    if fmt == "text":
        return [(TEXT, data["text"], "answer")]
    from mlxtune.data.preference import parts

    prompt, chosen, rejected, tools = parts(_Record(data))
    out = []
    for value, part, offset in ((prompt, "prompt", 0), (chosen, "chosen", CHOSEN),
                                (rejected, "rejected", REJECTED)):
        if isinstance(value, str):
            kind = PROMPT if part == "prompt" else COMPLETION
            out.append((kind + offset, value, part))
        else:
            out.extend((ROLES.get(m.get("role"), 0) + offset, _content(m), part)
                       for m in value)
    if tools:
        out.append((TOOLS, json.dumps(tools, sort_keys=True), "prompt"))
    return out


def _side(value, kind: int, part: str) -> list[tuple[int, str, str]]:
    """A completions record's prompt or completion: a string, or messages."""
    if isinstance(value, str):
        return [(kind, value, part)]
    return [(ROLES.get(m.get("role"), 0), _content(m), part) for m in value]


def has_answer(data: dict, fmt: str) -> bool:
    """Whether a validated record holds an answer (read for prompts, it may not)."""
    if fmt == "chat":
        return data["messages"][-1].get("role") == "assistant"
    if fmt == "completions":
        return data.get("completion") is not None
    return True


@dataclass
class _Record:  # preference.parts wants an object with .data and .source
    data: dict
    source: str = "<record>"


def index(records_data: list[dict], fmt: str) -> Index:
    """Normalised, hashed texts of every record (see the module's docstring)."""
    kinds, parts, record_of, texts = [], [], [], []
    for r, data in enumerate(records_data):
        for kind, text, part in segments(data, fmt):
            kinds.append(kind)
            parts.append(part)
            record_of.append(r)
            texts.append(text.casefold())
    # Words, a chunk of segments at a time (bounded memory).
    word_chunks, counts = [], []
    lo = 0
    while lo < len(texts):
        hi, size = lo, 0
        while hi < len(texts) and (hi == lo or size + len(texts[hi]) <= CHUNK_CHARS):
            size += len(texts[hi])
            hi += 1
        words, per = _words(texts[lo:hi])
        word_chunks.append(words)
        counts.append(per)
        lo = hi
    words = np.concatenate(word_chunks) if word_chunks else np.zeros(0, np.uint64)
    per_segment = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    seg_start = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(per_segment, out=seg_start[1:])
    # One hash per segment: its words in order, and its kind (`side`: the kind without
    # the side of a preference pair, so that swapping the answers can be hashed).
    with np.errstate(over="ignore"):
        sums = _ordered_sums(words, seg_start)
        kind_arr = np.asarray(kinds, np.uint64)
        count = per_segment.astype(np.uint64)
        seg_hash = mix(sums + kind_arr * np.uint64(0xA0761D6478BD642F) + count).tolist()
        side = mix(sums + (kind_arr % np.uint64(CHOSEN)) * np.uint64(0xA0761D6478BD642F)
                   + count).tolist()
    n = len(records_data)
    exact, prompt, answer, reverse = [0] * n, [None] * n, [None] * n, [None] * n
    by_record: list[list[int]] = [[] for _ in range(n)]
    for s, r in enumerate(record_of):
        by_record[r].append(s)
    for r, segs in enumerate(by_record):
        exact[r] = _fold(seg_hash[s] for s in segs)
        if fmt == "text":
            continue
        p = [seg_hash[s] for s in segs if parts[s] == "prompt"]
        prompt[r] = _fold(p)
        if fmt == "preference":
            c = [side[s] for s in segs if parts[s] == "chosen"]
            x = [side[s] for s in segs if parts[s] == "rejected"]
            answer[r] = _fold([*c, 0, *x])
            reverse[r] = _fold([*x, 0, *c])
        else:
            answer[r] = _fold(seg_hash[s] for s in segs if parts[s] == "answer")
    # Near-duplicate words: every segment but system prompts and tool lists.
    kinds_arr = np.asarray(kinds, np.int64) % CHOSEN if kinds else np.zeros(0, np.int64)
    near_seg = ~np.isin(kinds_arr, list(NOT_NEAR))
    near_mask = np.repeat(near_seg, per_segment)
    near_words = words[near_mask]
    rec_arr = np.asarray(record_of, np.int64)
    near_counts = np.bincount(np.repeat(rec_arr, per_segment)[near_mask], minlength=n) \
        if len(near_words) else np.zeros(n, np.int64)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(near_counts, out=offsets[1:])
    with np.errstate(over="ignore"):
        near_key = mix(_ordered_sums(near_words, offsets)
                       + near_counts.astype(np.uint64)).tolist()
    return Index(exact, prompt, answer, reverse, near_words, offsets, near_key)


def _ordered_sums(words: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per group (words[offsets[g]:offsets[g + 1]]): a sum of its words mixed with their
    rank, so that the same words in another order sum to something else."""
    n = len(offsets) - 1
    out = np.zeros(n, np.uint64)
    counts = np.diff(offsets)
    if not len(words):
        return out
    with np.errstate(over="ignore"):
        group = np.repeat(np.arange(n), counts)
        rank = (np.arange(len(words)) - offsets[:-1][group]).astype(np.uint64)
        terms = mix(words ^ (rank * np.uint64(0xD6E8FEB86659FD93)))
        nonempty = counts > 0
        out[nonempty] = np.add.reduceat(terms, offsets[:-1][nonempty])
    return out


def control_characters(data: dict) -> list[str]:
    """The control characters (other than tab / newline / CR) in a record's strings."""
    found: list[str] = []

    def walk(value) -> None:
        if isinstance(value, str):
            found.extend(CONTROL.findall(value))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(data)
    return sorted(set(found))
