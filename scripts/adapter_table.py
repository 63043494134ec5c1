"""The README's table of adapter types, measured on the quickstart.

    python scripts/adapter_table.py run [--only NAME ...]   # train + evaluate, one at a time
    python scripts/adapter_table.py table                   # the markdown table from the runs
    python scripts/adapter_table.py plan                    # the planner's 7B numbers per method
    python scripts/adapter_table.py time [--rounds 3]       # seconds per step, measured apart
    python scripts/adapter_table.py readme                  # both tables into README.md

Every method trains configs/quickstart.yaml (80 steps of 4 examples, seed 0, cosine
schedule with 5 warmup steps) and is evaluated at the end of its run on the 179 held-out
test requests (the tuned side only: eval.base, eval.shots and eval.forgetting are off,
they do not depend on the method). Full fine-tuning, LoRA, DoRA and rsLoRA train on the
packaged SmolLM2-135M dequantized to float32 (its GGUF's Q4_1 / Q8_0 blocks decoded into
an F32 GGUF by mlxtune.export.gguf_fused.write_merged, no change); QLoRA on the GGUF as
shipped. Runs go to runs/table/NAME; a finished run (eval.json present) is not redone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "table"
DENSE = OUT / "smollm2-135m-f32.gguf"
EVAL = ["eval.base=false", "eval.shots=0", "eval.forgetting=false"]

# name -> (label, --set overrides)
METHODS = {
    "full": ("full fine-tuning", [f"model.path={DENSE}", "adapter.type=full",
                                  "train.learning_rate=1.0e-4"]),
    "lora-r16": ("LoRA r16", [f"model.path={DENSE}", "adapter.rank=16", "adapter.alpha=32"]),
    "dora-r16": ("DoRA r16", [f"model.path={DENSE}", "adapter.type=dora", "adapter.rank=16",
                              "adapter.alpha=32"]),
    "qlora-r16": ("QLoRA r16", ["adapter.rank=16", "adapter.alpha=32"]),
    "rslora-r64": ("rsLoRA r64", [f"model.path={DENSE}", "adapter.rank=64", "adapter.alpha=16",
                                  "adapter.rslora=true"]),
    # The dense copy quantized again on load (QLoRA's NF4): the as-shipped row trains the
    # very function the dense copy computes, this one a 4-bit approximation of it.
    "qlora-nf4-r16": ("QLoRA r16, NF4 of the dense copy",
                      [f"model.path={DENSE}", "model.quantize.format=nf4", "adapter.rank=16",
                       "adapter.alpha=32"]),
}


def dense_base() -> None:
    if DENSE.exists():
        return
    import mlxtune  # noqa: F401
    from mlxtune.export.gguf_fused import write_merged
    from mlxtune.models import packaged_path

    OUT.mkdir(parents=True, exist_ok=True)
    tmp = DENSE.with_suffix(".tmp")
    write_merged(packaged_path("smollm2-135m-instruct"), tmp, "f32")
    tmp.rename(DENSE)


def command(name: str) -> list[str]:
    sets = METHODS[name][1] + EVAL
    cmd = [sys.executable, "-m", "mlxtune", "run", str(ROOT / "configs" / "quickstart.yaml"),
           "--run-dir", str(OUT / name)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run(names: list[str]) -> None:
    dense_base()
    for name in names:
        if (OUT / name / "eval.json").exists():
            print(f"{name}: done already", flush=True)
            continue
        print("$ " + " ".join(command(name)), flush=True)
        subprocess.run(command(name), check=True, cwd=ROOT)


def summary(name: str) -> dict | None:
    run_dir = OUT / name
    events_file = run_dir / "events.jsonl"
    if not (run_dir / "eval.json").exists() or not events_file.exists():
        return None
    events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    start = next(e for e in events if e["event"] == "start")
    trains = [e for e in events if e["event"] == "train"]
    # Seconds per step from consecutive train events (log_every steps apart); validation
    # and checkpoints happen between some of them: the median leaves those out.
    per_step = [(b["time"] - a["time"]) / (b["step"] - a["step"])
                for a, b in zip(trains, trains[1:])]
    ev = json.loads((run_dir / "eval.json").read_text())
    tuned = ev["tuned"]
    return {"trainable": start["trainable_params"], "total": start["total_params"],
            "planned_gb": start["planned_peak_gb"],
            "peak_gb": max(e["peak_memory_gb"] for e in trains),
            "s_per_step": statistics.median(per_step),
            "val": min((e["loss"] for e in events if e["event"] == "val"), default=None),
            "tuned": tuned}


METRICS = [("loss", "test loss", "{:.4f}"), ("schema_match", "schema match", "{:.1%}"),
           ("exact_match", "exact match", "{:.1%}"), ("metric", "field accuracy", "{:.3f}")]


def table() -> str:
    rows = {n: summary(n) for n in METHODS}
    timing = OUT / "timing.json"
    timed = json.loads(timing.read_text())["median"] if timing.exists() else {}
    full = rows.get("full")
    head = ("| method | trainable params | peak GB (planned) | s/step (run; timed apart) | "
            "best val loss | "
            + " | ".join(m[1] for m in METRICS) + " | % of full (field accuracy) |")
    lines = [head, "|" + "---|" * (6 + len(METRICS))]
    for name, (label, _) in METHODS.items():
        r = rows[name]
        if r is None:
            lines.append(f"| {label} | (not measured) |")
            continue
        vals = []
        for key, _, fmt in METRICS:
            v = r["tuned"].get(key)
            vals.append(fmt.format(v) if isinstance(v, (int, float)) else "-")
        pct = "-"
        if full is not None and full["tuned"].get("metric"):
            pct = f"{r['tuned']['metric'] / full['tuned']['metric']:.1%}"
        apart = f"{timed[name]:.2f}" if name in timed else "-"
        lines.append(f"| {label} | {r['trainable']:,} | {r['peak_gb']:.2f} ({r['planned_gb']}) | "
                     f"{r['s_per_step']:.1f}; {apart} | {r['val']:.4f} | " + " | ".join(vals)
                     + f" | {pct} |")
    return "\n".join(lines)


PLAN_MODEL = "mistralai/Mistral-7B-Instruct-v0.3"


def plan_table() -> str:
    """The planner's peak for a 7B (Mistral-7B-Instruct-v0.3) on a Mac per method: batch
    1 x 512 tokens, without and with checkpointing, every linear layer of every block."""
    import mlxtune  # noqa: F401
    from mlxtune import config
    from mlxtune.memory import shapes, tiers
    from mlxtune.memory.estimate import estimate, workload

    methods = [("full fine-tuning", {"type": "full"}, None),
               ("LoRA r16", {"rank": 16, "alpha": 32}, None),
               ("DoRA r16", {"type": "dora", "rank": 16, "alpha": 32}, None),
               ("QLoRA r16 (4-bit)", {"rank": 16, "alpha": 32}, "4-bit"),
               ("rsLoRA r64", {"rank": 64, "alpha": 16, "rslora": True}, None)]
    lines = ["| method | checkpointing | planned peak (GB) | items over 1 GB | 32 | 64 | 128 |",
             "|---|---|---|---|---|---|---|"]
    for label, adapter, base in methods:
        for ckpt in (False, True):
            raw = {"name": "plan", "model": {"path": PLAN_MODEL}, "adapter": adapter,
                   "data": {"train": "x.jsonl", "max_seq_len": 512},
                   "train": {"batch_size": 1, "grad_checkpoint": ckpt}}
            if base:
                raw["model"]["quantize"] = {"format": "affine", "bits": 4, "group_size": 64}
            cfg = config.from_dict(raw)
            b = estimate(workload(cfg, shapes.resolve(cfg.model), "metal"))
            verdicts = [tiers.verdict(b.peak, m.usable_bytes) for m in tiers.tiers()]
            big = ", ".join(f"{k} {v:.1f}" for k, v in
                            sorted(b.gb().items(), key=lambda kv: -kv[1]) if v >= 1.0)
            lines.append(f"| {label if not ckpt else ''} | {'on' if ckpt else 'off'} | "
                         f"{b.peak / 1e9:.1f} | {big} | " + " | ".join(verdicts) + " |")
    return "\n".join(lines)


def time_steps(rounds: int, steps: int) -> dict:
    """Seconds per step of each method, measured apart from the long runs: `rounds`
    rounds of short runs (`steps` steps, no validation, no checkpoint, no eval), the
    methods one after another in each round, so that each meets the same load on a
    shared machine. The median over rounds of each run's median step (steps 3 onwards:
    the first compile their graphs)."""
    import tempfile

    dense_base()
    out: dict = {name: [] for name in METHODS}
    for r in range(rounds):
        for name in METHODS:
            work = Path(tempfile.mkdtemp(prefix=f"time-{name}-", dir=OUT))
            cmd = command(name)
            cmd[cmd.index("--run-dir") + 1] = str(work / "run")
            cmd += ["--no-eval", "-q", "--set", f"train.iters={steps}", "--set",
                    "train.eval_every=0", "--set", "train.save_every=0", "--set",
                    "train.log_every=1", "--set", "train.warmup=0"]
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            events = [json.loads(line) for line in
                      (work / "run" / "events.jsonl").read_text().splitlines() if line.strip()]
            trains = [e for e in events if e["event"] == "train"]
            per = [b["time"] - a["time"] for a, b in zip(trains, trains[1:])][1:]
            out[name].append(statistics.median(per))
            print(f"round {r + 1} {name}: {statistics.median(per):.2f} s/step", flush=True)
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    result = {name: statistics.median(v) for name, v in out.items()}
    (OUT / "timing.json").write_text(json.dumps({"per_round": out, "median": result},
                                                indent=1) + "\n")
    return result


def write_readme() -> None:
    """Put the two tables into README.md between their markers."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    for marker, body in (("adapter table", table()), ("adapter plan", plan_table())):
        start = f"<!-- {marker}: scripts/adapter_table.py {marker.split()[-1]} -->"
        end = f"<!-- end of {marker} -->"
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = f"{before}{start}\n{body}\n{end}{after}"
    readme.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "table", "plan", "time", "readme"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--only", action="append", choices=list(METHODS))
    args = ap.parse_args()
    if args.what == "run":
        run(args.only or list(METHODS))
    elif args.what == "table":
        print(table())
    elif args.what == "readme":
        write_readme()
    elif args.what == "time":
        print(json.dumps(time_steps(args.rounds, args.steps), indent=1))
    else:
        print(plan_table())


if __name__ == "__main__":
    main()
