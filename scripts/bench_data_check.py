#!/usr/bin/env python
"""Time `mlxtune data` on a large chat set: each stage, the whole check and the peak
memory (ru_maxrss of this process: Python, MLX and the tokenizer included).

    .venv/bin/python scripts/bench_data_check.py [--n 50000] [--model smollm2-135m-instruct]
        [--data FILE.jsonl] [--datasketch]

Without --data it writes --n conversations with scripts/make_chat_bench_data.py (a few
tens to about a thousand tokens, log-uniform; some multi-turn, some with a system prompt)
to a temporary folder and checks them as one file split 90/5/5. --datasketch also times
datasketch's MinHash + MinHashLSH (pip install datasketch) on the same normalised texts
and threshold, for the comparison in docs/design.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", type=Path, help="a JSONL file to check instead")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--datasketch", action="store_true")
    args = p.parse_args()

    import mlxtune  # noqa: F401
    from mlxtune import config
    from mlxtune.datacheck import check, minhash, text
    from mlxtune.datacheck.overlap import load

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    data = args.data
    if data is None:
        from make_chat_bench_data import make

        data = work / "chat.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make(args.n, 0)))
    cfg_path = work / "bench.yaml"
    cfg_path.write_text(json.dumps({
        "name": "bench", "model": {"path": args.model},
        "data": {"path": str(data.resolve()), "split": {"valid": 0.05, "test": 0.05},
                 "max_seq_len": args.max_seq_len}}))
    cfg = config.load(cfg_path)
    marks: list[tuple[str, float]] = []  # check() says what it starts, and when
    t0 = time.perf_counter()
    report = check(cfg, progress=lambda m: marks.append((m, time.perf_counter()))).data
    total = time.perf_counter() - t0
    marks.append(("end", time.perf_counter()))
    timings = {m: round(marks[i + 1][1] - t, 2) for i, (m, t) in enumerate(marks[:-1])}
    result = {"examples": sum(s["examples"] for s in report["splits"].values()),
              "tokens": sum(s.get("tokens", 0) for s in report["splits"].values()),
              "seconds": round(total, 1), "peak_gb": round(peak_gb(), 2),
              "stages": timings,
              "duplicates": {k: report["duplicates"][k] for k in ("exact", "near")},
              "leakage": {k: report["leakage"][k] for k in ("valid", "test")},
              "truncated_train": report["splits"]["train"].get("truncated")}
    if args.datasketch:
        result["datasketch"] = time_datasketch(cfg, load, text, minhash)
    print(json.dumps(result, indent=2))


def time_datasketch(cfg, load, text, minhash) -> dict:
    """datasketch's MinHash (128 permutations) + MinHashLSH at the same threshold over the
    same normalised words, against this module's near_pairs on them."""
    from datasketch import MinHash, MinHashLSH

    loaded = load(cfg)
    records = [loaded.splits[s][i].data for s, i in loaded.order]
    t = time.perf_counter()
    words = [" ".join(text.normalise(m.get("content") or "") for m in r["messages"]
                      if m.get("role") != "system").split() for r in records]
    normalise_s = time.perf_counter() - t
    t = time.perf_counter()
    shingles = [[" ".join(w[i:i + 3]).encode() for i in range(max(len(w) - 2, 1))]
                for w in words]
    hashes = MinHash.bulk(shingles, num_perm=minhash.NUM_PERM)
    lsh = MinHashLSH(threshold=cfg.data.dedup.threshold if cfg.data.dedup else 0.8,
                     num_perm=minhash.NUM_PERM)
    for i, h in enumerate(hashes):
        lsh.insert(i, h)
    candidates = sum(len(lsh.query(h)) - 1 for h in hashes)
    datasketch_s = time.perf_counter() - t
    t = time.perf_counter()
    ix = loaded.index
    ours = minhash.near_pairs(ix.near_words, ix.near_offsets, 0.8, 3)
    ours_s = time.perf_counter() - t
    return {"python_normalise_s": round(normalise_s, 1),
            "datasketch_minhash_lsh_s": round(datasketch_s, 1),
            "datasketch_candidates": candidates // 2,
            "mlxtune_near_pairs_s": round(ours_s, 1), "mlxtune_pairs": len(ours)}


if __name__ == "__main__":
    main()
