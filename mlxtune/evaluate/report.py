"""Eval results -> eval.json, eval.md, eval_predictions.jsonl, eval_general.jsonl (each
written atomically), a terminal table, and an `eval` event in events.jsonl.

The verdict. The main metric is the first of: the user metric (eval.metric), exact match,
preference accuracy, loss (lower is better) that the sides report. The tuned adapter is
compared with the few-shot side (else the zero-shot base); a difference within `MARGIN`
(2 points of a rate or score in [0, 1]; 2% of the loss) counts as a tie: prompting comes
within the margin and training may not be worth it.
"""

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
GENERAL = "eval_general.jsonl"  # the forgetting probe: prompt, base and tuned answers
# few_shot: the base with eval.shots training examples as earlier turns;
# start: the adapter a run started from (model.adapter)
SIDES = ("base", "few_shot", "start", "tuned")
MARGIN = 0.02
# The main metric: the first of these the sides report; (key, higher is better).
MAIN_METRICS = (("metric", True), ("exact_match", True), ("preference_accuracy", True),
                ("loss", False))
PERCENT = {"exact_match", "json_valid", "schema_match", "preference_accuracy",
           "reward_accuracy", "stopped"}

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
    ("shots", "shots per request", "{:.2f}"),
    ("prompt_tokens", "prompt tokens per request", "{:.0f}"),
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


def side_label(name: str, result: dict) -> str:
    """'few_shot' shown as '3-shot' (eval.shots)."""
    if name == "few_shot":
        return f"{(result.get('few_shot_setup') or {}).get('shots', 'k')}-shot"
    return name


# ----------------------------------------------------------------------------- verdict


def main_metric(result: dict) -> tuple[str, str, bool] | None:
    """(key, label, higher is better) of the main metric, or None when no side has one."""
    return pick_main([result[s] for s in sides(result)], result.get("metric_name"))


def pick_main(present: list[dict], metric_name: str | None = None):
    """main_metric over any sides' metrics (`metric_name`: eval.metric, for its label)."""
    for key, higher in MAIN_METRICS:
        if any(side.get(key) is not None for side in present):
            label = key.replace("_", " ")
            if key == "metric" and metric_name:
                label = metric_name.rpartition(":")[2].replace("_", " ")
            return key, label, higher
    return None


def _value(key: str, v: float) -> str:
    if key in PERCENT:
        return f"{100 * v:.1f}%"
    return f"{v:.4f}" if key == "loss" else f"{v:.3f}"


def _gap(key: str, d: float) -> str:
    """A difference of the main metric, in words."""
    if key in PERCENT:
        return f"{100 * d:.1f} points of"
    if key == "loss":
        return f"{d:.4f} nats of"
    return f"{d:.3f} in"


def compare_values(key: str, higher: bool, ours: float, theirs: float) -> tuple[float, bool]:
    """(how much `ours` is better than `theirs`, whether that is within MARGIN)."""
    d = ours - theirs if higher else theirs - ours
    if key == "loss":
        within = abs(d) <= MARGIN * max(abs(ours), abs(theirs), 1e-12)
    else:
        within = abs(d) <= MARGIN
    return d, within


def margin_text(key: str) -> str:
    if key in PERCENT:
        return f"{100 * MARGIN:.0f} points"
    return f"{100 * MARGIN:.0f}%" if key == "loss" else f"{MARGIN}"


def verdict_fields(result: dict) -> dict:
    """{'main_metric': {...}, 'verdict': one sentence} for eval.json."""
    main = main_metric(result)
    if main is None or "tuned" not in result or result["tuned"].get(main[0]) is None:
        return {"verdict": "No metric to compare the sides on."}
    key, label, higher = main
    tuned = result["tuned"][key]
    other = next((s for s in ("few_shot", "base") if s in result
                  and result[s].get(key) is not None), None)
    n = result.get("generated_examples") if key != "loss" and key != "preference_accuracy" \
        else result.get("loss_examples")
    where = f"on {n} {result.get('split', 'held-out')} examples"
    info = {"key": key, "label": label, "higher_is_better": higher,
            "margin": MARGIN, "margin_kind": "relative" if key == "loss" else "absolute",
            "compared_with": other}
    if other is None:
        return {"main_metric": info, "verdict": f"The tuned adapter scores "
                f"{_value(key, tuned)} {label} {where} (no base or few-shot side to compare "
                "with)."}
    theirs = result[other][key]
    name = "zero-shot prompting of the base" if other == "base" else         f"{side_label(other, result)} prompting"
    d, within = compare_values(key, higher, tuned, theirs)
    info["difference"] = d
    values = f"({_value(key, tuned)} vs {_value(key, theirs)})"
    if within:
        text = (f"{name[0].upper()}{name[1:]} comes within {margin_text(key)} of the tuned "
                f"adapter on {label} {values} {where}: training may not be worth it.")
    elif d > 0:
        text = (f"The tuned adapter beats {name} by {_gap(key, d)} {label} {values} "
                f"{where}.")
    else:
        text = (f"{name[0].upper()}{name[1:]} beats the tuned adapter by {_gap(key, -d)} "
                f"{label} {values} {where}: training has not paid off on this metric.")
    return {"main_metric": info, "verdict": text}


def forgetting_line(result: dict) -> str | None:
    f = result.get("forgetting")
    if not f:
        return None
    probe = "the packaged probe" if f.get("probe") == "packaged" else Path(f["probe"]).name
    added = f.get("added_nats_per_token")
    loss = (f"{added:+.3f} nats per token on the base's own answers "
            f"({f['base_nats_per_token']:.3f} -> {f['tuned_nats_per_token']:.3f})"
            if added is not None else "no answer tokens to score")
    return (f"Forgetting, {f['prompts']} general prompts ({probe}): {loss}; "
            f"{100 * f['changed']:.0f}% of the greedy answers changed.")


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
    lines = [headline(result), f"{'':<{width}}" + "".join(
        f"  {side_label(s, result):>10}" for s in sides(result))]
    lines += [f"{r[0]:<{width}}" + "".join(f"  {v:>10}" for v in r[1:]) for r in body]
    lines += [x for x in (result.get("verdict"), forgetting_line(result)) if x]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    names = sides(result)
    lines = [f"# Evaluation: {Path(result['run_dir']).name}", ""]
    if result.get("verdict"):
        lines += [result["verdict"], ""]
    lines += [headline(result) + ".", "",
              "| | " + " | ".join(side_label(n, result) for n in names) + " |",
              "|---|" + "---|" * len(names)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(result)]
    lines += ["", "Base: the same model with the adapter switched off."]
    setup = result.get("few_shot_setup")
    if "few_shot" in result and setup:
        lines[-1] += (f" {side_label('few_shot', result)}: the base with {setup['shots']} "
                      f"examples of the train split ({setup['train_examples']}) as earlier "
                      f"turns, chosen {setup['selection']}; shots that would overflow the "
                      f"{setup['context']}-token context dropped "
                      f"({setup['requests_with_fewer_shots']} requests got fewer).")
    if "start" in result:
        lines[-1] += (f" Start: the base with the adapter the run started from "
                      f"({result.get('start_adapter')}).")
    lines[-1] += " Exact match compares after stripping leading and trailing whitespace."
    main = result.get("main_metric")
    if main:
        lines[-1] += (f" Main metric: {main['label']} (margin {margin_text(main['key'])}).")
    f = result.get("forgetting")
    if f:
        lines += ["", "## Forgetting", "", forgetting_line(result), "",
                  f"The base's greedy answers (at most {f['max_new_tokens']} new tokens) are "
                  "the reference: the loss is the tuned model's cross-entropy on them, "
                  "against the base's own; an answer changed when the tuned model's greedy "
                  f"answer differs from the base's. Every answer: "
                  f"{file_stem(result.get('data'))}_general.jsonl.", "",
                  "| category | prompts | base nats/token | tuned nats/token | added | "
                  "changed |", "|---|---|---|---|---|---|"]
        for cat, c in f.get("by_category", {}).items():
            lines.append(f"| {cat} | {c['prompts']} | {_fmt(c['base_nats_per_token'], '{:.3f}')}"
                         f" | {_fmt(c['tuned_nats_per_token'], '{:.3f}')} | "
                         f"{_fmt(c['added_nats_per_token'], '{:+.3f}')} | "
                         f"{_fmt(c['changed'], 'pct')} |")
    for i, ex in enumerate(result.get("examples", []), start=1):
        lines += ["", f"## Example {i} ({ex['source']})", "", "Prompt:", "", _block(ex["prompt"])]
        for key in ("reference", *names):
            if key in ex:
                label = side_label(key, result)
                lines += [f"{label[0].upper()}{label[1:]}:", "", _block(ex[key])]
    return "\n".join(lines) + "\n"


def _block(text: str) -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}\n{text}\n{fence}\n"


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would make it, not mkstemp's 0600
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
          name: str = "eval", general: list[dict] | None = None) -> None:
    """eval.json, eval.md, eval_predictions.jsonl, eval_general.jsonl (the forgetting
    probe's answers) (with another `name`: NAME.json, ...)."""
    run_dir = Path(run_dir)
    _atomic_write(run_dir / f"{name}_predictions.jsonl",
                  "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    if general is not None:
        _atomic_write(run_dir / f"{name}_general.jsonl",
                      "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in general))
    _atomic_write(run_dir / f"{name}.json", to_json(result) + "\n")
    _atomic_write(run_dir / f"{name}.md", markdown(result))
    events = EventWriter(run_dir)
    try:
        data = {"data": result["data"]} if result.get("data") else {}
        extra = {"verdict": result["verdict"]} if result.get("verdict") else {}
        if result.get("forgetting"):
            extra["forgetting"] = {k: result["forgetting"].get(k) for k in
                                   ("changed", "added_nats_per_token")}
        events.emit("eval", split=result["split"], adapter=result["adapter"], **data,
                    **{side: {k: v for k, v in result[side].items() if k in SUMMARY_KEYS}
                       for side in sides(result)}, **extra)
    finally:
        events.close()
