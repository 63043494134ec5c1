"""Examples shipped in the wheel (`mlxtune init DIR`): a pip-installed mlxtune has no
configs/ or data/ folder, so the quickstart travels as package data.

mlxtune/examples/quickstart/ holds symbolic links to the repository's own
configs/quickstart.yaml and data/quickstart/* (one copy of each file in the repository;
the build copies the files they point to into the sdist and the wheel, as it does for
kernels/ through mlxtune/kernels). `init` writes them flat into DIR, the config's paths
rewritten to point beside it, and loads the config before anything is moved into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from mlxtune.errors import ConfigError, MlxtuneError

HERE = Path(__file__).resolve().parent
# example -> (its folder here, its config, the config's path prefix for its files, files)
EXAMPLES = {
    "tasks": ("quickstart", "quickstart.yaml", "../data/quickstart/",
              ("tasks.jsonl", "task.schema.json", "metrics.py", "README.md")),
}


def init(directory: str | Path, example: str = "tasks") -> Path:
    """Write `example` into `directory` (new, or an empty folder); returns its config."""
    if example not in EXAMPLES:
        raise ConfigError(f"--example: unknown example '{example}' (known: "
                          f"{', '.join(EXAMPLES)})")
    folder, config_name, prefix, files = EXAMPLES[example]
    source = HERE / folder
    missing = [f for f in (config_name, *files) if not (source / f).is_file()]
    if missing:
        raise MlxtuneError(f"{source}: the packaged example lacks {', '.join(missing)} "
                           "(a broken install: reinstall mlxtune)")
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{target}: already exists and is not an empty folder (choose a "
                          "new one)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        for name in files:
            shutil.copyfile(source / name, tmp / name)
        text = (source / config_name).read_text(encoding="utf-8")
        (tmp / config_name).write_text(text.replace(prefix, ""), encoding="utf-8")
        from mlxtune import config

        cfg = config.load(tmp / config_name)
        named = [cfg.data.path, cfg.data.train, cfg.eval.schema,
                 cfg.eval.metric.rpartition(":")[0] if cfg.eval.metric else None]
        absent = [p for p in named if p and not Path(p).is_file()]
        if absent:   # the config names a file the example does not ship
            raise MlxtuneError(f"{source / config_name}: names {', '.join(absent)}, which "
                               "the packaged example lacks")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)     # mkdtemp makes it private
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / config_name
