"""Validation loss of a bfloat16 run (the GPU profile) against the float32 run (the CPU
profile), dense and 4-bit, on the quickstart data.

bfloat16 has no BLAS path on the CPU and MLX's quantized matmul runs at a few GFLOP/s
there, so the GPU profile computes the packaged SmolLM2-135M at ~1 token/s here. The
comparison therefore runs on SmolLM2 cut to 8 of its 30 blocks (`--blocks`: the first
two and the last six, which keep the residual stream closest to what the head expects:
held-out loss 10.7 nats before training, against 22.3 for the first eight alone and 3.4
for the whole model), real weights with its own tokenizer and head, written as two GGUF
files: the blocks as stored (Q4_1, 4-bit; float16 scales) and dequantized to F32
(dense). Each is trained two ways:

  dense   float32  MLXTUNE_PROFILE=cpu   (model.dtype auto = float32)
  dense   bfloat16 MLXTUNE_PROFILE=gpu   (auto = bfloat16; MLX's attention, no CPU kernels)
  4-bit   float32  MLXTUNE_PROFILE=cpu   (dequantize-then-BLAS)
  4-bit   bfloat16 MLXTUNE_PROFILE=gpu   (MLX's quantized layers, scales kept float16)

LoRA weights and optimizer state are float32 in every run.

with the quickstart's config otherwise (the same seed, batches and validation examples),
and prints the validation loss before and after training and the relative difference.

    .venv/bin/python scripts/bf16_vs_f32.py --out /tmp/bf16.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cut_gguf(src: Path, dst: Path, blocks: list[int], dense: bool) -> None:
    """src's model with only the given blocks (renumbered 0..n-1 in that order); tensors
    copied as stored, or decoded to F32 with `dense`."""
    import gguf

    from mlxtune.export.gguf_fused import _decode, _nbytes, writer_with_metadata
    from mlxtune.models import gguf_file

    f = gguf_file.read(src)
    arch = f.metadata["general.architecture"]
    writer = writer_with_metadata(src, dst, {f"{arch}.block_count": len(blocks)})
    writer.add_file_type(0 if dense else 3)  # ALL_F32 | MOSTLY_Q4_1

    def new_name(name: str) -> str | None:
        if not name.startswith("blk."):
            return name
        _, i, rest = name.split(".", 2)
        return f"blk.{blocks.index(int(i))}.{rest}" if int(i) in blocks else None

    plan = []
    for t in f.tensors:
        name = new_name(t.name)
        if name is None:
            continue
        qtype = gguf.GGMLQuantizationType.F32 if dense else t.type
        plan.append((t, qtype))
        writer.add_tensor_info(name, t.shape, np.dtype(np.float32), _nbytes(t.shape, qtype),
                               raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t, qtype in plan:
        data = _decode(f, t) if dense else np.ascontiguousarray(f.data(t))
        writer.write_tensor_data(data)
    writer.close()


def run(model: Path, profile: str, run_dir: Path, args) -> dict:
    sets = {"model.path": str(model), "train.iters": args.iters,
            "train.eval_every": args.iters, "train.val_batches": args.val_batches,
            "train.save_every": 0, "train.log_every": max(1, args.iters // 4),
            "train.learning_rate": args.learning_rate, "train.warmup": 2,
            "train.batch_size": args.batch_size}
    cmd = [sys.executable, "-m", "mlxtune", "run", str(ROOT / "configs/quickstart.yaml"),
           "--run-dir", str(run_dir), "--no-eval"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ, MLXTUNE_PROFILE=profile)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{profile} run on {model.name} failed:\n{proc.stderr[-2000:]}")
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    start = events[0]
    vals = [e for e in events if e["event"] == "val"]
    trains = [e for e in events if e["event"] == "train"]
    return {"profile": start["profile"], "compute_dtype": start["compute_dtype"],
            "val_before": vals[0]["loss"], "val_after": vals[-1]["loss"],
            "train_last": trains[-1]["loss"], "wall_s": round(time.time() - t0, 1),
            "peak_gb": max(e["peak_memory_gb"] for e in trains)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="0,1,24,25,26,27,28,29",
                    help="the blocks of SmolLM2's 30 to keep, in order")
    ap.add_argument("--iters", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--val-batches", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bf16_vs_f32"))
    ap.add_argument("--only", choices=["dense", "4bit"], action="append")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from mlxtune.models import packaged_path

    args.work.mkdir(parents=True, exist_ok=True)
    src = packaged_path("smollm2-135m-instruct")
    blocks = [int(b) for b in args.blocks.split(",")]
    results = {"blocks": blocks, "iters": args.iters, "batch_size": args.batch_size}
    for kind in args.only or ["dense", "4bit"]:
        model = args.work / f"smollm2-{len(blocks)}blocks-{kind}.gguf"
        cut_gguf(src, model, blocks, dense=kind == "dense")
        for profile in ("cpu", "gpu"):
            r = run(model, profile, args.work / f"run-{kind}-{profile}", args)
            results[f"{kind}/{r['compute_dtype']}"] = r
            print(f"{kind:5} {r['compute_dtype']:8} ({profile} profile): val loss "
                  f"{r['val_before']:.4f} -> {r['val_after']:.4f}  ({r['wall_s']:.0f} s, "
                  f"peak {r['peak_gb']:.2f} GB)", flush=True)
        f32, b16 = results[f"{kind}/float32"], results[f"{kind}/bfloat16"]
        rel = (b16["val_after"] - f32["val_after"]) / f32["val_after"]
        results[f"{kind}/relative_difference"] = rel
        print(f"{kind:5} bfloat16 vs float32 final validation loss: {rel:+.2%}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
