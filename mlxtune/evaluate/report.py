"""Eval results -> eval.json, eval.md, eval_predictions.jsonl (each written atomically), a
terminal table, and an `eval` event in events.jsonl."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from mlxtune.train.events import EventWriter

# The files `write` makes (with eval.data: eval-NAME.json, eval-NAME.md, ...).
EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
PREDICTIONS = "eval_predictions.jsonl"  # every generation: source, reference, one per side
SIDES = ("base", "start", "tuned")  # start: the adapter a run started from (model.adapter)

# (key, label, format) in table order; rows whose key neither side has are left out.
ROWS = [
    ("loss", "loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("exact_match", "exact match", "pct"),
    ("json_valid", "JSON valid", "pct"),
    ("schema_match", "schema match", "pct"),
    ("metric", "metric", "{:.4f}"),
    ("preference_accuracy", "preference accuracy", "pct"),
    ("reward_accuracy", "reward accuracy", "pct"),
    ("reward_margin", "reward margin", "{:.4f}"),
    ("stopped", "ended by EOS", "pct"),
    ("tokens_per_sec", "tokens/s", "{:.1f}"),
    ("wall_s", "wall time (s)", "{:.0f}"),
]
SUMMARY_KEYS = ("loss", "perplexity", "exact_match", "json_valid", "schema_match", "metric",
                "preference_accuracy", "reward_accuracy", "reward_margin")


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if fmt == "pct":
        return f"{100 * value:.1f}%"
    return fmt.format(value)


def sides(result: dict) -> list[str]:
    return [s for s in SIDES if s in result]


def rows(result: dict) -> list[tuple[str, ...]]:
    """(label, value per side) for each metric some side has."""
    present = [result[s] for s in sides(result)]
    out = []
    for key, label, fmt in ROWS:
        if any(key in side for side in present):
            if key == "metric" and result.get("metric_name"):
                label = f"metric ({result['metric_name'].rpartition(':')[2]})"
            out.append((label, *(_fmt(side.get(key), fmt) for side in present)))
    return out


def headline(result: dict) -> str:
    of = f" of {Path(result['data']).name}" if result.get("data") else ""
    parts = [f"{result['split']} split{of}: {result['split_examples']} examples"]
    if result.get("generated_examples"):
        parts.append(f"greedy generation for {result['generated_examples']}, at most "
                     f"{result['max_new_tokens']} new tokens")
    parts.append(f"adapter {Path(result['adapter']).name}/")
    return "; ".join(parts)


def table(result: dict) -> str:
    body = rows(result)
    width = max([len(r[0]) for r in body] + [6])
    lines = [headline(result), f"{'':<{width}}" + "".join(f"  {s:>10}" for s in sides(result))]
    lines += [f"{r[0]:<{width}}" + "".join(f"  {v:>10}" for v in r[1:]) for r in body]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    names = sides(result)
    lines = [f"# Evaluation: {Path(result['run_dir']).name}", "", headline(result) + ".", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(result)]
    lines += ["", "Base: the same model with the adapter switched off."]
    if "start" in result:
        lines[-1] += (f" Start: the base with the adapter the run started from "
                      f"({result.get('start_adapter')}).")
    lines[-1] += " Exact match compares after stripping leading and trailing whitespace."
    for i, ex in enumerate(result.get("examples", []), start=1):
        lines += ["", f"## Example {i} ({ex['source']})", "", "Prompt:", "", _block(ex["prompt"])]
        for key in ("reference", *names):
            if key in ex:
                lines += [f"{key.capitalize()}:", "", _block(ex[key])]
    return "\n".join(lines) + "\n"


def _block(text: str) -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}\n{text}\n{fence}\n"


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clean(value):
    # JSON has no inf / NaN (a perplexity can overflow): write them as strings.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def to_json(result: dict) -> str:
    return json.dumps(_clean(result), indent=2, ensure_ascii=False)


def file_stem(data_path: str | None) -> str:
    """'eval' for a run's own split; 'eval-NAME' for another data file (eval.data)."""
    return "eval" if not data_path else f"eval-{Path(data_path).stem}"


def write(run_dir: Path, result: dict, predictions: list[dict] = (),
          name: str = "eval") -> None:
    """eval.json, eval.md, eval_predictions.jsonl (with another `name`: NAME.json, ...)."""
    run_dir = Path(run_dir)
    _atomic_write(run_dir / f"{name}_predictions.jsonl",
                  "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    _atomic_write(run_dir / f"{name}.json", to_json(result) + "\n")
    _atomic_write(run_dir / f"{name}.md", markdown(result))
    events = EventWriter(run_dir)
    try:
        data = {"data": result["data"]} if result.get("data") else {}
        events.emit("eval", split=result["split"], adapter=result["adapter"], **data,
                    **{side: {k: v for k, v in result[side].items() if k in SUMMARY_KEYS}
                       for side in sides(result)})
    finally:
        events.close()
