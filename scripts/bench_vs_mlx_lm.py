#!/usr/bin/env python
"""mlx-lm's LoRA trainer and mlxtune on the same model, data, dtype, sequence length,
batch and LoRA settings, one after the other, each in its own process.

Setting (issue 9): SmolLM2-135M-Instruct as a dense float32 mlx-lm folder (the packaged
GGUF dequantized), a variable-length chat set from scripts/make_chat_bench_data.py
(tens to ~1,000 tokens), max sequence length 1024, batch 4, LoRA rank 16 with scale 2.0
(alpha 32) on every linear layer of every block, dropout 0, learning rate 1e-4, Adam(W)
without weight decay, loss on the assistant's tokens only (mlx-lm's --mask-prompt).
Both processes use the system OpenBLAS (mlx-lm's is loaded the way mlxtune loads its own,
so the comparison is between trainers, not BLAS builds; --mlx-lm-bundled-blas skips that).

Reported per tool: loss-bearing tokens/s (after the first step), peak memory
(mx.get_peak_memory over the run), held-out loss of the final adapter (mlxtune's own
validation code on the same held-out set, for both adapters) and the tokens trained to get
there, and MFU: model FLOPs per second over this machine's measured float32 matmul FLOP/s.
Model FLOPs of a LoRA step are forward + the backward pass for the activations (2x the
forward FLOPs of the frozen base: no weight gradients) plus the adapters' own forward and
backward, averaged over the data set per step (the same steps for both tools).

The tools differ in where the loss goes on multi-turn chats: mlx-lm's --mask-prompt puts
it on the last assistant message only, mlxtune on every assistant turn, so mlxtune trains
on more loss-bearing tokens from the same examples; steps/s compares the same work.

The same loss tokens: the variant `last:data.mask_history=true` puts mlxtune's loss on the
last assistant message as mlx-lm does. --seeds N runs every tool with seeds 0..N-1 (the
initial adapter and the batch order) and reports the spread of the held-out losses, so a
difference between tools can be told from seed noise.

    .venv/bin/python scripts/bench_vs_mlx_lm.py --steps 8 --variant default \
        --variant mbt2048:train.max_batch_tokens=2048 --out docs/bench_vs_mlx_lm.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

SEQ, BATCH, RANK, SCALE, LR = 1024, 4, 16, 2.0, 1e-4
TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

_MLX_LM_DRIVER = """
import json, sys
if sys.argv[1] == "system-blas":
    import mlxtune  # loads the system OpenBLAS before mlx.core, as mlxtune does for itself
import mlx_lm.lora as lora
from mlx_lm.tuner.callbacks import TrainingCallback

class Report(TrainingCallback):
    def on_train_loss_report(self, info):
        print("BENCH " + json.dumps(info), flush=True)

lora.get_reporting_callbacks = lambda *args, **kwargs: Report()
sys.argv = ["mlx_lm.lora", *sys.argv[2:]]
lora.main()
"""


def write_data(work: Path, n: int) -> Path:
    from make_chat_bench_data import make

    rows = make(n, seed=0)
    folder = work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    n_valid = max(16, n // 15)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n_valid:]))
    (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_valid]))
    return folder


def run_mlx_lm(model: Path, data: Path, steps: int, work: Path, system_blas: bool,
               seed: int) -> dict:
    adapters = work / f"mlx-lm-adapters-seed{seed}"
    config = work / f"mlx-lm-seed{seed}.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model), "train": True, "data": str(data), "fine_tune_type": "lora",
        "num_layers": -1, "batch_size": BATCH, "iters": steps, "learning_rate": LR,
        "max_seq_length": SEQ, "mask_prompt": True, "seed": seed, "optimizer": "adam",
        "lora_parameters": {"rank": RANK, "scale": SCALE, "dropout": 0.0, "keys": TARGETS},
        "steps_per_report": 1, "steps_per_eval": 100 * steps, "val_batches": 1,
        "save_every": 100 * steps, "adapter_path": str(adapters)}))
    cmd = [str(ROOT / ".venv/bin/python"), "-c", _MLX_LM_DRIVER,
           "system-blas" if system_blas else "bundled-blas", "--config", str(config)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    reports = [json.loads(line[6:]) for line in proc.stdout.splitlines()
               if line.startswith("BENCH ")]
    if proc.returncode != 0 or len(reports) < 2:
        raise SystemExit(f"mlx-lm failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    later = reports[1:]
    seconds = sum(1 / r["iterations_per_second"] for r in later)
    tokens = reports[-1]["trained_tokens"] - reports[0]["trained_tokens"]
    return {"tool": "mlx-lm", "seed": seed, "loss_tokens_per_sec": tokens / seconds,
            "sec_per_step": seconds / len(later),
            "peak_memory_gb": max(r["peak_memory"] for r in reports),
            "tokens_trained": reports[-1]["trained_tokens"],
            "last_train_loss": reports[-1]["train_loss"],
            "adapter": str(adapters), "wall_sec": time.perf_counter() - start}


def run_mlxtune(model: Path, data: Path, steps: int, work: Path, overrides: list[str],
                name: str, seed: int) -> dict:
    run_dir = work / f"mlxtune-{name}-seed{seed}"
    config = work / f"mlxtune-{name}-seed{seed}.yaml"
    config.write_text(yaml.safe_dump({
        "name": "bench", "model": {"path": str(model)},
        "adapter": {"rank": RANK, "alpha": RANK * SCALE,
                    "targets": [t.split(".")[-1] for t in TARGETS]},
        "data": {"train": str(data / "train.jsonl"), "valid": str(data / "valid.jsonl"),
                 "max_seq_len": SEQ, "mask_prompt": True},
        "train": {"iters": steps, "batch_size": BATCH, "learning_rate": LR,
                  "optimizer": "adam", "max_grad_norm": None, "eval_every": 0,
                  "save_every": 0, "log_every": 1, "seed": seed},
    }))
    sets = [a for o in overrides for a in ("--set", o)]
    start = time.perf_counter()
    subprocess.run([str(ROOT / ".venv/bin/mlxtune"), "run", str(config), "--run-dir",
                    str(run_dir), "--quiet", *sets], check=True, stdout=subprocess.DEVNULL)
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    first, last = train[0], train[-1]
    start_event = next(e for e in events if e["event"] == "start")
    return {"tool": f"mlxtune {name}", "seed": seed, "overrides": overrides,
            "packing": start_event.get("packing"), "batches": start_event.get("batches"),
            "loss_tokens_per_sec": (last["tokens"] - first["tokens"]) / (last["time"] - first["time"]),
            "sec_per_step": (last["time"] - first["time"]) / (last["step"] - first["step"]),
            "peak_memory_gb": max(e["peak_memory_gb"] for e in train),
            "tokens_trained": last["tokens"], "last_train_loss": last["loss"],
            "adapter": str(run_dir / "adapters"), "wall_sec": time.perf_counter() - start}


def held_out_loss(model_dir: Path, data: Path, adapter: Path | None) -> tuple[float, float]:
    """Mean loss per loss-bearing token of the valid set with the adapter (None: the base),
    by mlxtune's own validation code (the same for both tools' adapters): over every
    assistant turn (mlxtune's mask), and over the last assistant message only (mlx-lm's)."""
    code = f"""
import json, sys
import mlxtune
from mlxtune import adapters, config, data as D, models, objectives
from mlxtune.run import _pad_id
from mlxtune.train.loop import PAD_MULTIPLE
cfg = config.from_dict({{"model": {{"path": "{model_dir}"}},
                         "data": {{"train": "{data}/valid.jsonl", "max_seq_len": {SEQ},
                                   "mask_prompt": True}}}})
loaded = models.load(cfg.model)
if "{adapter}" != "None":
    adapters.load(loaded.model, __import__("pathlib").Path("{adapter}"))
records, fmt = D.read_records("{data}/valid.jsonl")
out = []
for last_only in (False, True):
    examples = D.encode(records, loaded.tokenizer, {SEQ}, True, fmt, last_only).examples
    total, ntok = 0.0, 0
    for idx in D.batch_order([len(e.tokens) for e in examples], 4, 0, 0):
        t, m = D.collate([examples[i] for i in idx], _pad_id(loaded.tokenizer), PAD_MULTIPLE)
        s, n = objectives.sft(loaded.model, t, m)
        total += s.item(); ntok += int(n.item())
    out.append(total / ntok)
print(json.dumps(out))
"""
    out = subprocess.run([str(ROOT / ".venv/bin/python"), "-c", code], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout
    every, last = json.loads(out.strip().splitlines()[-1])
    return every, last


def flops_per_example(model_dir: Path, data: Path) -> tuple[float, float, float]:
    """Model FLOPs of a LoRA training step per example, averaged over the train set. Both
    tools step through the same examples (an epoch, BATCH a step), so FLOPs per step are
    BATCH times this for both, whichever tokens each one puts the loss on. The output head
    is counted at every position, as a plain forward pass computes it.

    Also returned: the mean positions per example and the head's FLOPs per position
    (forward and backward), for the stricter count that charges the head only at the
    positions that bear loss (mlxtune's native loss skips the others)."""
    import mlxtune  # noqa: F401
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlxtune import data as D

    config = json.loads((model_dir / "config.json").read_text())
    d, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or d // heads
    inter = config["intermediate_size"]
    shapes = [(d, heads * hd), (d, kv * hd), (d, kv * hd), (heads * hd, d),
              (d, inter), (d, inter), (inter, d)]
    block = sum(i * o for i, o in shapes)
    lora = RANK * sum(i + o for i, o in shapes)
    per_token_fwd = 2 * (layers * (block + lora) + vocab * d)
    tokenizer = load_tokenizer(model_dir)
    records, fmt = D.read_records(data / "train.jsonl")
    enc = D.encode(records, tokenizer, SEQ, True, fmt)
    total, positions = 0.0, 0
    for e in enc.examples:
        n = len(e.tokens)
        positions += n
        attention_fwd = layers * 4 * heads * hd * n * (n + 1) / 2
        fwd = n * per_token_fwd + attention_fwd
        # backward: activations of the frozen base (= forward), LoRA weight grads (2x its fwd)
        total += 2 * fwd + n * layers * 2 * 2 * lora
    count = len(enc.examples)
    return total / count, positions / count, 2 * 2 * vocab * d


_MATMUL = """
import time
import mlxtune  # the system OpenBLAS, loaded before mlx.core as in the training processes
import mlx.core as mx
best = 0.0
for m, k, n in [(4096, 576, 1536), (4096, 1536, 576), (2048, 2048, 2048)]:
    a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
    mx.eval(a @ b)
    reps, start = 5, time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    best = max(best, 2 * m * k * n * reps / (time.perf_counter() - start))
print(best)
"""


def matmul_flops() -> float:
    """This machine's float32 matmul FLOP/s through MLX and the BLAS both trainers use
    (best of a few training shapes), in a fresh process: this one has imported mlx.core
    already, bound to whatever BLAS came first."""
    out = subprocess.run([str(ROOT / ".venv/bin/python"), "-c", _MATMUL], check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    global SEQ
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=SEQ,
                   help="max sequence length of both trainers (the issue's setting: 1024)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="run every tool with seeds 0..N-1 and report the held-out losses' "
                        "spread")
    p.add_argument("--first-seed", type=int, default=0, metavar="K",
                   help="with --seeds N: seeds K..K+N-1")
    p.add_argument("--examples", type=int, default=600)
    p.add_argument("--variant", dest="variants", action="append", default=[],
                   metavar="NAME[:KEY=VALUE,...]",
                   help="an mlxtune run with these config overrides (repeatable), e.g. "
                        "'mbt2048:train.max_batch_tokens=2048'; default: one run, 'default'")
    p.add_argument("--mlx-lm-bundled-blas", action="store_true")
    p.add_argument("--skip-mlx-lm", action="store_true")
    p.add_argument("--skip-mlxtune", action="store_true", help="mlx-lm's run alone")
    p.add_argument("--out", type=Path)
    p.add_argument("--keep", type=Path, metavar="DIR",
                   help="work in DIR and keep it (data, adapters, run directories)")
    args = p.parse_args()
    SEQ = args.seq_len

    from bench_step import save_base_folders

    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(str(args.keep)) if args.keep else
          tempfile.TemporaryDirectory(prefix="mlxtune-vs-mlx-lm-")) as tmp:
        work = Path(tmp)
        _, dense = save_base_folders(work)
        data = write_data(work, args.examples)
        peak_flops = matmul_flops()
        per_example, positions, head_flops = flops_per_example(dense, data)
        rows = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            if not args.skip_mlx_lm:
                rows.append(run_mlx_lm(dense, data, args.steps, work,
                                       not args.mlx_lm_bundled_blas, seed))
            for variant in [] if args.skip_mlxtune else args.variants or ["default"]:
                name, _, sets = variant.partition(":")
                rows.append(run_mlxtune(dense, data, args.steps, work,
                                        [x for x in sets.split(",") if x], name, seed))
        base_loss = held_out_loss(dense, data, None)
        for r in rows:
            adapter = Path(r.pop("adapter"))
            r["held_out_loss"], r["held_out_loss_last_turn"] = held_out_loss(dense, data,
                                                                              adapter)
            r["mfu"] = BATCH * per_example / r["sec_per_step"] / peak_flops
            # The head charged at this run's loss-bearing positions only.
            unused = BATCH * positions - r["tokens_trained"] / args.steps
            r["mfu_head_at_loss_positions"] = ((BATCH * per_example - unused * head_flops)
                                               / r["sec_per_step"] / peak_flops)

    print(f"matmul peak {peak_flops / 1e9:.1f} GFLOP/s; {BATCH * per_example / 1e9:.0f} "
          "model GFLOP per step (mean)")
    print(f"held-out loss of the base: {base_loss[0]:.4f} (every assistant turn), "
          f"{base_loss[1]:.4f} (last assistant message)")
    print(f"{'tool':<20} {'seed':>4} {'tok/s':>7} {'s/step':>7} {'peak GB':>8} {'tokens':>7} "
          f"{'held-out':>9} {'(last)':>7} {'MFU':>6} {'MFU*':>6}")
    for r in rows:
        print(f"{r['tool']:<20} {r['seed']:>4} {r['loss_tokens_per_sec']:>7.1f} "
              f"{r['sec_per_step']:>7.1f} {r['peak_memory_gb']:>8.2f} {r['tokens_trained']:>7} "
              f"{r['held_out_loss']:>9.4f} {r['held_out_loss_last_turn']:>7.4f} {r['mfu']:>6.1%} "
              f"{r['mfu_head_at_loss_positions']:>6.1%}")
    print("MFU*: the output head's FLOPs counted at the loss-bearing positions only")
    summary = summarize(rows)
    if args.seeds > 1:
        print("held-out loss over seeds, mean (sd) [min, max]: every assistant turn | last")
        for tool, s in summary.items():
            e, l = s["held_out_loss"], s["held_out_loss_last_turn"]
            print(f"{tool:<20} {e['mean']:.4f} ({e['sd']:.4f}) [{e['min']:.4f}, {e['max']:.4f}]"
                  f" | {l['mean']:.4f} ({l['sd']:.4f}) [{l['min']:.4f}, {l['max']:.4f}]")
    if not args.skip_mlx_lm:
        a = next(r for r in rows if r["tool"] == "mlx-lm")
        for b in rows:
            if b["tool"] == "mlx-lm" or b["seed"] != a["seed"]:
                continue
            print(f"{b['tool']} / mlx-lm: "
                  f"{b['loss_tokens_per_sec'] / a['loss_tokens_per_sec']:.2f}x tokens/s, "
                  f"{a['sec_per_step'] / b['sec_per_step']:.2f}x steps/s, "
                  f"{b['peak_memory_gb'] / a['peak_memory_gb']:.2f}x peak memory")
    if args.out:
        args.out.write_text(json.dumps({"seq_len": SEQ, "matmul_flops": peak_flops,
                                        "base_held_out_loss": base_loss,
                                        "flops_per_step": BATCH * per_example, "rows": rows,
                                        "over_seeds": summary}, indent=2))


def summarize(rows: list[dict]) -> dict:
    """Per tool: mean, sd, min and max of the held-out losses over its seeds."""
    out = {}
    for tool in dict.fromkeys(r["tool"] for r in rows):
        mine = [r for r in rows if r["tool"] == tool]
        out[tool] = {}
        for key in ("held_out_loss", "held_out_loss_last_turn"):
            v = [r[key] for r in mine]
            out[tool][key] = {"mean": statistics.fmean(v),
                              "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
                              "min": min(v), "max": max(v), "n": len(v)}
    return out


if __name__ == "__main__":
    main()
