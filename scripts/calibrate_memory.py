"""Calibrate and check the memory planner against peaks measured on real training steps.

    python scripts/calibrate_memory.py                  # measure the grid, write docs/memory.md
    python scripts/calibrate_memory.py --part check     # only the held-out configurations
    python scripts/calibrate_memory.py --only smollm2-gguf-sft
    python scripts/calibrate_memory.py --fit            # refit mlxtune/memory/calibration.py
                                                        # from the fit part's measurements
    python scripts/calibrate_memory.py --report         # table from stored measurements only
    python scripts/calibrate_memory.py --claims         # the README's table for the seeds' claims

Every configuration of the grid trains for a few steps through the real path
(mlxtune.run.run: data files, model loading, LoRA, the trainer's compiled step), in a
process of its own so that peaks do not mix; the peak is mx.get_peak_memory() over the
training steps (reset once the model is loaded; `mlxtune run` reports the same number in
its train events). The data is written so that every row is as long as
data.max_seq_len, which is what the planner assumes.

The grid has two parts. `fit`: tiny random llama models varied one size at a time; the
fitted counts of mlxtune.memory.estimate come from these alone (--fit, a least-squares
fit of relative error). `check`: configurations left out of the fit, the kind people
run: the packaged SmolLM2 (its GGUF Q4_1 / Q8_0 file, a dense float32 copy, 4-bit and NF4
on load), a GGUF mixing K-quants, DPO and ORPO, packing, gradient checkpointing, chunked
loss, bfloat16, qwen2. Measurements are kept in docs/memory-calibration.json, so the
table and the fit can be redone without training again.

The pieces live in scripts/memcal/: the grid, its models, data and configs in grid.py;
the planner's predictions and the fit in fitting.py; the table of docs/memory.md and the
claims table in report.py; the stored measurements in storage.py; the paths in
__init__.py. This script keeps the command line and the measuring worker.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memcal import CACHE, ROOT  # noqa: E402
from memcal.fitting import (  # noqa: E402
    CPU_FITTED, SHARED, fit, guard_margins, predict, write_coefficients)
from memcal.grid import config_for, grid  # noqa: E402
from memcal.report import claims_table, describe, report, write_doc  # noqa: E402
from memcal.storage import environment, load_measurements, record_measurement  # noqa: E402


# ---------------------------------------------------------------------------- measuring


def worker(spec: dict) -> dict:
    """In a process of its own: train the configuration, return the measured peaks."""
    import mlxtune  # noqa: F401  (OpenBLAS before mlx.core)

    from mlxtune import config
    from mlxtune.run import run
    from mlxtune.train.events import read_events

    work = Path(tempfile.mkdtemp(prefix="calibrate-", dir=CACHE))
    cfg = config.load(config_for(spec, work))
    start = time.perf_counter()
    run_dir, result = run(cfg, work / "run", quiet=True, evaluate=False, memory_check=False)
    events = read_events(run_dir)
    peaks = [e["peak_memory_gb"] for e in events if e["event"] == "train"]
    if result.reason != "done" or not peaks:
        raise RuntimeError(f"{spec['name']}: the run ended with {result.reason}")
    return {"peaks_gb": peaks, "peak_gb": max(peaks),
            "seconds": round(time.perf_counter() - start, 1)}


def measure(spec: dict) -> dict:
    CACHE.mkdir(parents=True, exist_ok=True)
    # path "mlx" (the tiny grid's, the default): MLX's own exp / SwiGLU, not
    # mlxtune.fastmath's CPU forms, and not mlxtune.native's kernels, the graph Metal and
    # CUDA run. path "cpu": what `mlxtune run` runs here by default (docs/memory.md).
    # MLX's evaluation order: the CPU profile's depth-first one (mlxtune._schedule) for
    # path "cpu"; MLX's default breadth-first one, as on a Mac, for "mlx" and "gpu".
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLXTUNE_FASTMATH", "MLXTUNE_NATIVE", "MLXTUNE_PROFILE",
                        "MLX_BFS_MAX_WIDTH")}
    if spec.get("path", "mlx") == "mlx":
        env.update(MLXTUNE_FASTMATH="0", MLXTUNE_NATIVE="0", MLX_BFS_MAX_WIDTH="20")
    elif spec["path"] == "gpu":  # every choice as on a GPU (planned as Metal's graph)
        env.update(MLXTUNE_PROFILE="gpu")
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{spec['name']}: worker failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("fit", "check", "tiny-cpu", "fit-real", "real", "all"),
                    default="all")
    ap.add_argument("--only", action="append", metavar="NAME")
    ap.add_argument("--remeasure", action="store_true",
                    help="Measure again configurations that already have a measurement.")
    ap.add_argument("--fit", action="store_true", help="Refit the coefficients from the fit "
                    "part's stored measurements (rewrites mlxtune/memory/calibration.py).")
    ap.add_argument("--report", action="store_true", help="Only rebuild the table.")
    ap.add_argument("--claims", action="store_true", help="Print the README's table of the "
                    "seeds' claims against the planner.")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import mlxtune  # noqa: F401

    if args.claims:
        print(claims_table())
        return
    entries = [e for e in grid() if args.part in ("all", e["part"])]
    if args.only:
        entries = [e for e in entries if e["name"] in args.only]
    stored = load_measurements()
    env = environment()
    measured = stored.setdefault("measurements", {})
    if not args.report and not args.fit:
        for e in entries:
            if e["name"] in measured and not args.remeasure:
                continue
            got = measure(e)
            stored = record_measurement(e["name"], {**got, "config": describe(e),
                                                    "part": e["part"]}, env)
            measured = stored["measurements"]
            p = predict(e)
            print(f"{e['name']:32s} measured {got['peak_gb']:.3f} GB  predicted "
                  f"{p['peak_gb']:.3f} GB  ({p['peak_gb'] / got['peak_gb'] - 1:+.1%})  "
                  f"{got['seconds']} s", flush=True)
    if args.fit:
        from mlxtune.memory import calibration

        fit_entries = [e for e in grid() if e["part"] == "fit" and e["name"] in measured]
        result = fit(fit_entries, measured)
        # The CPU kernels: MLX's counts, with those the kernels change refitted on the
        # real-width entries (fitting.CPU_FITTED)
        cpu_entries = [e for e in grid() if e["part"] == "fit-real" and e["name"] in measured]
        cpu = (fit(cpu_entries, measured, start=result["coefficients"], free=CPU_FITTED)
               if cpu_entries else None)
        if cpu:
            for k in SHARED:
                result["coefficients"][k] = cpu["coefficients"][k]
        margins = guard_margins(grid(), measured, {
            "mlx": result["coefficients"],
            "cpu": (cpu or {"coefficients": calibration.COEFFICIENTS_CPU})["coefficients"]})
        write_coefficients(result, stored.get("environment", env), cpu, margins)
        print(json.dumps({"mlx": result["coefficients"],
                          "cpu": cpu and cpu["coefficients"]}, indent=1))
        return
    table, summary = report([e for e in grid() if e["name"] in measured], measured,
                            stored.get("environment", env))
    write_doc(table)
    print(table)


if __name__ == "__main__":
    main()
