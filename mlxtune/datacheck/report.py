"""`mlxtune data`'s text: the report as a person reads it (the JSON is Report.data)."""

from __future__ import annotations

import os

SHOWN = 10  # entries listed per finding (the JSON has them all, up to check.LIST_LIMIT)
BAR = 30


def short(source: str) -> str:
    """A file:line with the file relative to the working directory when that is shorter."""
    path, sep, line = source.rpartition(":")
    if not sep or not os.path.isabs(path):
        return source
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return source
    return f"{rel if len(rel) < len(path) else path}:{line}"


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "-"


def text(report: dict) -> str:
    r = report
    grpo = "prompt_room" in r
    out = [f"data: {_short_paths(r['data'])}  ({r['format']}"
           f"{', read for prompts as objective.type grpo reads them' if grpo else ''})"]
    if r["tokenizer"]:
        out.append(f"tokens: {r['tokenizer']}'s tokenizer and template, data.max_seq_len "
                   f"{r['max_seq_len']}" + (f" - objective.max_completion_tokens "
                                            f"{r['max_completion_tokens']} = "
                                            f"{r['prompt_room']} for a prompt" if grpo else ""))
    out.append("")
    out += _prompt_table(r) if grpo else _split_table(r)
    train = r["splits"]["train"]
    if grpo and "with_reference" in train:
        out += _prompt_notes(r)
    if "histogram" in train:
        limit = r["prompt_room"] if grpo else r["max_seq_len"]
        out += ["", f"prompt lengths (train) against the {limit} tokens a prompt may take:"
                if grpo else f"token lengths (train) against data.max_seq_len {limit}:"]
        out += _histogram(train["histogram"], limit, "left out" if grpo else "truncated")
    d, lk = r["duplicates"], r["leakage"]
    out += ["", f"duplicates in train: {d['exact']} exact, {d['near']} near "
                f"(Jaccard >= {d['threshold']:g} over {d['shingle']}-word shingles)"]
    out += _pairs(d["exact_pairs"], d["exact"], "exact copy", lambda p: (p[0], p[1], ""))
    out += _pairs(d["near_pairs"], d["near"], "near copy",
                  lambda p: (p[0], p[1], f"  Jaccard {p[2]:.2f}"))
    key = lk["split_key"]
    keys = (f"no value of \"{key['by']}\" in two splits" if key["by"] and not key["values"]
            else f"{key['values']} values of \"{key['by']}\" in two splits" if key["by"]
            else "no data.split.by to check")
    out.append(f"leakage: {lk['valid']} valid, {lk['test']} test examples with a copy in "
               f"train; {keys}")
    out += _pairs(lk["pairs"], lk["valid"] + lk["test"], "leak",
                  lambda p: (p["held_out"], p["train"],
                             f"  {p['kind']}" + (f" {p['similarity']:.2f}"
                                                 if p["kind"] == "near" else "")),
                  arrow="also in train as")
    for ex in key["examples"][:SHOWN]:
        splits = ", ".join(f"{n} {s}" for s, n in ex["splits"].items())
        out.append(f"  {key['by']} = {ex['value']!r}: {splits}")
    out.append(f"conflicts: {r['conflicts']} prompts with different answers in train")
    for c in r["conflict_examples"][:SHOWN]:
        out.append(f"  {c['prompt']!r}: {', '.join(short(s) for s in c['sources'][:4])}")
    out.append(f"empty answers: {r['empty_answer_count']}   control characters: "
               f"{r['control_character_count']}   answers the template cuts: "
               f"{r.get('template_cut_count', '-')}")
    for e in r["empty_answers"][:SHOWN]:
        out.append(f"  {short(e['source'])}: {e['message']}")
    for c in r["control_characters"][:SHOWN]:
        out.append(f"  {short(c['source'])}: {' '.join(c['characters'])}")
    for c in r["template_cuts"][:SHOWN]:
        answer = c["answer"] if len(c["answer"]) < 60 else c["answer"][:59] + "…"
        out.append(f"  {short(c['source'])}: the rendered conversation lacks {answer!r}")
    if r["example"] and grpo:
        ex = r["example"]
        out += ["", f"one training prompt ({short(ex['source'])}) as the model sees it before "
                    "it samples a completion:", ""]
        out.append("".join(p["text"] for p in ex["pieces"]).rstrip("\n"))
        out += ["", f"its reference answer: {ex['reference']!r}" if ex["reference"] is not None
                else "its reference answer: none (a prompt alone)"]
    elif r["example"]:
        ex = r["example"]
        out += ["", f"one training example ({short(ex['source'])}) as the model sees it; "
                    "the tokens that carry loss between ⟦ ⟧:", ""]
        out.append("".join(f"⟦{p['text']}⟧" if p["loss"] else p["text"]
                           for p in ex["pieces"]).rstrip("\n"))
    for line in r.get("missing_references", []):
        out.append(f"refused by a run: {line}")
    out.append("")
    if r["problems"]:
        out.append(f"found: {', '.join(r['problems'])} (exit 1); `--fix OUT_DIR` writes a "
                   "cleaned copy")
    else:
        out.append("clean: no leakage, conflicts or empty answers (exit 0)")
    return "\n".join(out)


def _short_paths(text: str) -> str:
    words = []
    for w in text.split(" "):
        words.append(os.path.relpath(w) if os.path.isabs(w) and len(os.path.relpath(w)) <
                     len(w) else w)
    return " ".join(words)


def _split_table(r: dict) -> list[str]:
    with_tokens = "tokens" in r["splits"]["train"]
    head = f"{'split':<6}{'examples':>9}"
    if with_tokens:
        head += (f"{'turns':>8}{'tokens':>11}{'loss tok':>10}{'mean':>7}{'p95':>6}"
                 f"{'max':>7}{'truncated':>15}{'loss lost':>10}{'none left':>10}")
    rows = [head]
    for name, s in r["splits"].items():
        line = f"{name:<6}{s['examples']:>9,}"
        if with_tokens and "tokens" in s:
            trunc = f"{s['truncated']:,} ({_pct(s['truncated'], s['examples'])})"
            ln = s["length"]
            line += (f"{s['turns']:>8,}{s['tokens']:>11,}{s['loss_tokens']:>10,}"
                     f"{ln['mean']:>7.0f}{ln['p95']:>6}{ln['max']:>7}{trunc:>15}"
                     f"{s['loss_tokens_lost']:>10,}{s['all_loss_lost'] + s['no_loss']:>10,}")
        rows.append(line)
    return rows


def _prompt_table(r: dict) -> list[str]:
    """grpo: prompts, not loss-bearing tokens (the completions are sampled)."""
    with_tokens = "with_reference" in r["splits"]["train"]
    head = f"{'split':<6}{'prompts':>9}"
    if with_tokens:
        head += (f"{'w/ answer':>11}{'prompt only':>13}{'prompt tok':>12}{'mean':>7}{'p95':>6}"
                 f"{'max':>7}{'left out':>14}")
    rows = [head]
    for name, s in r["splits"].items():
        line = f"{name:<6}{s['examples']:>9,}"
        if with_tokens and "with_reference" in s:
            left = f"{s['left_out']:,} ({_pct(s['left_out'], s['examples'])})"
            ln = s["length"]
            line += (f"{s['with_reference']:>11,}{s['without_reference']:>13,}"
                     f"{s['prompt_tokens']:>12,}{ln['mean']:>7.0f}{ln['p95']:>6}{ln['max']:>7}"
                     f"{left:>14}")
        rows.append(line)
    return rows


def _prompt_notes(r: dict) -> list[str]:
    splits = [s for s in r["splits"].values() if "with_reference" in s]
    alone = sum(s["without_reference"] for s in splits)
    answered = sum(s["with_reference"] for s in splits)
    over = sum(s["references_over_max_completion"] for s in splits)
    out = ["", "no loss tokens: a grpo run trains on completions it samples, so no token of "
               "the data carries loss; prompts longer than the room are left out, not cut"]
    if alone:
        out.append(f"{alone:,} prompts have no reference answer (prompt only): rewards that "
                   "compare with one (field_match, exact_match) cannot score them, and eval "
                   "cannot measure loss or field metrics on them")
    if answered:
        out.append(f"{answered:,} prompts have a reference answer; {over:,} of those are "
                   f"longer than objective.max_completion_tokens "
                   f"({r['max_completion_tokens']} tokens of their text)")
    return out


def _histogram(h: dict, max_len: int, past: str = "truncated") -> list[str]:
    edges, counts = h["edges"], h["counts"]
    top = max(counts) or 1
    out = []
    for i, n in enumerate(counts):
        lo = edges[i] + 1 if i else 1
        label = f"{lo}-{edges[i + 1]}" if edges[i + 1] is not None else f">{edges[i]}"
        bar = "█" * max(int(round(BAR * n / top)), 1 if n else 0)
        note = f"  {past}" if edges[i] >= max_len and n else ""
        out.append(f"  {label:>13} {n:>8,} {bar}{note}")
    return out


def _pairs(items, total: int, what: str, parts, arrow: str = "copies") -> list[str]:
    out = []
    for p in items[:SHOWN]:
        a, b, extra = parts(p)
        if what == "leak":
            out.append(f"  {short(a)} {arrow} {short(b)}{extra}")
        else:
            out.append(f"  {short(b)} {arrow} {short(a)}{extra}")
    if total > SHOWN:
        out.append(f"  ... and {total - SHOWN:,} more (--json lists them)")
    return out
