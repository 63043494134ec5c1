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
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASUREMENTS = ROOT / "docs" / "memory-calibration.json"
DOC = ROOT / "docs" / "memory.md"
CACHE = Path(os.environ.get("MLXTUNE_CALIBRATE_CACHE",
                            Path(tempfile.gettempdir()) / "mlxtune-calibrate"))
COEFFICIENT_FILE = ROOT / "mlxtune" / "memory" / "calibration.py"

WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone "
         "cloud forest ember quiet rapid golden silver window garden harbor meadow").split()

# ---------------------------------------------------------------------------- the grid

TINY = {"hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 512,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8192}
MEDIUM = {"hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 2048,
          "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 32000}


def tiny(**over) -> dict:
    return {"tiny": {**TINY, **over}}


def fit_grid() -> list[dict]:
    base = {"seq": 256, "batch": 4}
    grid = []

    def add(name, model, **kw):
        grid.append({"name": f"fit-{name}", "part": "fit", "model": model, **{**base, **kw}})

    for layers in (2, 6):
        add(f"base-{layers}l", tiny(num_hidden_layers=layers))
        add(f"ffn1024-{layers}l", tiny(num_hidden_layers=layers, intermediate_size=1024))
        add(f"d512-{layers}l", tiny(num_hidden_layers=layers, hidden_size=512,
                                   num_attention_heads=8, num_key_value_heads=4))
        add(f"seq512-{layers}l", tiny(num_hidden_layers=layers), seq=512)
        add(f"vocab32k-{layers}l", tiny(num_hidden_layers=layers, vocab_size=32768))
        add(f"ckpt-{layers}l", tiny(num_hidden_layers=layers), set={"train.grad_checkpoint": True})
        add(f"chunked-{layers}l", tiny(num_hidden_layers=layers), seq=1024,
            set={"train.loss_chunk": 2048})
        add(f"bf16-{layers}l", tiny(num_hidden_layers=layers), set={"model.dtype": "bfloat16"})
        add(f"q4-{layers}l", tiny(num_hidden_layers=layers),
            set={"model.quantize": {"format": "affine", "bits": 4, "group_size": 64}})
    add("kv4-6l", tiny(num_hidden_layers=6, num_key_value_heads=4))
    add("headdim128-6l", tiny(num_hidden_layers=6, head_dim=128))
    add("seq1024-b1-6l", tiny(num_hidden_layers=6), seq=1024, batch=1)
    add("b1-6l", tiny(num_hidden_layers=6), batch=1)
    add("b8-2l", tiny(), batch=8)
    add("rank64-6l", tiny(num_hidden_layers=6), set={"adapter.rank": 64})
    add("qv-6l", tiny(num_hidden_layers=6), set={"adapter.targets": ["q_proj", "v_proj"]})
    add("odown-6l", tiny(num_hidden_layers=6), set={"adapter.targets": ["o_proj", "down_proj"]})
    add("vocab512-6l", tiny(num_hidden_layers=6, vocab_size=512))
    add("last2-6l", tiny(num_hidden_layers=6), set={"adapter.layers": 2})
    add("ckpt-ffn1024-6l", tiny(num_hidden_layers=6, intermediate_size=1024),
        set={"train.grad_checkpoint": True})
    add("ckpt-seq512-6l", tiny(num_hidden_layers=6), seq=512,
        set={"train.grad_checkpoint": True})
    add("ckpt-vocab32k-6l", tiny(num_hidden_layers=6, vocab_size=32768),
        set={"train.grad_checkpoint": True})
    add("chunked4-2l", tiny(), seq=1024, batch=8)
    add("nf4-6l", tiny(num_hidden_layers=6), set={"model.quantize": {"format": "nf4"}})
    for layers in (4, 12):  # dequantized copies of many layers (the CPU path)
        add(f"q4-medium-{layers}l", {"tiny": {**MEDIUM, "num_hidden_layers": layers}},
            batch=2, set={"model.quantize": {"format": "affine", "bits": 4, "group_size": 64}})
    for layers in (4, 12):
        add(f"q4-medium-ckpt-{layers}l", {"tiny": {**MEDIUM, "num_hidden_layers": layers}},
            batch=2, set={"model.quantize": {"format": "affine", "bits": 4, "group_size": 64},
                          "train.grad_checkpoint": True})
    add("q4-medium-seq1024-4l", {"tiny": {**MEDIUM, "num_hidden_layers": 4}}, batch=1,
        seq=1024, set={"model.quantize": {"format": "affine", "bits": 4, "group_size": 64}})
    add("nf4-medium-12l", {"tiny": MEDIUM}, batch=2, set={"model.quantize": {"format": "nf4"}})
    add("dpo-6l", tiny(num_hidden_layers=6), batch=2, data="pref", set={"objective.type": "dpo"})
    add("orpo-6l", tiny(num_hidden_layers=6), batch=2, data="pref",
        set={"objective.type": "orpo"})
    return grid


def check_grid() -> list[dict]:
    smol = {"packaged": "smollm2-135m-instruct"}
    dense = {"smollm2_dense": True}
    medium = {"tiny": MEDIUM}
    mixed = {"gguf": {**TINY, "hidden_size": 512, "num_hidden_layers": 8,
                      "intermediate_size": 1536, "num_attention_heads": 8,
                      "num_key_value_heads": 4},
             "types": {"self_attn": "Q4_K", "mlp.down_proj": "Q6_K", "mlp": "Q5_K",
                       "embed_tokens": "Q8_0"}}
    grid = [
        ("smollm2-gguf-sft", smol, {"seq": 256, "batch": 4}),
        ("smollm2-gguf-r16-seq512", smol, {"seq": 512, "batch": 4,
                                           "set": {"adapter.rank": 16}}),
        ("smollm2-gguf-ckpt-seq1024", smol, {"seq": 1024, "batch": 2,
                                             "set": {"train.grad_checkpoint": True}}),
        ("smollm2-gguf-chunked", smol, {"seq": 1024, "batch": 2,
                                        "set": {"train.loss_chunk": 1024}}),
        ("smollm2-gguf-dpo", smol, {"seq": 256, "batch": 2, "data": "pref",
                                    "set": {"objective.type": "dpo"}}),
        ("smollm2-gguf-qv-r64-accum2", smol, {"seq": 512, "batch": 4, "set": {
            "adapter.targets": ["q_proj", "v_proj"], "adapter.rank": 64,
            "train.grad_accumulation": 2}}),
        ("smollm2-gguf-microbatches", smol, {"seq": 512, "batch": 4, "set": {
            "train.max_batch_tokens": 1024}}),
        ("smollm2-dense-sft", dense, {"seq": 512, "batch": 2}),
        ("smollm2-affine4", dense, {"seq": 512, "batch": 2, "set": {
            "model.quantize": {"format": "affine", "bits": 4, "group_size": 64}}}),
        ("smollm2-nf4-ckpt", dense, {"seq": 256, "batch": 4, "set": {
            "model.quantize": {"format": "nf4"}, "train.grad_checkpoint": True}}),
        ("medium-packed", medium, {"seq": 1024, "batch": 2, "data": "short",
                                   "set": {"data.packing": True}}),
        ("medium-orpo-r32", medium, {"seq": 512, "batch": 2, "data": "pref",
                                     "set": {"objective.type": "orpo", "adapter.rank": 32}}),
        ("medium-bf16", medium, {"seq": 256, "batch": 2, "set": {"model.dtype": "bfloat16"}}),
        ("gguf-kquants-mixed", mixed, {"seq": 512, "batch": 4}),
        ("qwen2-dense", {"tiny": {**MEDIUM, "model_type": "qwen2", "hidden_size": 512,
                                  "num_attention_heads": 8, "num_key_value_heads": 2,
                                  "num_hidden_layers": 8}}, {"seq": 512, "batch": 4}),
    ]
    return [{"name": n, "part": "check", "model": m, **kw} for n, m, kw in grid]


def grid() -> list[dict]:
    return fit_grid() + check_grid()


# ---------------------------------------------------------------------------- models


def _key(spec) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def model_path(spec: dict) -> str:
    """A model for `spec`, built once into the cache folder."""
    sys.path.insert(0, str(ROOT / "tests"))
    if "packaged" in spec:
        return spec["packaged"]
    if "tiny" in spec:
        from tiny import make_model_dir

        args = dict(spec["tiny"])
        folder = CACHE / "models" / _key(spec)
        if not (folder / "config.json").exists():
            model_type = args.pop("model_type", "llama")
            make_model_dir(folder, model_type=model_type, **args)
        return str(folder)
    if "gguf" in spec:
        path = CACHE / "models" / f"{_key(spec)}.gguf"
        if not path.exists():
            from gguf import GGMLQuantizationType as T
            from tiny import build_model, byte_level_tokenizer, model_args
            from tiny_gguf import write_gguf

            args = model_args("llama", **{**spec["gguf"], "vocab_size": None})
            args["vocab_size"] = byte_level_tokenizer().get_vocab_size()
            path.parent.mkdir(parents=True, exist_ok=True)
            types = {k: getattr(T, v) for k, v in spec["types"].items()}
            write_gguf(path, build_model(args), args, byte_level_tokenizer(), types=types)
        return str(path)
    if "smollm2_dense" in spec:
        folder = CACHE / "models" / "smollm2-dense-f32"
        if not (folder / "config.json").exists():
            _dense_smollm2(folder)
        return str(folder)
    raise ValueError(f"unknown model spec {spec}")


def _dense_smollm2(folder: Path) -> None:
    """The packaged SmolLM2 dequantized to a float32 mlx-lm folder."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import save_config, save_model

    from mlxtune import models
    from mlxtune.export.mlx_fused import dense_weight
    from mlxtune.models.gguf import _build_model, load_gguf

    model, tokenizer, config = load_gguf(models.packaged_path("smollm2-135m-instruct"))
    config = {k: v for k, v in config.items() if k not in ("quantization",
                                                          "quantization_formats")}
    dense = _build_model(config)
    weights = {}
    for path, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weights[f"{path}.weight"] = dense_weight(m)
    for k, v in tree_flatten(model.parameters()):
        if k.endswith("norm.weight"):
            weights[k] = v.astype(mx.float32)
    dense.load_weights(list(weights.items()), strict=True)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder, dense)
    save_config(config, folder / "config.json")
    tokenizer._tokenizer.save_pretrained(str(folder))


# ---------------------------------------------------------------------------- data


def write_data(path: Path, kind: str, seq: int, n: int = 24, seed: int = 0) -> None:
    """Records long enough to fill `seq` tokens (every word is at least one token), or
    short ones ('short', about seq/6 words) for packing."""
    rng = random.Random(seed)

    def text(words):
        return " ".join(rng.choice(WORDS) for _ in range(words))

    rows = []
    for _ in range(n):
        if kind == "pref":
            rows.append({"prompt": "say " + text(3), "chosen": text(seq),
                         "rejected": text(seq)})
        else:
            words = max(8, seq // 6) if kind == "short" else seq
            rows.append({"messages": [{"role": "user", "content": "say " + text(3)},
                                      {"role": "assistant", "content": text(words)}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def config_for(spec: dict, work: Path) -> Path:
    """The YAML config of a grid entry (data written next to it)."""
    import yaml

    data = work / "train.jsonl"
    write_data(data, spec.get("data", "chat"), spec["seq"], n=max(24, 6 * spec["batch"]))
    raw = {"name": spec["name"], "model": {"path": model_path(spec["model"])},
           "adapter": {"rank": 8, "alpha": 16},
           "data": {"train": str(data), "max_seq_len": spec["seq"], "packing": False},
           # One stream (the default, and how a step runs on Metal / CUDA); several CPU
           # streams change the peak (docs/memory.md).
           "train": {"iters": spec.get("steps", 3), "batch_size": spec["batch"],
                     "eval_every": 0, "save_every": 0, "log_every": 1, "seed": 0,
                     "cpu_streams": 1},
           "eval": {"auto": False}}
    for key, value in spec.get("set", {}).items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


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
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{spec['name']}: worker failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_measurements() -> dict:
    if MEASUREMENTS.exists():
        return json.loads(MEASUREMENTS.read_text())
    return {}


def save_measurements(data: dict) -> None:
    MEASUREMENTS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def environment() -> dict:
    import platform

    import mlx.core as mx

    from mlxtune import backend

    return {"mlx": mx.__version__, "backend": backend.name(), "blas": backend.blas(),
            "machine": f"{platform.system()} {platform.machine()}"}


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


def fit(entries: list[dict], measured: dict) -> dict:
    """Least squares on relative error: for each fit configuration, measured - exact items
    = sum_k coefficient_k * feature_k, each row divided by the measured peak. The
    reference-pass and bfloat16-on-CPU factors are fitted afterwards, one at a time."""
    import numpy as np

    from mlxtune.memory import calibration
    from mlxtune.memory.estimate import estimate, features, fixed_bytes

    coef = dict(calibration.COEFFICIENTS, **FIXED)
    names = [k for k in features(workload_of(entries[0])) if k not in FIXED]
    rows, target, weight, used = [], [], [], []
    loads = {e["name"]: workload_of(e) for e in entries}
    for e in entries:
        w = loads[e["name"]]
        if w.backend == "cpu" and w.compute_bytes == 2:
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

    ratio_fit("cpu_half_bytes", lambda w: w.backend == "cpu" and w.compute_bytes == 2, 2.0, 8.0)
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


# ---------------------------------------------------------------------------- reporting


def describe(spec: dict) -> str:
    m = spec["model"]
    if "packaged" in m:
        model = "SmolLM2-135M GGUF (Q4_1 + Q8_0)"
    elif "smollm2_dense" in m:
        model = "SmolLM2-135M dense f32"
    elif "gguf" in m:
        model = "tiny GGUF " + "/".join(sorted(set(m["types"].values())))
    else:
        t = m["tiny"]
        model = (f"{t.get('model_type', 'llama')} d{t['hidden_size']} "
                 f"x{t['num_hidden_layers']} ffn{t['intermediate_size']} "
                 f"v{t['vocab_size'] // 1000 if t['vocab_size'] >= 1000 else t['vocab_size']}"
                 f"{'k' if t['vocab_size'] >= 1000 else ''}"
                 + (f" hd{t['head_dim']}" if "head_dim" in t else ""))
    s = spec.get("set", {})
    parts = [f"b{spec['batch']} x {spec['seq']}"]
    if "objective.type" in s:
        parts.append(s["objective.type"])
    q = s.get("model.quantize")
    if q:
        parts.append("nf4" if q["format"] == "nf4" else f"{q['format']} {q['bits']}-bit")
    for key, label in (("adapter.rank", "r{}"), ("train.grad_accumulation", "accum {}"),
                       ("train.loss_chunk", "loss chunk {}"),
                       ("model.dtype", "{}"), ("adapter.layers", "last {} layers")):
        if key in s:
            parts.append(label.format(s[key]))
    if "train.max_batch_tokens" in s:
        parts.append(f"micro-batches of {s['train.max_batch_tokens']} tokens")
    if s.get("train.grad_checkpoint"):
        parts.append("ckpt")
    if s.get("data.packing"):
        parts.append("packed")
    if "adapter.targets" in s:
        parts.append("+".join(t.replace("_proj", "") for t in s["adapter.targets"]))
    return f"{model}; {', '.join(parts)}"


def report(entries: list[dict], measured: dict, env: dict) -> tuple[str, dict]:
    from mlxtune.memory import calibration

    rows, errors = [], {"fit": [], "check": []}
    entries = sorted(entries, key=lambda e: e["part"] != "check")  # held-out rows first
    for e in entries:
        if e["name"] not in measured:
            continue
        p = predict(e)
        m = measured[e["name"]]["peak_gb"]
        err = p["peak_gb"] / m - 1
        errors[e["part"]].append((abs(err), e["name"]))
        top = sorted(p["items"].items(), key=lambda kv: -kv[1])[:3]
        rows.append(f"| {e['part']} | {e['name']} | {describe(e)} | {m:.3f} | "
                    f"{p['peak_gb']:.3f} | {err:+.1%} | "
                    + ", ".join(f"{k} {v:.2f}" for k, v in top) + " |")
    summary = {part: {"configs": len(v), "worst": max(v) if v else None,
                      "mean_abs": sum(x for x, _ in v) / len(v) if v else None}
               for part, v in errors.items()}
    head = ["| part | name | configuration | measured GB | predicted GB | error | largest "
            "items (GB) |", "|---|---|---|---|---|---|---|"]
    lines = [f"Measured with MLX {env['mlx']} on the {env['backend']} backend "
             f"({env['machine']}, {env['blas']}); predictions by mlxtune.memory with "
             f"the coefficients in mlxtune/memory/calibration.py "
             f"(fitted on {len(getattr(calibration, 'FITTED_ON', ()))} `fit` "
             "configurations).", ""]
    for part in ("check", "fit"):
        s = summary[part]
        if s["configs"]:
            lines.append(f"- `{part}`: {s['configs']} configurations, worst error "
                         f"{s['worst'][0]:.1%} ({s['worst'][1]}), mean |error| "
                         f"{s['mean_abs']:.1%}")
    lines += [""] + head + rows
    lines += ["", "The fitted counts (mlxtune/memory/calibration.py; each multiplies one "
              "array of its kind, `framework` is in MB):", "",
              "| " + " | ".join(calibration.COEFFICIENTS) + " |",
              "|" + "---|" * len(calibration.COEFFICIENTS),
              "| " + " | ".join(f"{v:g}" for v in calibration.COEFFICIENTS.values()) + " |"]
    return "\n".join(lines), summary


TABLE_START = "<!-- calibration table: scripts/calibrate_memory.py -->"
TABLE_END = "<!-- end of calibration table -->"


def write_doc(table: str) -> None:
    text = DOC.read_text() if DOC.exists() else f"# Memory planner\n\n{TABLE_START}\n{TABLE_END}\n"
    if TABLE_START not in text:
        text += f"\n{TABLE_START}\n{TABLE_END}\n"
    before, rest = text.split(TABLE_START, 1)
    _, after = rest.split(TABLE_END, 1)
    DOC.write_text(f"{before}{TABLE_START}\n{table}\n{TABLE_END}{after}")


# ---------------------------------------------------------------------------- claims


CLAIMS = [
    # (claim, hub id, base, batch, seq, checkpointing, full fine-tuning)
    ("<=8B LoRA / QLoRA on a 32 GB Mac", "meta-llama/Llama-3.1-8B-Instruct", "bf16", 1, 2048,
     False, False),
    ("", "meta-llama/Llama-3.1-8B-Instruct", "bf16", 1, 2048, True, False),
    ("", "meta-llama/Llama-3.1-8B-Instruct", "4-bit", 1, 2048, False, False),
    ("", "meta-llama/Llama-3.1-8B-Instruct", "4-bit", 1, 2048, True, False),
    ("13-34B QLoRA on 64-128 GB", "Qwen/Qwen2.5-14B-Instruct", "4-bit", 1, 2048, True, False),
    ("", "Qwen/Qwen2.5-32B-Instruct", "4-bit", 1, 2048, False, False),
    ("", "Qwen/Qwen2.5-32B-Instruct", "4-bit", 1, 2048, True, False),
    ("70B QLoRA on 128 GB, tight", "meta-llama/Llama-3.3-70B-Instruct", "4-bit", 1, 2048,
     False, False),
    ("", "meta-llama/Llama-3.3-70B-Instruct", "4-bit", 1, 2048, True, False),
    ("", "meta-llama/Llama-3.3-70B-Instruct", "4-bit", 4, 2048, True, False),
    ("7B full fine-tuning 60+ GB", "mistralai/Mistral-7B-Instruct-v0.3", "bf16", 1, 512, False,
     True),
    ("7B LoRA r16 ~16 GB", "mistralai/Mistral-7B-Instruct-v0.3", "bf16", 1, 512, False, False),
    ("", "mistralai/Mistral-7B-Instruct-v0.3", "bf16", 1, 512, True, False),
    ("", "mistralai/Mistral-7B-Instruct-v0.3", "bf16", 1, 2048, True, False),
    ("7B QLoRA ~6 GB", "mistralai/Mistral-7B-Instruct-v0.3", "4-bit", 1, 512, False, False),
    ("", "mistralai/Mistral-7B-Instruct-v0.3", "4-bit", 1, 512, True, False),
    ("", "mistralai/Mistral-7B-Instruct-v0.3", "4-bit", 1, 2048, True, False),
]


def claims_table() -> str:
    """The seeds' claims beside the planner's numbers (a Mac: bfloat16, LoRA rank 16 on
    every linear layer, MLX's materialised attention), as a markdown table."""
    from mlxtune import config
    from mlxtune.memory import shapes, tiers
    from mlxtune.memory.estimate import estimate, workload

    lines = ["| claim | model | base | batch x seq | checkpointing | planned peak (GB) | "
             "items over 1 GB | 32 | 64 | 128 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for claim, model, base, batch, seq, ckpt, full in CLAIMS:
        raw = {"name": "claim", "model": {"path": model}, "adapter": {"rank": 16, "alpha": 32},
               "data": {"train": "x.jsonl", "max_seq_len": seq},
               "train": {"batch_size": batch, "grad_checkpoint": ckpt}}
        if base == "4-bit":
            raw["model"]["quantize"] = {"format": "affine", "bits": 4, "group_size": 64}
        cfg = config.from_dict(raw)
        b = estimate(workload(cfg, shapes.resolve(cfg.model), "metal", full_finetune=full))
        verdicts = [tiers.verdict(b.peak, m.usable_bytes) for m in tiers.tiers()]
        big = ", ".join(f"{k} {v:.1f}" for k, v in sorted(b.gb().items(), key=lambda kv: -kv[1])
                        if v >= 1.0)
        method = "full" if full else base
        lines.append(f"| {claim} | {model.split('/')[1]} | {method} | {batch} x {seq} | "
                     f"{'on' if ckpt else 'off'} | {b.peak / 1e9:.1f} | {big} | "
                     + " | ".join(verdicts) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("fit", "check", "all"), default="all")
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
            measured[e["name"]] = {**got, "config": describe(e), "part": e["part"]}
            stored["environment"] = env
            save_measurements(stored)
            p = predict(e)
            print(f"{e['name']:32s} measured {got['peak_gb']:.3f} GB  predicted "
                  f"{p['peak_gb']:.3f} GB  ({p['peak_gb'] / got['peak_gb'] - 1:+.1%})  "
                  f"{got['seconds']} s", flush=True)
    if args.fit:
        fit_entries = [e for e in grid() if e["part"] == "fit" and e["name"] in measured]
        result = fit(fit_entries, measured)
        write_coefficients(result, stored.get("environment", env))
        print(json.dumps(result["coefficients"], indent=1))
        return
    table, summary = report([e for e in grid() if e["name"] in measured], measured,
                            stored.get("environment", env))
    write_doc(table)
    print(table)


if __name__ == "__main__":
    main()
