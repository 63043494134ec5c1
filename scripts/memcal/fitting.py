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

    return workload(cfg, shape, backend.name())


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


def fit(entries: list[dict], measured: dict) -> dict:
    """Least squares on relative error: for each fit configuration, measured - exact items
    = sum_k coefficient_k * feature_k, each row divided by the measured peak. The
    reference-pass and bfloat16-on-CPU factors are fitted afterwards, one at a time."""
    import numpy as np

    from mlxtune.memory import calibration
    from mlxtune.memory.estimate import estimate, features, fixed_bytes

    coef = dict(calibration.COEFFICIENTS, **FIXED)
    names = [k for k in features(workload_of(entries[0]))
             if k not in FIXED and k not in BY_ADAPTER]
    rows, target, weight, used = [], [], [], []
    loads = {e["name"]: workload_of(e) for e in entries}
    for e in entries:
        w = loads[e["name"]]
        if (w.backend == "cpu" and w.compute_bytes == 2) or w.adapter_type != "lora":
            continue  # fitted below
        f = features(w, coef)
        m = measured[e["name"]]["peak_gb"] * 1e9
        rows.append([f[k] for k in names])
        target.append(m - sum(fixed_bytes(w).values())
                      - sum(v * f[k] for k, v in FIXED.items() if k in f))
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


def write_coefficients(result: dict, env: dict) -> None:
    lines = ['"""Fitted counts of mlxtune.memory.estimate: written by scripts/calibrate_memory.py '
             '--fit.', "",
             "Each value multiplies one of estimate.features() (bytes of one array of that "
             "kind), so", "it reads \"how many such arrays MLX holds at the peak of a "
             "training step\" (framework:", "megabytes). Fitted on the `fit` part of the "
             f"grid only, measured with MLX {env['mlx']} on the", f"{env['backend']} backend "
             f"({env['machine']}); docs/memory.md checks them on the rest.", '"""', "",
             "COEFFICIENTS = {"]
    for k, v in result["coefficients"].items():
        lines.append(f"    {k!r}: {v},")
    lines += ["}", "", "FITTED_ON = ("]
    lines += [f"    {n!r}," for n in result["fitted_on"]]
    lines += [")", ""]
    COEFFICIENT_FILE.write_text("\n".join(lines).replace("'", '"'))
