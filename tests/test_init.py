"""mlxtune init DIR: the quickstart from an installed wheel (config, data, schema, metric).

The wheel itself is built and installed into a fresh venv outside the repository by
.ci/run, which runs `mlxtune doctor` and a 2-step quickstart from there; these tests check
what `init` writes and that the package data it copies is the repository's own files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mlxtune import config, examples
from mlxtune.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "mlxtune" / "examples" / "quickstart"


def run_cli(capsys, *argv):
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_init_writes_a_quickstart_that_loads_from_anywhere(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)      # paths in the config are relative to the config
    target = tmp_path / "x" / "qs"
    code, out, err = run_cli(capsys, "init", str(target))
    assert code == 0, err
    assert out.strip() == str(target / "quickstart.yaml")
    assert "train with: mlxtune run" in err
    assert sorted(p.name for p in target.iterdir()) == [
        "README.md", "metrics.py", "quickstart.yaml", "task.schema.json", "tasks.jsonl"]
    for name in ("tasks.jsonl", "task.schema.json", "metrics.py", "README.md"):
        assert (target / name).read_bytes() == (ROOT / "data" / "quickstart" / name).read_bytes()
    cfg = config.load(target / "quickstart.yaml")
    assert cfg.data.path == str(target / "tasks.jsonl")
    assert cfg.eval.schema == str(target / "task.schema.json")
    assert cfg.eval.metric == f"{target / 'metrics.py'}:field_accuracy"
    # the rest of the config is the repository's quickstart, unchanged
    ours = config.load(ROOT / "configs" / "quickstart.yaml").to_dict()
    theirs = cfg.to_dict()
    for section in ("model", "adapter", "train", "objective"):
        assert theirs[section] == ours[section], section
    assert theirs["data"]["split"] == ours["data"]["split"]
    assert not list((tmp_path / "x").glob(".qs.*"))      # no staging folder left


def test_init_into_an_empty_folder_and_refusals(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "init", str(tmp_path / "empty"))
    assert code == 0, err
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    code, out, err = run_cli(capsys, "init", str(full))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"{full}: already exists and is not an empty folder" in lines[0]
    assert [p.name for p in full.iterdir()] == ["notes.txt"]
    code, _, err = run_cli(capsys, "init", str(tmp_path / "y"), "--example", "nope")
    assert code == 2 and "nope" in err and not (tmp_path / "y").exists()


def test_the_packaged_example_is_the_repositorys_files(tmp_path):
    """The links resolve inside the repository, the config names only files shipped beside
    it, and pyproject's package data takes the whole folder into the wheel."""
    folder, config_name, prefix, files = examples.EXAMPLES["tasks"]
    for name in (config_name, *files):
        link = SHIPPED / name
        assert link.is_symlink() and link.resolve().is_file(), name
        assert ROOT in link.resolve().parents
    text = (SHIPPED / config_name).read_text()
    named = [v for v in yaml.safe_load(text.replace(prefix, "")).get("data", {}).values()
             if isinstance(v, str) and "." in v]
    assert named == ["tasks.jsonl"]
    package_data = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1]
    assert '"examples/quickstart/*"' in package_data.split("\n[")[0]


def test_a_broken_install_is_one_line(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "pkg" / "quickstart"
    broken.mkdir(parents=True)
    (broken / "quickstart.yaml").write_text("name: q\n")
    monkeypatch.setattr(examples, "HERE", tmp_path / "pkg")
    code, _, err = run_cli(capsys, "init", str(tmp_path / "out"))
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "the packaged example lacks tasks.jsonl" in err
    assert not (tmp_path / "out").exists()
