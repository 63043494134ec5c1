"""`mlxtune compare`: candidate bases for one config, measured on its held-out split.

For each candidate (a packaged name, a hub id in the local cache, an mlx-lm folder or a
GGUF file), in the order given:

1. the planner (mlxtune.memory, no weights loaded): parameters, the predicted peak of a
   training step of this config on this machine and the verdict on each tier; a
   candidate that does not fit this machine stops here, with its reason in its row;
2. a short training probe, `mlxtune run` itself for `PROBE_STEPS` steps (or the pilot
   run of `train_steps` steps) in a run directory of its own: the median step time after
   the first step, training tokens/s and the measured peak;
3. the held-out split (its first `limit` examples, loss and generation alike): the base
   with each of `shots` (0: zero-shot; k: the k nearest training examples as earlier
   turns, mlxtune.evaluate.few_shot), and, with a pilot run, the tuned adapter
   zero-shot; every metric eval reports, and decoding tokens/s.

The table is ranked by the main metric (mlxtune.evaluate.report.main_metric: the user
metric, else exact match, ...) of each candidate's best side, per GB of its planned peak
(a loss, lower being better, counts as exp(-loss), the mean probability per token). The
recommendation is the smallest candidate (by planned peak) whose main metric is within
report.MARGIN of the best. A candidate that fails (not found, does not fit, fails to
load) gets its one-line reason and the others go on.
"""

from __future__ import annotations

import copy
import math
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable

from mlxtune.config import Config
from mlxtune.errors import ConfigError, MlxtuneError

PROBE_STEPS = 3
COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"


def _slug(given: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(given).name or given).strip("_") or "model"


def candidate_config(cfg: Config, given: str) -> Config:
    """The config with model.path set to the candidate (a path relative to the working
    directory made absolute) and no starting adapter."""
    out = copy.deepcopy(cfg)
    p = Path(given).expanduser()
    out.model.path = str(p.resolve()) if p.exists() else given
    out.model.adapter = None
    return out


def _plan(cfg: Config, usable_gb: float | None) -> dict:
    from mlxtune import memory

    plan = memory.plan(cfg, usable_gb=usable_gb)
    return {"parameters": plan.shape.parameters(), "peak_gb": round(plan.here.peak_gb, 3),
            "usable_gb": round(plan.here.machine.usable_gb, 2), "verdict": plan.here.verdict,
            "tiers": {f.machine.name: f.verdict for f in plan.tiers},
            "mac_peak_gb": round(plan.peak_gb, 3)}


def _probe_run(cfg: Config, run_dir: Path, steps: int) -> dict:
    """`mlxtune run` for `steps` steps (quiet, no evaluation); its step time and peak."""
    from mlxtune.run import run as run_training
    from mlxtune.train.events import read_events

    c = copy.deepcopy(cfg)
    c.train.iters, c.train.epochs = steps, None
    c.train.eval_every, c.train.save_every, c.train.log_every = 0, 0, 1
    c.train.early_stopping.patience = None
    c.eval.auto = False
    _, result = run_training(c, run_dir, quiet=True, evaluate=False, memory_check=False)
    if result.reason not in ("done", "early_stopping"):
        raise MlxtuneError(f"the training probe stopped: {result.reason}")
    trains = [e for e in read_events(run_dir) if e["event"] == "train"]
    times = [e["time"] for e in trains]
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"steps": len(trains),
            "step_s": statistics.median(gaps) if gaps else None,
            "train_tokens_per_sec": trains[-1].get("tokens_per_sec") if trains else None,
            "measured_peak_gb": max((e.get("peak_memory_gb") or 0 for e in trains),
                                    default=None)}


def _measure(cfg: Config, records, fmt: str, train, shots: list[int], limit: int | None,
             adapter: Path | None, label: str, log, status) -> dict:
    """Every side of one candidate on the held-out records: '0-shot', 'K-shot' (the base)
    and, with a pilot adapter, 'tuned'."""
    from mlxtune import adapters, backend, models
    from mlxtune.evaluate import (_adapter_off, _pad_id, check, few_shot_inputs,
                                  generate, measure_side, prepare_task)

    schema, metric = check(cfg)
    loaded = models.load(cfg.model)
    model, tok = loaded.model, loaded.tokenizer
    dtype = backend.compute_dtype(cfg.model.dtype)
    if generate.should_densify(model, cfg.eval.dense_base, dtype):
        generate.densify(model, dtype)
    if adapter is not None:
        adapters.load(model, adapter)
    model.eval()
    task = prepare_task(cfg, records[:limit] if limit is not None else records, fmt, tok,
                        schema, metric, None, log)
    pad_id = _pad_id(tok)
    sides = {}
    for k in shots:
        name = f"{k}-shot"
        if k == 0:
            held, prompts = task.held, task.prompts
        else:
            few = few_shot_inputs(cfg, task, tok, loaded.config, k, train)
            if few is None:
                continue
            held, prompts = few[0], few[1]
        side_fmt = "chat" if k and fmt == "preference" else fmt
        log(f"{label} {name}" + (" (adapter off)" if adapter is not None else "") + ":")
        setup = _adapter_off(model) if adapter is not None else _nothing()
        with setup:
            sides[name], _, _ = measure_side(model, tok, held, prompts, task.scorer, cfg,
                                             pad_id, task.max_new, log, side_fmt, status,
                                             f"{label} {name}")
        if k:
            sides[name]["shots"] = few[2]["shots_per_request"]
    if adapter is not None:
        log(f"{label} tuned (the pilot run's adapter):")
        sides["tuned"], _, _ = measure_side(model, tok, task.held, task.prompts, task.scorer,
                                            cfg, pad_id, task.max_new, log, fmt, status,
                                            f"{label} tuned")
    return {"examples": len(task.records), "generated_examples": len(task.pairs),
            "max_new_tokens": task.max_new if task.pairs else None, "sides": sides}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _score(value: float, higher: bool, gb: float | None) -> float | None:
    if value is None or not gb:
        return None
    return (value if higher else math.exp(-value)) / gb


def compare(cfg: Config, candidates: list[str], shots: list[int] = (0, 3),
            train_steps: int = 0, limit: int | None = None,
            usable_gb: float | None = None, out_dir: Path | None = None,
            log: Callable[[str], None] = lambda _m: None,
            status: Callable[[str], None] | None = None) -> dict:
    """Measure every candidate (module docstring); write compare.json and compare.md into
    `out_dir` and return the result."""
    from mlxtune.evaluate import held_out, train_records
    from mlxtune.evaluate import report

    if not candidates:
        raise ConfigError("--models: name at least one candidate")
    if len(set(candidates)) != len(candidates):
        raise ConfigError("--models: a candidate is named twice")
    shots = list(dict.fromkeys(shots))
    ev = cfg.eval
    records, fmt = held_out(cfg, ev.split)
    train = train_records(cfg) if any(shots) else None
    from mlxtune.evaluate import check

    check(cfg)  # a bad schema or metric: one line before anything runs
    out_dir = Path(out_dir) if out_dir else Path("runs") / (
        f"compare-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"--out: {out_dir} already exists and is not empty")
    n_eval = len(records) if limit is None else min(limit, len(records))
    log(f"compare: {len(candidates)} candidates on the first {n_eval} of {len(records)} "
        f"{ev.split} examples; shots {', '.join(map(str, shots))}"
        + (f"; pilot runs of {train_steps} steps" if train_steps else "")
        + f"; output in {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)

    rows: dict[str, dict] = {}
    for i, given in enumerate(candidates, start=1):
        label = f"[{i}/{len(candidates)}] {given}"
        row: dict = {"model": given, "error": None}
        rows[given] = row
        start = time.perf_counter()
        try:
            c = candidate_config(cfg, given)
            from mlxtune import models

            row["source"] = models.resolve(c.model.path).kind
            log(f"{label}: planning")
            try:
                row.update(_plan(c, usable_gb))
            except MlxtuneError:
                raise
            except Exception as e:  # noqa: BLE001  (the planner is advice, not a blocker)
                row["plan_error"] = f"{type(e).__name__}: {e}"
            if row.get("verdict") == "no":
                raise MlxtuneError(f"does not fit: a training step's predicted peak "
                                   f"{row['peak_gb']:.2f} GB exceeds the "
                                   f"{row['usable_gb']:.2f} GB usable here")
            steps = train_steps or PROBE_STEPS
            run_dir = out_dir / ("pilots" if train_steps else ".probes") / f"{i}-{_slug(given)}"
            log(f"{label}: {'pilot run' if train_steps else 'training probe'}, {steps} steps")
            row.update(_probe_run(c, run_dir, steps))
            adapter = run_dir / "adapters" if train_steps else None
            if train_steps:
                row["pilot_run"] = str(run_dir)
            log(f"{label}: held-out split" + (" (0-shot, k-shot, tuned)" if train_steps else ""))
            row.update(_measure(c, records, fmt, train, shots, limit, adapter, label, log,
                                status))
            if not train_steps:
                shutil.rmtree(run_dir, ignore_errors=True)
            first = next(iter(row["sides"].values()), {})
            row["decode_tokens_per_sec"] = first.get("tokens_per_sec")
        except MlxtuneError as e:
            row["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
            log(f"{label}: {row['error']}")
        except Exception as e:  # noqa: BLE001  (one candidate's failure is its row's)
            first = str(e).splitlines()[0] if str(e) else ""
            row["error"] = f"{type(e).__name__}: {first}"
            log(f"{label}: failed: {row['error']}")
        row["wall_s"] = round(time.perf_counter() - start, 1)
    shutil.rmtree(out_dir / ".probes", ignore_errors=True)

    result = {"config": cfg.source, "split": ev.split, "split_examples": len(records),
              "examples": n_eval, "shots": shots, "train_steps": train_steps,
              "usable_gb_given": usable_gb, "metric_name": ev.metric, "candidates": rows}
    result.update(rank(result))
    report._atomic_write(out_dir / COMPARE_JSON, report.to_json(result) + "\n")
    report._atomic_write(out_dir / COMPARE_MD, markdown(result))
    result["out_dir"] = str(out_dir)
    return result


def rank(result: dict) -> dict:
    """main_metric, ranking (best first), each row's main value / side / per-GB score,
    and the recommendation."""
    from mlxtune.evaluate import report

    rows = result["candidates"]
    ok = [r for r in rows.values() if not r.get("error") and r.get("sides")]
    main = report.pick_main([side for r in ok for side in r["sides"].values()],
                            result.get("metric_name"))
    out = {"main_metric": None, "ranking": [], "recommendation": None}
    if main is None:
        return out
    key, label, higher = main
    out["main_metric"] = {"key": key, "label": label, "higher_is_better": higher,
                          "margin": report.MARGIN}
    for r in ok:
        values = {s: v.get(key) for s, v in r["sides"].items() if v.get(key) is not None}
        if not values:
            continue
        side = (max if higher else min)(values, key=values.get)
        r["main"], r["main_side"] = values[side], side
        r["main_per_gb"] = _score(values[side], higher, r.get("peak_gb"))
    scored = [r for r in ok if r.get("main") is not None]
    scored.sort(key=lambda r: (-(r["main_per_gb"] if r["main_per_gb"] is not None
                                 else -math.inf), r["model"]))
    out["ranking"] = [r["model"] for r in scored]
    if scored:
        best = (max if higher else min)(scored, key=lambda r: r["main"])
        close = [r for r in scored
                 if report.compare_values(key, higher, r["main"], best["main"])[1]
                 or r is best]
        pick = min(close, key=lambda r: (r.get("peak_gb") or math.inf, r["model"]))
        text = (f"{pick['model']}: {label} {report._value(key, pick['main'])} "
                f"({pick['main_side']})")
        if pick is best:
            text += f", the best of the {len(scored)} measured"
        else:
            text += (f", within {report.margin_text(key)} of the best ({best['model']}, "
                     f"{report._value(key, best['main'])})")
        if pick.get("peak_gb"):
            text += f", at a planned peak of {pick['peak_gb']:.2f} GB"
        out["recommendation"] = {"model": pick["model"], "text": text + "."}
    return out


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _cell(v, fmt: str = "{:.2f}") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return fmt.format(v)


def markdown(result: dict) -> str:
    """The table: one row per candidate, ranked; failed candidates last with their reason.
    (Also renders a compare.json read back: `markdown(json.load(...))`.)"""
    from mlxtune.evaluate import report

    main = result.get("main_metric")
    key = main["key"] if main else None
    side_names = []
    for r in result["candidates"].values():
        for s in r.get("sides", {}):
            if s not in side_names:
                side_names.append(s)
    head = ["rank", "model", "parameters", "planned peak GB here / Mac", "measured peak GB",
            "32 / 64 / 128 GB", "step s", "train tok/s", "decode tok/s"]
    if key:
        head += [f"{main['label']} {s}" for s in side_names]
        head += ["loss " + s for s in side_names if key != "loss"]
        head += [f"{main['label']} per GB"]
    head += ["note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = result["ranking"] + [m for m in result["candidates"] if m not in result["ranking"]]
    for n, model in enumerate(order, start=1):
        r = result["candidates"][model]
        tiers = r.get("tiers") or {}
        cells = [str(n) if model in result["ranking"] else "-", f"`{model}`",
                 _count(r["parameters"]) if r.get("parameters") else "-",
                 f"{_cell(r.get('peak_gb'))} / {_cell(r.get('mac_peak_gb'))}"
                 if r.get("peak_gb") is not None else "-",
                 _cell(r.get("measured_peak_gb")),
                 " / ".join(tiers.get(t, "-") for t in ("32", "64", "128")) if tiers else "-",
                 _cell(r.get("step_s")), _cell(r.get("train_tokens_per_sec"), "{:.0f}"),
                 _cell(r.get("decode_tokens_per_sec"), "{:.1f}")]
        if key:
            sides = r.get("sides", {})
            cells += [report._value(key, sides[s][key]) if s in sides
                      and sides[s].get(key) is not None else "-" for s in side_names]
            if key != "loss":
                cells += [_cell(sides[s].get("loss"), "{:.4f}") if s in sides else "-"
                          for s in side_names]
            cells += [_cell(r.get("main_per_gb"), "{:.3f}")]
        cells += [r["error"] or ""]
        lines.append("| " + " | ".join(cells) + " |")
    text = [f"# Compare: {Path(result['config'] or 'config').name}", ""]
    if result.get("recommendation"):
        text += [f"Recommendation: {result['recommendation']['text']}", ""]
    text += [f"{result['split']} split, the first {result['examples']} of "
             f"{result['split_examples']} examples (loss and greedy generation); shots: "
             f"{', '.join(map(str, result['shots']))}"
             + (f"; pilot LoRA runs of {result['train_steps']} steps (tuned: zero-shot)"
                if result["train_steps"] else f"; step time from a {PROBE_STEPS}-step "
                "training probe (median after the first step)") + ".", ""]
    text += lines
    text += ["", "Planned peak: a training step of this config, per the planner, on this "
             "machine and on a Mac (bfloat16); measured peak: the training "
             + ("pilot's" if result["train_steps"] else "probe's") + " largest."]
    if main:
        text += ["", f"Ranked by {main['label']} (each candidate's best side) per GB of its "
                 "planned training peak on this machine"
                 + (" (loss as exp(-loss))" if key == "loss" else "")
                 + f"; the recommendation is the smallest candidate within "
                 f"{report.margin_text(key)} of the best."]
    return "\n".join(text) + "\n"
