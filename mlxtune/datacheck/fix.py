"""`mlxtune data --fix OUT_DIR`: a cleaned copy of the data and a config that trains on it.

The copy is the split the check saw, written as JSONL files (train.jsonl, valid.jsonl,
test.jsonl) with the records as read (columns renamed, empty answers left out), minus:
train records that copy a held-out example (exactly or near, as the leakage check finds
them) and train records that exactly copy an earlier train record. Conflicts are not
resolved (which answer is right is the user's call); near duplicates within train are
kept. OUT_DIR/config.yaml is the resolved config with data.train / valid / test pointing
at the copy. The user's files are never written: OUT_DIR must be new or empty, and
everything is written to a temporary folder beside it and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from mlxtune.data.splits import SPLITS
from mlxtune.errors import ConfigError


def fix(report, cfg, out_dir) -> dict:
    """Write the cleaned copy (see the module's docstring); returns what was dropped."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"--fix: {out_dir} already exists and is not an empty folder; "
                          "name a new one (the user's files are never overwritten)")
    if not out_dir.parent.is_dir():
        raise ConfigError(f"--fix: {out_dir.parent}: no such folder")
    loaded, sim = report.loaded, report.similar
    ix = loaded.index
    held_exact = {ix.exact[k] for k, (s, _) in enumerate(loaded.order) if s != "train"}
    held_groups = {sim.group[k] for k, (s, _) in enumerate(loaded.order)
                   if s != "train" and sim.group[k] >= 0}
    seen: set = set()
    dropped = {"leaked": 0, "exact_duplicates": 0, "empty_answers": len(loaded.skipped)}
    keep: dict[str, list] = {name: [] for name in SPLITS}
    for k, (split, i) in enumerate(loaded.order):
        record = loaded.splits[split][i]
        if split == "train":
            g = sim.group[k]
            near_held = g >= 0 and (g in held_groups or
                                    any(n in held_groups for n in sim.neighbours.get(g, {})))
            if ix.exact[k] in held_exact or near_held:
                dropped["leaked"] += 1
                continue
            if ix.exact[k] in seen:
                dropped["exact_duplicates"] += 1
                continue
            seen.add(ix.exact[k])
        keep[split].append(record)
    if not keep["train"]:
        raise ConfigError(f"--fix: nothing would be left to train on in {out_dir}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        written = {}
        for name in SPLITS:
            if keep[name]:
                path = tmp / f"{name}.jsonl"
                with open(path, "w", encoding="utf-8") as f:
                    for record in keep[name]:
                        f.write(json.dumps(record.data, ensure_ascii=False, default=str) + "\n")
                written[name] = len(keep[name])
        raw = cfg.to_dict()
        data = raw["data"]
        for name in SPLITS:
            data[name] = f"{name}.jsonl" if name in written else None
        data.update(path=None, hub=None, columns=None)
        (tmp / "config.yaml").write_text(
            f"# written by mlxtune data --fix from {cfg.source}\n"
            + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out_dir": str(out_dir), "config": str(out_dir / "config.yaml"),
            "written": written, "dropped": dropped}
