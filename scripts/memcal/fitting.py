"""The planner's predictions for a grid entry and the least-squares fit of its counts
(scripts/calibrate_memory.py --fit writes them to mlxtune/memory/calibration.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from memcal import CACHE, COEFFICIENT_FILE
from memcal.grid import config_for


# ---------------------------------------------------------------------------- predicting


def workload_of(spec: dict):
    import mlxtune  # noqa: F401

    from mlxtune import config, memory
    from mlxtune.memory.estimate import workload

    work = Path(tempfile.mkdtemp(prefix="plan-", dir=CACHE))
    cfg = config.load(config_for(spec, work))
    shape = memory.resolve_shape(cfg.model)
    from mlxtune import backend

    # The tiny grid (path "mlx") measures MLX's ops on the CPU; path "cpu" mlxtune's
    # kernels; path "gpu" the GPU profile (MLX's ops with every choice a GPU makes),
    # planned as a Mac's step in the config's dtype.
    path = spec.get("path", "mlx")
    if path == "gpu":
        return workload(cfg, shape, "metal", kernels="mlx")
    return workload(cfg, shape, backend.name(), kernels=path)


def predict(spec: dict, coefficients: dict | None = None) -> dict:
    from mlxtune.memory.estimate import estimate

    b = estimate(workload_of(spec), coefficients)
    return {"peak_gb": b.peak / 1e9, "items": b.gb()}


# ---------------------------------------------------------------------------- fitting


# Counts set by what the computation must hold, not fitted: a checkpointed block keeps its
# input (one [positions, hidden] array) until its backward pass; dpo's reference pass,
# a forward pass without gradient, is taken to hold what the step keeps for backward.
FIXED = {"ckpt_d": 1.0, "reference": 1.0}
# Counts of one adapter type each, fitted after the rest on that type's configurations
# alone (one at a time, like the bfloat16-on-CPU factor), so that they leave the LoRA
# counts as they are.
BY_ADAPTER = {"saved_dora": "dora", "full_update": "full"}


# Counts that only mlxtune's CPU kernels have (their features are zero on MLX's ops).
CPU_ONLY = ("logits_cpu", "head_dense", "ckpt_block", "saved_gelu", "dequant_block",
            "dequant_block_ckpt", "ckpt_own")
# Fitted on the CPU kernels' real-width runs and shared with MLX's counts: the graph they
# count is MLX's on both (a GELU MLP's intermediates; the tiny grid has SwiGLU only).
SHARED = ("saved_gelu",)
# What the CPU kernels' fit frees, starting from MLX's counts: the loss's chunks and the
# quantized head's copy, the checkpointed blocks' inputs and recomputation (what a
# checkpointed block keeps is fixed at one input for MLX's fit), and the CPU path's dense
# copies of quantized layers, whose counts MLX's fit took on tiny models where the
# embedding was the largest matrix. Every other count is MLX's: the blocks keep the same
# arrays either way (measured: MLX's counts predict the dense real-width runs with the
# CPU kernels within 4%), while the tiny grid's CPU-kernel runs do not predict real sizes
# (docs/memory.md).
CPU_FITTED = tuple(k for k in CPU_ONLY if k not in ("logits_cpu",)) + (
    "dequant_max", "dequant_max_ckpt", "ckpt_d")
# Nothing set by hand: under MLX's breadth-first order a checkpointed step with
# mlxtune's own-format layers held about their packed size more than the other counts
# explained (Qwen2.5-3B NF4: 1.38 GB at 36 blocks), and ckpt_own was set to 1 for it; the
# CPU profile now evaluates depth-first (mlxtune._schedule) and the 4-block NF4 slice fell
# from 3.05 to 2.25 GB, so ckpt_own is fitted like the rest (non-negative: it may be 0).
FIXED_CPU = {"logits_cpu": 1.0}
# MLX's counts of every block's dense copies, which the CPU kernels' counts replace by
# one block's (dequant_block): 0 there.
CPU_ZERO = ("dequant_all", "dequant_own", "dequant_all_ckpt", "dequant_own_ckpt")


def fit(entries: list[dict], measured: dict, start: dict | None = None,
        free: tuple | None = None) -> dict:
    """Least squares on relative error: for each fit configuration, measured - exact items
    = sum_k coefficient_k * feature_k, each row divided by the measured peak. The
    reference-pass and bfloat16-on-CPU factors are fitted afterwards, one at a time.
    `start`: the counts to begin from (MLX's by default); `free`: the counts to fit (every
    count but the CPU kernels' own when None), the others kept at their `start` values;
    a count whose feature is zero in every entry keeps its value too."""
    import numpy as np

    from mlxtune.memory import calibration
    from mlxtune.memory.estimate import estimate, features, fixed_bytes

    coef = dict(start or calibration.COEFFICIENTS, **FIXED)
    for k in CPU_ONLY:
        coef.setdefault(k, 0.0)
    if free is not None and set(free) == set(CPU_FITTED):
        coef.update(dict.fromkeys(CPU_ZERO, 0.0))
        coef.update(FIXED_CPU)
    loads = {e["name"]: workload_of(e) for e in entries}
    names = [k for k in features(workload_of(entries[0]))
             if (k not in FIXED or (free is not None and k in free)) and k not in BY_ADAPTER
             and (k in free if free is not None else k not in CPU_ONLY)
             and any(features(w, coef)[k] for w in loads.values()
                     if not (w.backend == "cpu" and w.compute_bytes == 2)
                     and w.adapter_type == "lora")]
    from mlxtune.memory.estimate import LOSS_PHASE, RECOMPUTE_PHASE, phase_overlap

    # The CPU kernels' checkpointed steps hold one of two phases (estimate.phase_overlap):
    # which one is decided with the counts of the previous round, a few rounds.
    for _ in range(4 if free is not None else 1):
        rows, target, weight, used = [], [], [], []
        for e in entries:
            w = loads[e["name"]]
            if (w.backend == "cpu" and w.compute_bytes == 2) or w.adapter_type != "lora":
                continue  # fitted below
            f = features(w, coef)
            smaller, _ = phase_overlap(w, f, coef)
            drop = LOSS_PHASE if smaller == "loss" else \
                RECOMPUTE_PHASE if smaller == "recompute" else ()
            f = {k: (0.0 if k in drop else v) for k, v in f.items()}
            m = measured[e["name"]]["peak_gb"] * 1e9
            rows.append([f[k] for k in names])
            target.append(m - sum(fixed_bytes(w).values())
                          - sum(coef[k] * f[k] for k in f if k not in names))
            weight.append(1.0 / m)
            used.append(e["name"])
        A = np.array(rows) * np.array(weight)[:, None]
        y = np.array(target) * np.array(weight)
        x = _nnls(A, y)
        coef.update({k: float(round(v, 3)) for k, v in zip(names, x)})

    def ratio_fit(key, select, lo, hi):
        picked = [e for e in entries if select(loads[e["name"]])]
        if not picked:
            return
        best, err = coef[key], float("inf")
        for i in range(201):
            trial = dict(coef, **{key: lo + (hi - lo) * i / 200})
            errs = [abs(estimate(loads[e["name"]], trial).peak
                        / (measured[e["name"]]["peak_gb"] * 1e9) - 1) for e in picked]
            if max(errs) < err:
                best, err = trial[key], max(errs)
        coef[key] = round(best, 3)
        used.extend(e["name"] for e in picked)

    ratio_fit("cpu_half_bytes", lambda w: w.backend == "cpu" and w.compute_bytes == 2
              and w.adapter_type == "lora", 2.0, 8.0)
    for key, kind in BY_ADAPTER.items():
        ratio_fit(key, lambda w, kind=kind: w.adapter_type == kind, 0.0, 8.0)
    return {"coefficients": coef, "fitted_on": sorted(used)}


def _nnls(A, y, iters: int = 500):
    """Non-negative least squares (Lawson-Hanson active set); counts of arrays cannot be
    negative."""
    import numpy as np

    n = A.shape[1]
    passive = np.zeros(n, bool)
    x = np.zeros(n)
    for _ in range(iters):
        grad = A.T @ (y - A @ x)
        if passive.all() or (grad[~passive] <= 1e-12).all():
            break
        j = np.argmax(np.where(passive, -np.inf, grad))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], y, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-12
    return x


def guard_margins(entries: list[dict], measured: dict, coefficients: dict) -> dict:
    """mlxtune run's margin for each kind of kernels: the largest under-prediction
    (measured / predicted - 1) over the held-out configurations measured with them, with
    `coefficients` ({"mlx": ..., "cpu": ...}), rounded up to a percent; 0 where none."""
    import math

    from mlxtune.memory.estimate import estimate

    out = {"mlx": 0.0, "cpu": 0.0}
    for e in entries:
        if e["part"] not in HELD_OUT or e["name"] not in measured:
            continue
        kernels = "cpu" if e.get("path") == "cpu" else "mlx"
        w = workload_of(e)
        under = measured[e["name"]]["peak_gb"] * 1e9 / estimate(w, coefficients[kernels]).peak - 1
        out[kernels] = max(out[kernels], math.ceil(under * 100) / 100)
    return out


HELD_OUT = ("check", "real")


def write_coefficients(result: dict, env: dict, cpu: dict | None = None,
                       margins: dict | None = None) -> None:
    """calibration.py: MLX's counts (`result`, from the `fit` part) and the CPU kernels'
    (`cpu`: MLX's with CPU_FITTED refitted on `fit-real`; kept as they are when None),
    and the guard's
    margins."""
    from mlxtune.memory import calibration

    if cpu is None:
        cpu = {"coefficients": calibration.COEFFICIENTS_CPU,
               "fitted_on": list(getattr(calibration, "FITTED_ON_CPU", ()))}
    lines = ['"""Fitted counts of mlxtune.memory.estimate: written by scripts/calibrate_memory.py '
             '--fit.', "",
             "Each value multiplies one of estimate.features() (bytes of one array of that "
             "kind), so", "it reads \"how many such arrays MLX holds at the peak of a "
             "training step\" (framework:", "megabytes). COEFFICIENTS: the ops of MLX (Metal, "
             "CUDA, the CPU without the", "kernels of mlxtune), fitted on the `fit` part of "
             "the grid; COEFFICIENTS_CPU: the CPU", "kernels of mlxtune (fastmath, native): "
             "the same counts, those the kernels change", "refitted on `fit-real`. Measured "
             "with MLX "
             f"{env['mlx']} on the",
             f"{env['backend']} backend ({env['machine']}); docs/memory.md checks them on "
             "the held-out parts.", '"""', "",
             "COEFFICIENTS = {"]
    for k, v in result["coefficients"].items():
        lines.append(f"    {k!r}: {v},")
    lines += ["}", "", "# The CPU kernels of mlxtune (fastmath, native): the counts above "
              "with", "# scripts/memcal/fitting.CPU_FITTED refitted on the `fit-real` part",
              "COEFFICIENTS_CPU = {"]
    for k, v in cpu["coefficients"].items():
        lines.append(f"    {k!r}: {v},")
    lines += ["}", "", "FITTED_ON = ("]
    lines += [f"    {n!r}," for n in result["fitted_on"]]
    lines += [")", "", "FITTED_ON_CPU = ("]
    lines += [f"    {n!r}," for n in cpu["fitted_on"]]
    lines += [")", "", "# The margin `mlxtune run` adds to the plan: the largest "
              "under-prediction measured on", "# held-out configurations of each kind of "
              "kernels (scripts/memcal/fitting.guard_margins).",
              f"GUARD_MARGIN = {dict(margins or calibration.GUARD_MARGIN)!r}", ""]
    COEFFICIENT_FILE.write_text("\n".join(lines).replace("'", '"'))
