"""The records a run would see, indexed, and which of them overlap: duplicates within
train, leakage from train into valid / test (exact and near, and values of
data.split.by in two splits), and conflicting answers (`mlxtune data`; check.py reports
them)."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from mlxtune.config import Config, DedupConfig
from mlxtune.data.splits import SPLITS, load_splits
from mlxtune.datacheck import minhash, text

LIST_LIMIT = 1000  # entries per list in the report (counts are always whole)


@dataclass
class Loaded:
    """The records a run would see, with their text index over all splits at once."""
    splits: dict
    fmt: str
    skipped: list
    order: list  # (split, index in split) of each record in `index`
    index: text.Index = None


def reads_prompts(cfg: Config) -> bool:
    """Whether the run reads its data for prompts (grpo: answers optional)."""
    return cfg.objective.type == "grpo"


def load(cfg: Config) -> Loaded:
    skipped: list = []
    splits, fmt = load_splits(cfg.data, cfg.train.seed, skipped, prompts=reads_prompts(cfg))
    order = [(name, i) for name in SPLITS for i in range(len(splits[name]))]
    loaded = Loaded(splits, fmt, skipped, order)
    loaded.index = text.index([splits[s][i].data for s, i in order], fmt)
    return loaded


def record_at(loaded: Loaded, k: int):
    split, i = loaded.order[k]
    return loaded.splits[split][i]


# ----------------------------------------------------------------------------- duplicates


@dataclass
class Similar:
    """Which records are alike: groups of identical near texts and near pairs of them."""
    group: list[int]                   # record -> its near-text group
    members: list[list[int]]           # group -> records, in order
    neighbours: dict[int, dict[int, float]]  # group -> {other group: Jaccard}


def similar(loaded: Loaded, dedup: DedupConfig) -> Similar:
    ix = loaded.index
    groups: dict[int, int] = {}
    group, members, first = [], [], []
    sizes = np.diff(ix.near_offsets)
    for k, key in enumerate(ix.near_key):
        if sizes[k] == 0:  # no words to compare (e.g. only punctuation)
            group.append(-1)
            continue
        g = groups.setdefault(key, len(groups))
        if g == len(members):
            members.append([])
            first.append(k)
        members[g].append(k)
        group.append(g)
    first_arr = np.asarray(first, np.int64)
    if len(first_arr):
        starts, ends = ix.near_offsets[first_arr], ix.near_offsets[first_arr + 1]
        words = np.concatenate([ix.near_words[a:b] for a, b in zip(starts, ends)])
        offsets = np.zeros(len(first_arr) + 1, np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
    else:
        words, offsets = np.zeros(0, np.uint64), np.zeros(1, np.int64)
    neighbours: dict[int, dict[int, float]] = defaultdict(dict)
    for a, b, jac in minhash.near_pairs(words, offsets, dedup.threshold, dedup.shingle):
        neighbours[a][b] = neighbours[b][a] = jac
    return Similar(group, members, neighbours)


def _train_matches(loaded: Loaded, sim: Similar, k: int, before: int | None):
    """(train record, kind, similarity) most like record k among train records (those
    before index `before` only, when given); None when there is none."""
    ix = loaded.index
    g = sim.group[k]
    best = None
    candidates = [(g, 1.0)] if g >= 0 else []
    if g >= 0:
        candidates += sorted(sim.neighbours.get(g, {}).items(), key=lambda x: -x[1])
    for other, jac in candidates:
        for m in sim.members[other]:
            if m == k or loaded.order[m][0] != "train":
                continue
            if before is not None and m >= before:
                break
            kind = "exact" if ix.exact[m] == ix.exact[k] else "near"
            if kind == "exact":
                return m, kind, 1.0
            if best is None:
                best = (m, kind, jac)
    return best


def duplicates(loaded: Loaded, sim: Similar) -> dict:
    ix = loaded.index
    seen: dict[int, int] = {}
    exact, near = [], []
    for k, (split, _) in enumerate(loaded.order):
        if split != "train":
            continue
        if ix.exact[k] in seen:
            exact.append((seen[ix.exact[k]], k))
            continue
        seen[ix.exact[k]] = k
        match = _train_matches(loaded, sim, k, before=k)
        if match is not None:
            near.append((match[0], k, match[2]))
    return {"exact_pairs": exact, "near_pairs": near}


def leakage(loaded: Loaded, sim: Similar) -> dict:
    ix = loaded.index
    train_exact = {ix.exact[k]: k for k, (s, _) in reversed(list(enumerate(loaded.order)))
                   if s == "train"}
    found = []
    for k, (split, _) in enumerate(loaded.order):
        if split == "train":
            continue
        if ix.exact[k] in train_exact:
            found.append((split, k, train_exact[ix.exact[k]], "exact", 1.0))
            continue
        match = _train_matches(loaded, sim, k, before=None)
        if match is not None:
            found.append((split, k, match[0], match[1], match[2]))
    return {"pairs": found}


def split_key_leakage(loaded: Loaded, by: str | None) -> dict:
    if not by:
        return {"by": None, "values": 0, "examples": []}
    where: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for name in SPLITS:
        for record in loaded.splits[name]:
            if by in record.data:
                where[json.dumps(record.data[by], sort_keys=True)][name] += 1
    shared = [(value, dict(splits)) for value, splits in where.items() if len(splits) > 1]
    return {"by": by, "values": len(shared),
            "examples": [{"value": json.loads(v), "splits": s} for v, s in shared[:LIST_LIMIT]]}


def conflicts(loaded: Loaded) -> list[list[int]]:
    """Groups of train records: one prompt, different answers (preference: a pair and
    another that reverses it)."""
    ix = loaded.index
    if loaded.fmt == "text":
        return []
    by_prompt: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for k, (split, _) in enumerate(loaded.order):
        # A prompt without an answer (grpo) disagrees with no other record.
        if split == "train" and text.has_answer(record_at(loaded, k).data, loaded.fmt):
            by_prompt[ix.prompt[k]][ix.answer[k]].append(k)
    out = []
    for answers in by_prompt.values():
        if len(answers) < 2:
            continue
        if loaded.fmt == "preference":
            reversed_ = [ks[0] for a, ks in answers.items()
                         if ix.reverse[ks[0]] in answers and ix.reverse[ks[0]] != a]
            if reversed_:
                out.append(reversed_)
            continue
        out.append([ks[0] for ks in answers.values()])
    return out
