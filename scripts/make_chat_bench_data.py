#!/usr/bin/env python
"""A variable-length chat set for speed benchmarks: conversations from a few tens to about
a thousand tokens (log-uniform lengths, like real instruction data: many short exchanges,
a long tail of long answers), some with a system prompt, some with several turns.

The words are synthetic but shaped like prose (sentences of varying length, punctuation,
numbers, code-like lines), so tokenizers produce realistic token counts.

    .venv/bin/python scripts/make_chat_bench_data.py OUT.jsonl [--n 600] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

SUBJECTS = ["the report", "our build", "this function", "the migration", "a customer",
            "the cache", "the schedule", "my garden", "the invoice", "the recipe", "a server",
            "the test suite", "the budget", "the essay", "the map", "the contract"]
VERBS = ["explains", "breaks", "needs", "improves", "depends on", "replaces", "summarizes",
         "slows down", "protects", "describes", "measures", "changes"]
OBJECTS = ["the deadline", "memory use", "two columns", "the login flow", "every request",
           "the second chapter", "a small team", "the error rate", "three weeks of data",
           "the API", "the final draft", "its dependencies", "the night shift"]
ADVERBS = ["quickly", "in practice", "as expected", "for now", "by design", "again",
           "in most cases", "on Mondays", "after the update", "without warning"]
CODE = ["for item in items:", "    total += item.price * item.count", "if total > limit:",
        "    raise ValueError('over budget')", "return sorted(rows, key=len)",
        "SELECT name, count(*) FROM orders GROUP BY name;", "git rebase -i HEAD~3"]
QUESTIONS = ["Can you explain why {s} {v} {o}?", "How do I fix it when {s} {v} {o}?",
             "Summarize this: {s} {v} {o}.", "Write a short note about how {s} {v} {o}.",
             "What should I check first if {s} {v} {o}?"]


def sentence(rng: random.Random) -> str:
    parts = [rng.choice(SUBJECTS).capitalize(), rng.choice(VERBS), rng.choice(OBJECTS)]
    if rng.random() < 0.5:
        parts.append(rng.choice(ADVERBS))
    if rng.random() < 0.2:
        parts.append(f"(about {rng.randint(2, 9000)} of them)")
    return " ".join(parts) + rng.choice([".", ".", ".", "!", "?"])


def paragraph(rng: random.Random, words: int) -> str:
    out, n = [], 0
    while n < words:
        if rng.random() < 0.08:
            block = "\n".join(rng.choice(CODE) for _ in range(rng.randint(2, 5)))
            out.append(f"\n```\n{block}\n```\n")
            n += 12
        else:
            s = sentence(rng)
            out.append(s)
            n += len(s.split())
    return " ".join(out)


def conversation(rng: random.Random, target_words: int) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": "You are a careful, concise assistant."})
    turns = 1 if target_words < 150 or rng.random() < 0.6 else rng.randint(2, 3)
    for _ in range(turns):
        q = rng.choice(QUESTIONS).format(s=rng.choice(SUBJECTS), v=rng.choice(VERBS),
                                         o=rng.choice(OBJECTS))
        if rng.random() < 0.3:
            q += " " + paragraph(rng, target_words // (4 * turns))
        messages.append({"role": "user", "content": q})
        messages.append({"role": "assistant",
                         "content": paragraph(rng, max(3, target_words // turns))})
    return {"messages": messages}


def make(n: int, seed: int, min_words: int = 10, max_words: int = 600) -> list[dict]:
    rng = random.Random(seed)
    lo, hi = math.log(min_words), math.log(max_words)
    return [conversation(rng, int(math.exp(rng.uniform(lo, hi)))) for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rows = make(args.n, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} conversations -> {args.out}")


if __name__ == "__main__":
    main()
