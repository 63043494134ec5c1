"""`mlxtune data`: what a run would train on, and what is wrong with it.

``check(cfg)`` reads the data exactly as a run does (``data.load_splits``: same files or
hub dataset, same split rule and seed), keeping records with an empty answer aside
instead of stopping at the first, and reports:

- per split: examples, format, assistant turns, tokens and loss-bearing tokens as the
  run's encoder makes them (``tokens``), a histogram of lengths against
  ``data.max_seq_len``, the examples a run would truncate, the loss-bearing tokens they
  lose and those left with none (a run drops them);
- duplicates within train: exact (the same normalised record, ``text``) and near
  (word-shingle Jaccard >= data.dedup.threshold, ``minhash``);
- leakage: valid / test examples with an exact or near duplicate in train (file:line
  pairs), and values of ``data.split.by`` found in two splits;
- conflicts: one prompt with different answers in train (preference pairs: a pair that
  another reverses);
- empty answers, control characters, answers the chat template cuts, and one example
  rendered with the loss-bearing tokens marked.

A grpo config's data is read as its run reads it, for prompts (``prompts=True``): a
record may hold a prompt alone, and an answer that is there is the reference the rewards
compare with. Its token facts are then the prompts' (rendered with the generation prompt,
as rollouts see them): prompt tokens, the prompts a run leaves out (longer than
data.max_seq_len - objective.max_completion_tokens), how many have a reference answer and
how long those are against max_completion_tokens. No token of the data carries loss
there (the completions are sampled), so there are no loss-token numbers; prompts without
an answer are counted and named as such. Conflicts are among prompts with answers.

The exit code (``Report.exit_code``): 0 clean, 1 when it found leakage, conflicts or
empty answers (a run stops on the first of those), or (grpo) prompts without the reference
answer that a configured reward compares with (the run refuses them), 2 on bad input
(raised as MlxtuneError before anything is reported). Duplicates, truncation, control
characters and cut answers are warnings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from mlxtune.config import Config, DedupConfig
from mlxtune.data.splits import SPLITS
from mlxtune.datacheck import minhash, text, tokens
from mlxtune.datacheck.overlap import (LIST_LIMIT, Loaded, Similar, conflicts, duplicates,
                                       leakage, load, reads_prompts, record_at, similar,
                                       split_key_leakage)

METHOD = ("MinHash ({perm} permutations, {bands} bands of {rows}) over {k}-word shingles "
          "of the normalised text (system prompts left out), candidates confirmed by exact "
          "Jaccard similarity")


# ----------------------------------------------------------------------------- tokens


def histogram(lengths: np.ndarray, max_len: int) -> dict:
    """Counts of lengths in 8 equal bins up to max_seq_len, then (max, 2 max], (2 max, inf)."""
    edges = [round(max_len * i / 8) for i in range(9)] + [2 * max_len]
    counts = np.histogram(np.minimum(lengths, 2 * max_len), bins=np.array(edges) + 0.5)[0]
    over_double = int((lengths > 2 * max_len).sum())
    counts = [int(c) for c in counts]
    counts[-1] -= over_double
    return {"edges": edges + [None], "counts": counts + [over_double]}


def split_summary(records, fmt: str, facts: tokens.SplitTokens | None, max_len: int) -> dict:
    out = {"examples": len(records), "format": fmt}
    if facts is None:
        return out
    lengths, loss, kept = facts.lengths, facts.loss, facts.kept_loss
    truncated = lengths > max_len
    out.update({
        "turns": int(facts.turns.sum()),
        "tokens": int(lengths.sum()),
        "loss_tokens": int(kept.sum()),
        "loss_tokens_untruncated": int(loss.sum()),
        "length": {"mean": round(float(lengths.mean()), 1) if len(lengths) else 0.0,
                   "p50": int(np.percentile(lengths, 50)) if len(lengths) else 0,
                   "p95": int(np.percentile(lengths, 95)) if len(lengths) else 0,
                   "max": int(lengths.max()) if len(lengths) else 0},
        "truncated": int(truncated.sum()),
        "truncated_share": round(float(truncated.mean()), 4) if len(lengths) else 0.0,
        "loss_tokens_lost": int((loss - kept).sum()),
        "all_loss_lost": int(((kept == 0) & (loss > 0)).sum()),
        "no_loss": int((loss == 0).sum()),
        "histogram": histogram(lengths, max_len),
    })
    return out


def prompt_summary(records, fmt: str, facts: tokens.PromptTokens | None, room: int,
                   max_completion: int) -> dict:
    """A split read for its prompts (grpo): see the module's docstring."""
    out = {"examples": len(records), "format": fmt, "prompts": True}
    if facts is None:
        return out
    lengths, has, refs = facts.lengths, facts.has_reference, facts.reference_lengths
    left_out = lengths > room
    n = len(lengths)
    out.update({
        "with_reference": int(has.sum()),
        "without_reference": int(n - has.sum()),
        "prompt_tokens": int(lengths.sum()),
        "length": {"mean": round(float(lengths.mean()), 1) if n else 0.0,
                   "p50": int(np.percentile(lengths, 50)) if n else 0,
                   "p95": int(np.percentile(lengths, 95)) if n else 0,
                   "max": int(lengths.max()) if n else 0},
        "left_out": int(left_out.sum()),
        "left_out_share": round(float(left_out.mean()), 4) if n else 0.0,
        "reference_tokens": int(refs.sum()),
        "references_over_max_completion": int((refs > max_completion).sum()),
        "histogram": histogram(lengths, room),
    })
    return out


def _missing_references(cfg: Config, splits: dict, fmt: str) -> list[str]:
    """grpo: "REWARD: N of M prompts of SPLIT" for each configured reward that compares
    with a reference answer, in each split the run scores whose prompts lack one (the run
    refuses those; grpo_loop.check)."""
    from mlxtune.objectives.rewards import FUNCTIONS, NEEDS_REFERENCE

    scored = ["train"] + (["valid"] if cfg.train.eval_every else [])
    out = []
    for i, spec in enumerate(cfg.objective.rewards):
        if spec.function or FUNCTIONS.get(spec.name) not in NEEDS_REFERENCE:
            continue
        for split in scored:
            missing = sum(not text.has_answer(r.data, fmt) for r in splits[split])
            if missing:
                out.append(f"objective.rewards[{i}] ({spec.name}) compares with a reference "
                           f"answer: {missing} of the {len(splits[split])} prompts of {split} "
                           "have none")
    return out


# ----------------------------------------------------------------------------- the report


@dataclass
class Report:
    data: dict = field(default_factory=dict)
    loaded: Loaded | None = None  # what --fix writes from
    similar: Similar | None = None

    @property
    def exit_code(self) -> int:
        return self.data["exit_code"]


def describe_source(cfg: Config) -> str:
    d = cfg.data
    if d.hub is not None:
        what = f"hub dataset {d.hub.id}" + (f" ({d.hub.config})" if d.hub.config else "")
        return what
    if d.path:
        rule = d.split
        by = f" by \"{rule.by}\"" if rule.by else ""
        return (f"{d.path} split{by} (valid {rule.valid:g}, test {rule.test:g}, seed "
                f"{cfg.train.seed})")
    return ", ".join(f"{name} {getattr(d, name)}" for name in SPLITS if getattr(d, name))


def check(cfg: Config, with_tokens: bool = True, progress=None) -> Report:
    """Everything the module's docstring lists; raises MlxtuneError on bad input."""
    say = progress or (lambda _m: None)
    dedup = cfg.data.dedup or DedupConfig()
    say("reading the data")
    loaded = load(cfg)
    say("duplicates and leakage")
    sim = similar(loaded, dedup)
    dups = duplicates(loaded, sim)
    leaks = leakage(loaded, sim)
    keys = split_key_leakage(loaded, cfg.data.split.by)
    conflict_groups = conflicts(loaded)
    src = lambda k: record_at(loaded, k).source  # noqa: E731
    bands, rows = minhash.bands_for(dedup.threshold)
    grpo = reads_prompts(cfg)
    room = cfg.data.max_seq_len - (cfg.objective.max_completion_tokens if grpo else 0)
    report: dict = {
        "config": cfg.source,
        "data": describe_source(cfg),
        "format": loaded.fmt,
        "objective": cfg.objective.type,
        "tokenizer": None,
        "max_seq_len": cfg.data.max_seq_len,
        "splits": {},
        "duplicates": {
            "exact": len(dups["exact_pairs"]),
            "near": len(dups["near_pairs"]),
            "threshold": dedup.threshold,
            "shingle": dedup.shingle,
            "method": METHOD.format(perm=minhash.NUM_PERM, bands=bands, rows=rows,
                                    k=dedup.shingle),
            "exact_pairs": [[src(a), src(b)] for a, b in dups["exact_pairs"][:LIST_LIMIT]],
            "near_pairs": [[src(a), src(b), round(j, 3)]
                           for a, b, j in dups["near_pairs"][:LIST_LIMIT]],
        },
        "leakage": {
            "valid": sum(1 for p in leaks["pairs"] if p[0] == "valid"),
            "test": sum(1 for p in leaks["pairs"] if p[0] == "test"),
            "pairs": [{"split": s, "held_out": src(k), "train": src(m), "kind": kind,
                       "similarity": round(j, 3)}
                      for s, k, m, kind, j in leaks["pairs"][:LIST_LIMIT]],
            "split_key": keys,
        },
        "conflicts": len(conflict_groups),
        "conflict_examples": [{"prompt": _prompt_text(record_at(loaded, g[0]).data, loaded.fmt),
                               "sources": [src(k) for k in g]}
                              for g in conflict_groups[:LIST_LIMIT]],
        "empty_answers": [{"source": r.source, "message": m.partition(": ")[2] or m}
                          for r, m in loaded.skipped[:LIST_LIMIT]],
        "empty_answer_count": len(loaded.skipped),
        "control_characters": [],
        "template_cuts": [],
        "example": None,
    }
    control = []
    for name in SPLITS:
        for record in loaded.splits[name]:
            chars = text.control_characters(record.data)
            if chars:
                control.append({"source": record.source,
                                "characters": [f"U+{ord(c):04X}" for c in chars]})
    report["control_character_count"] = len(control)
    report["control_characters"] = control[:LIST_LIMIT]
    if grpo:
        report["prompt_room"] = room
        report["max_completion_tokens"] = cfg.objective.max_completion_tokens
    facts = {}
    if with_tokens:
        say("loading the tokenizer")
        tokenizer, what = tokens.load_tokenizer(cfg.model)
        report["tokenizer"] = what
        for name in SPLITS:
            if loaded.splits[name]:
                say(f"tokens: {name}")
                facts[name] = (tokens.prompt_tokens(loaded.splits[name], loaded.fmt, tokenizer)
                               if grpo else
                               tokens.split_tokens(loaded.splits[name], loaded.fmt, tokenizer,
                                                   cfg.data))
    if with_tokens and grpo:
        say("one example")
        first = loaded.splits["train"][0]
        prompt, reference = tokens.render_prompt(first, loaded.fmt, tokenizer)
        report["example"] = {"split": "train", "source": first.source,
                             "pieces": [{"text": prompt, "loss": False}],
                             "reference": reference}
    elif with_tokens:
        cuts = [{"source": s, "answer": a[:200]} for f in facts.values()
                for s, a in f.template_cuts]
        report["template_cut_count"] = len(cuts)
        report["template_cuts"] = cuts[:LIST_LIMIT]
        say("one example")
        first = loaded.splits["train"][0]
        report["example"] = {
            "split": "train", "source": first.source,
            "pieces": [{"text": t, "loss": loss} for t, loss in
                       tokens.render_example(first, loaded.fmt, tokenizer, cfg.data)]}
    for name in SPLITS:
        report["splits"][name] = (
            prompt_summary(loaded.splits[name], loaded.fmt, facts.get(name), room,
                           cfg.objective.max_completion_tokens) if grpo else
            split_summary(loaded.splits[name], loaded.fmt, facts.get(name),
                          cfg.data.max_seq_len))
    problems = []
    leaked = report["leakage"]["valid"] + report["leakage"]["test"]
    if leaked:
        problems.append("leakage")
    if keys["values"]:
        problems.append("split-key leakage")
    if report["conflicts"]:
        problems.append("conflicts")
    if loaded.skipped:
        problems.append("empty answers")
    if grpo:
        report["missing_references"] = _missing_references(cfg, loaded.splits, loaded.fmt)
        if report["missing_references"]:
            problems.append("prompts without the reference answers a reward needs")
    report["problems"] = problems
    report["exit_code"] = 1 if problems else 0
    return Report(report, loaded, sim)


def _prompt_text(data: dict, fmt: str, limit: int = 160) -> str:
    if fmt == "chat":
        messages = data["messages"]
        last = len(messages) - (messages[-1].get("role") == "assistant")
        users = [m for m in messages[:last] if m.get("role") == "user"]
        value = (users[-1] if users else messages[last - 1] if last else messages[0])
        value = value.get("content") or ""
    elif fmt == "preference":
        prompt = data.get("prompt")
        value = prompt if isinstance(prompt, str) else json.dumps(prompt)[:limit]
    else:
        value = data.get("prompt", "")
        if isinstance(value, list):  # TRL's conversational prompt (grpo)
            users = [m for m in value if m.get("role") == "user"]
            value = (users[-1] if users else value[-1]).get("content") or ""
    value = " ".join(str(value).split())
    return value if len(value) <= limit else value[:limit - 1] + "…"


# ----------------------------------------------------------------------------- for `run`


def leakage_note(cfg: Config, splits: dict, fmt: str) -> str | None:
    """One line for `mlxtune run` when held-out examples also appear in train (exact or
    near copies) or split-key values are shared, else None. Text only (no tokenizer):
    the cheap part of the check. Never raises: it is advice."""
    try:
        order = [(name, i) for name in SPLITS for i in range(len(splits[name]))]
        if not splits["valid"] and not splits["test"]:
            return None
        loaded = Loaded(splits, fmt, [], order)
        loaded.index = text.index([splits[s][i].data for s, i in order], fmt)
        leaks = leakage(loaded, similar(loaded, cfg.data.dedup or DedupConfig()))["pairs"]
        keys = split_key_leakage(loaded, cfg.data.split.by)["values"]
    except Exception:  # noqa: BLE001
        return None
    counts = {name: sum(1 for p in leaks if p[0] == name) for name in ("valid", "test")}
    parts = [f"{n} {name}" for name, n in counts.items() if n]
    if not parts and not keys:
        return None
    what = []
    if parts:
        one = sum(counts.values()) == 1
        what.append(f"{' and '.join(parts)} example{'' if one else 's'} also "
                    f"appear{'s' if one else ''} in train")
    if keys:
        what.append(f"{keys} value{'' if keys == 1 else 's'} of \"{cfg.data.split.by}\" "
                    f"{'is' if keys == 1 else 'are'} in two splits")
    return f"leakage: {'; '.join(what)}: mlxtune data {_shown_path(cfg.source)}"


def note_leakage(cfg: Config, splits: dict, fmt: str, say) -> None:
    """`mlxtune run`: say leakage_note's line when there is one."""
    note = leakage_note(cfg, splits, fmt)
    if note:
        say(note)


def _shown_path(path: str | None) -> str:
    import os

    if not path:
        return "CONFIG"
    try:
        rel = os.path.relpath(path)
        return rel if not rel.startswith("..") else path
    except ValueError:
        return path
