"""The Textual front end: `mlxtune tui [CONFIG | RUN_DIR | RUNS_FOLDER]`.

Nothing in the engine imports this package (tests/test_tui.py checks that `import
mlxtune` and the engine modules leave textual unloaded).
"""

from __future__ import annotations

from pathlib import Path


def main(target: str | None = None, runs_root: str = "runs", overrides=()) -> None:
    from mlxtune.errors import ConfigError
    from mlxtune.tui.app import MlxtuneApp
    from mlxtune.tui.history import is_run_dir

    if target is not None and Path(target).is_dir() and not is_run_dir(Path(target)):
        target, runs_root = None, target  # a folder of runs: the runs view of it
    edits = {}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set train.iters=50")
        edits[key.strip()] = value
    MlxtuneApp(target, runs_root=Path(runs_root), overrides=edits).run()
