#!/usr/bin/env python
"""Step time of a LoRA step on SmolLM2-135M on this machine, three ways, same data:

  1. mlxtune, dense float32 base (the packaged GGUF dequantized and saved as an mlx-lm folder)
  2. mlxtune, 4-bit base as shipped (the packaged GGUF's Q4_1, kept quantized) with mlxtune's
     default LoRA settings (rank 8, alpha 16, every linear layer of every block)
  3. mlx-lm's own trainer (`python -m mlx_lm lora`) with its defaults (rank 8, scale 20, the
     last 16 blocks, lr 1e-5, batch 4, no prompt masking) on the same 4-bit base saved as an
     mlx-lm folder. Only its reporting knobs are shortened (--iters, --steps-per-report,
     --val-batches 1) so the benchmark ends in minutes; its training step is untouched.

Every variant runs in its own process, one after the other, batch 4 on the same examples
(the quickstart's chat data). Step time excludes the first step (compilation, warm-up).
mlx-lm trains on every token (mask_prompt is off by default), mlxtune on the assistant's
tokens only, so the table reports seconds per step (same examples per step) as well as
each tool's own tokens/s.

    .venv/bin/python scripts/bench_step.py            # ~15 minutes on 2 cores
    .venv/bin/python scripts/bench_step.py --skip-mlx-lm --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def save_base_folders(work: Path) -> tuple[Path, Path]:
    """The packaged GGUF as two mlx-lm folders: 4-bit as stored, and dense float32."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import dequantize_model, save_config, save_model

    from mlxtune.models import packaged_path
    from mlxtune.models.gguf import load_gguf

    q4, dense = work / "smollm2-q4", work / "smollm2-f32"
    model, tokenizer, config = load_gguf(packaged_path("smollm2-135m-instruct"))
    q4.mkdir(parents=True, exist_ok=True)
    save_model(q4, model)
    save_config(dict(config), q4 / "config.json")
    tokenizer.save_pretrained(str(q4))

    model = dequantize_model(model)
    model.update(tree_map(lambda a: a.astype(mx.float32), model.parameters()))
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    dense.mkdir(parents=True, exist_ok=True)
    save_model(dense, model)
    save_config(config, dense / "config.json")
    tokenizer.save_pretrained(str(dense))
    return q4, dense


def write_data(work: Path, n_train: int) -> Path:
    """The first quickstart examples as train.jsonl / valid.jsonl in the shape both tools read."""
    lines = (ROOT / "data/quickstart/tasks.jsonl").read_text().splitlines()
    rows = [{"messages": json.loads(line)["messages"]} for line in lines]
    folder = work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    (folder / "valid.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows[n_train:n_train + 16]))
    return folder


def run_mlxtune(label: str, model: str, data: Path, steps: int, work: Path) -> dict:
    run_dir = work / f"run-{label}"
    config = work / f"{label}.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "name": label, "model": {"path": model},
        "data": {"train": str(data / "train.jsonl"), "valid": str(data / "valid.jsonl")},
        "train": {"iters": steps, "batch_size": 4, "eval_every": 0, "log_every": 1,
                  "save_every": 0, "seed": 0},
    }))
    subprocess.run([str(ROOT / ".venv/bin/mlxtune"), "run", str(config), "--run-dir",
                    str(run_dir), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    first, last = train[0], train[-1]
    sec = (last["time"] - first["time"]) / (last["step"] - first["step"])
    return {"tool": "mlxtune", "variant": label, "sec_per_step": sec,
            "loss_tokens_per_sec": (last["tokens"] - first["tokens"]) / (last["time"] - first["time"]),
            "peak_memory_gb": max(e["peak_memory_gb"] for e in train),
            "loss_at_end": last["loss"]}


# Runs `mlx_lm lora` as its CLI does, with a reporting callback that prints each report as
# JSON: mlx-lm's terminal output is a live table, not meant to be parsed.
_MLX_LM_DRIVER = """
import json, sys
import mlx_lm.lora as lora
from mlx_lm.tuner.callbacks import TrainingCallback

class Report(TrainingCallback):
    def on_train_loss_report(self, info):
        print("BENCH " + json.dumps(info), flush=True)

lora.get_reporting_callbacks = lambda *args, **kwargs: Report()
sys.argv = ["mlx_lm.lora", *sys.argv[1:]]
lora.main()
"""


def run_mlx_lm(model: Path, data: Path, steps: int, work: Path) -> dict:
    cmd = [str(ROOT / ".venv/bin/python"), "-c", _MLX_LM_DRIVER, "--model", str(model),
           "--train", "--data", str(data), "--iters", str(steps), "--steps-per-report", "1",
           "--val-batches", "1", "--steps-per-eval", str(10 * steps), "--save-every",
           str(10 * steps), "--adapter-path", str(work / "mlx-lm-adapters")]
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    reports = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("BENCH ")]
    if len(reports) < 2:
        raise SystemExit(f"could not read mlx-lm's reports:\n{out[-2000:]}")
    later = reports[1:]  # the first step includes warm-up, as for mlxtune
    return {"tool": "mlx-lm", "variant": "defaults, 4-bit",
            "sec_per_step": sum(1 / r["iterations_per_second"] for r in later) / len(later),
            "all_tokens_per_sec": sum(r["tokens_per_second"] for r in later) / len(later),
            "peak_memory_gb": max(r["peak_memory"] for r in reports),
            "loss_at_end": reports[-1]["train_loss"], "wall_sec": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="mlxtune steps per variant")
    p.add_argument("--mlx-lm-steps", type=int, default=4)
    p.add_argument("--skip-mlx-lm", action="store_true")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="mlxtune-bench-") as tmp:
        work = Path(tmp)
        q4, dense = save_base_folders(work)
        data = write_data(work, n_train=4 * max(args.steps, args.mlx_lm_steps) + 8)
        rows = [run_mlxtune("dense-fp32", str(dense), data, args.steps, work),
                run_mlxtune("4bit-q4_1", "smollm2-135m-instruct", data, args.steps, work)]
        if not args.skip_mlx_lm:
            rows.append(run_mlx_lm(q4, data, args.mlx_lm_steps, work))

    dense_s, q4_s = rows[0]["sec_per_step"], rows[1]["sec_per_step"]
    print(f"{'tool':<8} {'variant':<16} {'s/step':>7} {'tok/s':>7} {'peak GB':>8}")
    for r in rows:
        tok = r.get("loss_tokens_per_sec", r.get("all_tokens_per_sec"))
        print(f"{r['tool']:<8} {r['variant']:<16} {r['sec_per_step']:>7.2f} {tok:>7.1f} "
              f"{r['peak_memory_gb']:>8.2f}")
    print(f"4-bit / dense step time: {q4_s / dense_s:.2f}")
    if len(rows) > 2:
        print(f"mlx-lm defaults / mlxtune defaults step time: {rows[2]['sec_per_step'] / q4_s:.1f}")
    print(f"(machine: {os.cpu_count()} cores; tok/s is loss-bearing tokens for mlxtune, "
          "all tokens for mlx-lm)")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "ratio_4bit_dense": q4_s / dense_s}, indent=2))


if __name__ == "__main__":
    main()
