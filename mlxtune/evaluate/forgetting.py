"""The forgetting check: has tuning changed what the model does outside the task?

A general-ability probe (mlxtune/evaluate/general_probe.jsonl, 100 prompts written for
mlxtune and shipped under its MIT license: instructions, facts, arithmetic, writing, code
and other languages; or the user's own prompts, `eval.general`) is answered by the base
greedily (at most `MAX_NEW_TOKENS` new tokens each, no system message of ours: the chat
template's default). Those answers are the reference. Then, per evaluation:

- `base_nats_per_token` / `tuned_nats_per_token`: the mean cross-entropy (nats per token,
  token-weighted over all answers, the stop token included when the base ended its answer)
  of the base's answers given their prompts, under the base and under the tuned model;
- `added_nats_per_token`: the second minus the first, how much less likely the tuned
  model finds what the base said (0 for an adapter that changes nothing);
- `changed`: the share of prompts whose tuned greedy answer differs from the base's (as
  token ids, within the same `MAX_NEW_TOKENS`).

Both per category as well. A prompt file for `eval.general` is JSONL, one object a line:
`{"prompt": "..."}` or `{"messages": [... ending with a user turn]}`, with an optional
`category` (and `id`); bad lines are one error naming file:line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mlxtune.data import Example
from mlxtune.errors import ConfigError

MAX_NEW_TOKENS = 64
PACKAGED = "general_probe.jsonl"


@dataclass
class Probe:
    ids: list[str]
    categories: list[str]
    messages: list[list[dict]]
    source: str  # "packaged" or the file's path


def load(path: str | None = None) -> Probe:
    """The packaged probe, or the prompts in `path` (checked line by line)."""
    if path is None:
        text = resources.files("mlxtune.evaluate").joinpath(PACKAGED).read_text("utf-8")
        where, source = f"mlxtune/evaluate/{PACKAGED}", "packaged"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"eval.general: {path}: prompt file not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"eval.general: {path}: not a UTF-8 text file") from None
        where, source = str(path), str(path)
    probe = Probe([], [], [], source)
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{where}:{n}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{where}:{n}: expected a JSON object with 'prompt' or "
                              "'messages'")
        if isinstance(row.get("prompt"), str) and row["prompt"].strip():
            messages = [{"role": "user", "content": row["prompt"]}]
        elif isinstance(row.get("messages"), list) and row["messages"]:
            messages = row["messages"]
            ok = all(isinstance(m, dict) and isinstance(m.get("role"), str)
                     and isinstance(m.get("content"), str) for m in messages)
            if not ok or messages[-1]["role"] != "user":
                raise ConfigError(f"{where}:{n}: 'messages' must be role/content objects "
                                  "ending with a user turn")
        else:
            raise ConfigError(f"{where}:{n}: needs a non-empty 'prompt' string or "
                              "'messages' list")
        probe.ids.append(str(row.get("id", n)))
        probe.categories.append(str(row.get("category", "general")))
        probe.messages.append(messages)
    if not probe.ids:
        raise ConfigError(f"eval.general: {where}: no prompts in the file")
    return probe


def prompts(probe: Probe, tokenizer) -> list[list[int]]:
    """The probe's prompts rendered with the chat template and its generation prompt
    (plain text, with the tokenizer's special tokens, for a model without a template)."""
    from mlxtune.evaluate.few_shot import _ids

    has = getattr(tokenizer, "has_chat_template", None)
    has = bool(has) if has is not None else bool(getattr(tokenizer, "chat_template", None))
    out = []
    for messages in probe.messages:
        if has:
            out.append(_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                          tokenize=True)))
        else:
            text = "\n\n".join(m["content"] for m in messages)
            out.append(list(tokenizer.encode(text, add_special_tokens=True)))
    return out


def answer_examples(prompt_ids: list[list[int]], answers: list[list[int]],
                    stopped: list[bool], stop_id: int | None) -> list[Example]:
    """The base's answers as loss examples: prompt + answer (+ the stop token when the
    answer ended on one), the loss on the answer's tokens only."""
    out = []
    for i, (p, a, s) in enumerate(zip(prompt_ids, answers, stopped)):
        answer = list(a) + ([stop_id] if s and stop_id is not None else [])
        if not answer:
            continue
        out.append(Example(list(p) + answer, [False] * len(p) + [True] * len(answer),
                           f"probe:{i}"))
    return out


def summarise(probe: Probe, base_nll: list[tuple[float, int]],
              tuned_nll: list[tuple[float, int]], changed: list[bool]) -> dict:
    """The report from per-prompt (summed nats, tokens) under each side and whether the
    tuned answer changed; prompts without an answer token count for `changed` only."""
    def block(idx: list[int]) -> dict:
        b = sum(base_nll[i][0] for i in idx if base_nll[i][1])
        t = sum(tuned_nll[i][0] for i in idx if tuned_nll[i][1])
        n = sum(base_nll[i][1] for i in idx)
        return {"prompts": len(idx), "answer_tokens": n,
                "base_nats_per_token": b / n if n else None,
                "tuned_nats_per_token": t / n if n else None,
                "added_nats_per_token": (t - b) / n if n else None,
                "changed": sum(changed[i] for i in idx) / len(idx) if idx else None}

    everything = block(list(range(len(changed))))
    cats: dict[str, list[int]] = {}
    for i, c in enumerate(probe.categories):
        cats.setdefault(c, []).append(i)
    return {**everything, "by_category": {c: block(idx) for c, idx in cats.items()}}
