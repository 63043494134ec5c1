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
    out = [f"data: {_short_paths(r['data'])}  ({r['format']})"]
    if r["tokenizer"]:
        out.append(f"tokens: {r['tokenizer']}'s tokenizer and template, data.max_seq_len "
                   f"{r['max_seq_len']}")
    out.append("")
    out += _split_table(r)
    train = r["splits"]["train"]
    if "histogram" in train:
        out += ["", f"token lengths (train) against data.max_seq_len {r['max_seq_len']}:"]
        out += _histogram(train["histogram"], r["max_seq_len"])
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
    if r["example"]:
        ex = r["example"]
        out += ["", f"one training example ({short(ex['source'])}) as the model sees it; "
                    "the tokens that carry loss between ⟦ ⟧:", ""]
        out.append("".join(f"⟦{p['text']}⟧" if p["loss"] else p["text"]
                           for p in ex["pieces"]).rstrip("\n"))
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


def _histogram(h: dict, max_len: int) -> list[str]:
    edges, counts = h["edges"], h["counts"]
    top = max(counts) or 1
    out = []
    for i, n in enumerate(counts):
        lo = edges[i] + 1 if i else 1
        label = f"{lo}-{edges[i + 1]}" if edges[i + 1] is not None else f">{edges[i]}"
        bar = "█" * max(int(round(BAR * n / top)), 1 if n else 0)
        note = "  truncated" if edges[i] >= max_len and n else ""
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
