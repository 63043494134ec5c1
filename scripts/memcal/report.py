"""The table of docs/memory.md (measured beside predicted peaks) and the README's table of
the seeds' claims, for scripts/calibrate_memory.py --report and --claims."""

from __future__ import annotations

from memcal import DOC
from memcal.fitting import predict


# ---------------------------------------------------------------------------- reporting


def describe(spec: dict) -> str:
    m = spec["model"]
    if "label" in m:
        model = m["label"]
    elif "packaged" in m:
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
    if "adapter.type" in s:
        parts.append({"dora": "DoRA", "full": "full fine-tuning"}.get(s["adapter.type"],
                                                                       s["adapter.type"]))
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
    if "path" in spec:
        parts.append({"cpu": "CPU kernels", "mlx": "MLX's ops",
                      "gpu": "GPU profile, planned as a Mac"}[spec["path"]])
    return f"{model}; {', '.join(parts)}"


# Held out first: whole real-size models, the tiny grid's checks, tiny models on the CPU
# kernels; then the fits.
PARTS = ("real", "check", "tiny-cpu", "fit-real", "fit")


def report(entries: list[dict], measured: dict, env: dict) -> tuple[str, dict]:
    from mlxtune.memory import calibration

    rows, errors = [], {part: [] for part in PARTS}
    entries = sorted(entries, key=lambda e: PARTS.index(e["part"]))  # held-out rows first
    for e in entries:
        if e["name"] not in measured:
            continue
        p = predict(e)
        m = measured[e["name"]]["peak_gb"]
        err = p["peak_gb"] / m - 1
        errors[e["part"]].append((abs(err), e["name"], err))
        top = sorted(p["items"].items(), key=lambda kv: -kv[1])[:3]
        rows.append(f"| {e['part']} | {e['name']} | {describe(e)} | {m:.3f} | "
                    f"{p['peak_gb']:.3f} | {err:+.1%} | "
                    + ", ".join(f"{k} {v:.2f}" for k, v in top) + " |")
    summary = {part: {"configs": len(v), "worst": max(v)[:2] if v else None,
                      "under": min((x[2], x[1]) for x in v) if v else None,
                      "mean_abs": sum(x[0] for x in v) / len(v) if v else None}
               for part, v in errors.items()}
    head = ["| part | name | configuration | measured GB | predicted GB | error | largest "
            "items (GB) |", "|---|---|---|---|---|---|---|"]
    lines = [f"Measured with MLX {env['mlx']} on the {env['backend']} backend "
             f"({env['machine']}, {env['blas']}); predictions by mlxtune.memory with "
             f"the coefficients in mlxtune/memory/calibration.py (MLX's ops: fitted on "
             f"{len(getattr(calibration, 'FITTED_ON', ()))} `fit` configurations; CPU "
             f"kernels: refitted on {len(getattr(calibration, 'FITTED_ON_CPU', ()))} "
             "`fit-real` ones).", ""]
    for part in PARTS:
        s = summary[part]
        if s["configs"]:
            under = (f"largest under-prediction {-s['under'][0]:.1%} ({s['under'][1]})"
                     if s["under"][0] < 0 else "no under-prediction")
            lines.append(f"- `{part}`: {s['configs']} configurations, worst error "
                         f"{s['worst'][0]:.1%} ({s['worst'][1]}), {under}, mean |error| "
                         f"{s['mean_abs']:.1%}")
    lines += [""] + head + rows
    keys = list(calibration.COEFFICIENTS)
    lines += ["", "The fitted counts (mlxtune/memory/calibration.py; each multiplies one "
              "array of its kind, `framework` is in MB), and the guard's margins "
              f"(GUARD_MARGIN: MLX's ops {calibration.GUARD_MARGIN['mlx']:.0%}, CPU "
              f"kernels {calibration.GUARD_MARGIN['cpu']:.0%}):", "",
              "| kernels | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for label, counts in (("MLX's ops", calibration.COEFFICIENTS),
                          ("CPU kernels", calibration.COEFFICIENTS_CPU)):
        lines.append(f"| {label} | " + " | ".join(f"{counts.get(k, 0):g}" for k in keys) + " |")
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
