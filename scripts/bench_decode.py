"""Decoding speed: mlxtune's batched decoder against llama.cpp on the same model, prompts
and machine.

The prompts are the first N requests of the quickstart's test split (configs/quickstart.yaml,
the chat template applied as `mlxtune eval` applies it), decoded greedily for at most
eval's max_new_tokens (twice the longest reference plus 16) or until the end-of-turn token:

- mlxtune: the packaged GGUF loaded as `mlxtune eval` loads it (on the CPU profile the
  quantized layers densified, `eval.dense_base: auto`), through mlxtune.decode at each
  batch size given, without and with a LoRA adapter (--adapter; the quickstart run's by
  default when it exists);
- llama.cpp: llama-cpp-python on the same GGUF file, n_threads = the cores this process
  may use, greedy (temperature 0, top_k 1, no repeat penalty), the same prompt token ids,
  one request at a time as its `Llama.generate` serves them.

tokens/s = generated tokens (stop tokens included) / wall seconds, prefill included, for
the whole set of prompts. Every configuration runs once per repeat, in an order rotated
between repeats, so that load from other jobs on a shared machine falls on all of them
alike; the median over repeats is reported, with the spread.

    .venv/bin/python scripts/bench_decode.py --prompts 16 --batch 1 --batch 16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlxtune  # noqa: E402,F401  (OpenBLAS before mlx.core, as the CLI loads it)
import mlx.core as mx  # noqa: E402

from mlxtune import adapters, backend, config, decode, models  # noqa: E402
from mlxtune.evaluate import generate, held_out, prepare_task, stop_ids  # noqa: E402


def load_prompts(cfg, tok, n: int) -> tuple[list[list[int]], int]:
    records, fmt = held_out(cfg, "test")
    task = prepare_task(cfg, records, fmt, tok)
    return task.prompts[:n], task.max_new


def mlxtune_run(model, prompts, stops, max_new, batch, adapter_on) -> tuple[int, float, list]:
    adapters.set_enabled(model, adapter_on)
    rows, seconds = decode.generate(model, prompts, stops, max_new, batch)
    return sum(r.steps for r in rows), seconds, [r.tokens for r in rows]


def llama_run(llm, prompts, stops, max_new) -> tuple[int, float, list]:
    steps, outs = 0, []
    start = time.perf_counter()
    for p in prompts:
        out = []
        for t in llm.generate(p, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                              repeat_penalty=1.0, reset=True):
            steps += 1
            if t in stops:
                break
            out.append(t)
            if len(out) >= max_new:
                break
        outs.append(out)
    return steps, time.perf_counter() - start, outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/quickstart.yaml"))
    ap.add_argument("--prompts", type=int, default=16, help="first N test requests")
    ap.add_argument("--batch", type=int, action="append",
                    help="mlxtune batch sizes (repeatable; default: 16)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--adapter", default=str(ROOT / "runs/qs22/adapters"),
                    help="LoRA adapter for the tuned rows ('' for none)")
    ap.add_argument("--max-new", type=int, default=None, help="default: eval's")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--llama-threads", type=int, action="append",
                    help="llama.cpp thread counts (repeatable; default: the cores)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    batches = args.batch or [16]
    cores = len(os.sched_getaffinity(0))

    cfg = config.load(args.config)
    loaded = models.load(cfg.model)
    model, tok = loaded.model, loaded.tokenizer
    dtype = backend.compute_dtype(cfg.model.dtype)
    dense = generate.should_densify(model, cfg.eval.dense_base, dtype)
    if dense:
        generate.densify(model, dtype)
    adapter = Path(args.adapter) if args.adapter else None
    if adapter is not None and not (adapter / adapters.ADAPTER_FILE).is_file():
        print(f"no adapter at {adapter}: base rows only")
        adapter = None
    if adapter is not None:
        adapters.load(model, adapter)
    model.eval()
    prompts, max_new = load_prompts(cfg, tok, args.prompts)
    max_new = args.max_new or max_new
    stops = stop_ids(tok)
    gguf = models.packaged_path(cfg.model.path) if not Path(cfg.model.path).exists() \
        else Path(cfg.model.path)
    print(f"model {gguf.name}; profile {backend.profile()}, {dtype}, dense base {dense}; "
          f"{len(prompts)} prompts ({sum(map(len, prompts)) / len(prompts):.0f} tokens on "
          f"average), max_new_tokens {max_new}; {cores} cores; mlx {mx.__version__}")

    runs, llms = {}, []
    for b in batches:
        runs[f"mlxtune base, batch {b}"] = lambda b=b: mlxtune_run(
            model, prompts, stops, max_new, b, False)
        if adapter is not None:
            runs[f"mlxtune + LoRA, batch {b}"] = lambda b=b: mlxtune_run(
                model, prompts, stops, max_new, b, True)
    if not args.skip_llama:
        import llama_cpp
        from llama_cpp import Llama

        for threads in args.llama_threads or [cores]:
            llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads,
                        n_ctx=max(map(len, prompts)) + max_new + 8, n_batch=512,
                        verbose=False)
            llms.append(llm)
            runs[f"llama.cpp {llama_cpp.__version__}, {threads} threads, one request at a "
                 f"time"] = lambda llm=llm: llama_run(llm, prompts, stops, max_new)

    # warm-up: one prompt through every path (first calls build kernels, caches)
    for llm in llms:
        llama_run(llm, prompts[:1], stops, 4)
    for on in (False, True) if adapter is not None else (False,):
        adapters.set_enabled(model, on)
        decode.generate(model, prompts[:1], stops, 4)

    names = list(runs)
    rates: dict[str, list[float]] = {n: [] for n in names}
    tokens: dict[str, list] = {}
    for rep in range(args.repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            steps, seconds, outs = runs[name]()
            rates[name].append(steps / seconds)
            tokens[name] = outs
            print(f"  repeat {rep + 1}: {name}: {steps} tokens in {seconds:.1f} s, "
                  f"{steps / seconds:.1f} tokens/s", flush=True)

    print(f"\n{'configuration':<62} {'median tokens/s':>16}  (min-max)")
    for name in names:
        r = rates[name]
        print(f"{name:<62} {statistics.median(r):>16.1f}  ({min(r):.1f}-{max(r):.1f})")
    llama_name = next((n for n in names if n.startswith("llama")), None)
    if llama_name:
        for name in names:
            if name.startswith("mlxtune base"):
                same = sum(a == b for a, b in zip(tokens[name], tokens[llama_name]))
                print(f"greedy answers equal to llama.cpp's, {name}: {same}/{len(prompts)}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"prompts": len(prompts), "max_new_tokens": max_new, "cores": cores,
             "profile": backend.profile(), "rates": rates}, indent=1))
    for llm in llms:
        llm.close()  # before interpreter shutdown, where llama-cpp-python's finaliser fails
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
