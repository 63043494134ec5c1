"""`mlxtune compare` on tiny models: a candidate that fits, one that does not, one that
does not exist; the ranking and the recommendation by hand; the pilot run."""

import json
from pathlib import Path

import pytest

from mlxtune import config as config_mod, memory
from mlxtune.cli import _spread
from mlxtune.evaluate import compare as cmp
from test_evaluate import run_cli, write_config
from tiny import make_model_dir


@pytest.fixture(scope="module")
def big_model_dir(tmp_path_factory):
    """A tiny model with a wider, deeper body: a larger planned peak than tiny_model_dir."""
    return make_model_dir(tmp_path_factory.mktemp("tiny-big"), hidden_size=256,
                          intermediate_size=1024, num_hidden_layers=4, seed=1)


def test_spread_reads_space_separated_lists():
    argv = ["compare", "c.yaml", "--models", "a", "b/c", "x.gguf", "--shots", "0", "3",
            "--json"]
    assert _spread(argv) == ["compare", "c.yaml", "--models", "a", "--models", "b/c",
                             "--models", "x.gguf", "--shots", "0", "--shots", "3", "--json"]
    assert _spread(["eval", "r", "--limit", "2"]) == ["eval", "r", "--limit", "2"]


def test_compare_measures_what_fits_and_gives_the_others_their_reason(
        tmp_path, tiny_model_dir, big_model_dir, capsys, monkeypatch):
    config = write_config(tmp_path, tiny_model_dir)
    cfg = config_mod.load(config)
    peaks = {}
    for name, path in (("small", tiny_model_dir), ("big", big_model_dir)):
        c = cmp.candidate_config(cfg, str(path))
        peaks[name] = memory.plan(c).here.peak_gb
    assert peaks["big"] > peaks["small"] / 0.9
    usable = (peaks["small"] / 0.9 + peaks["big"]) / 2  # small fits, big does not
    monkeypatch.chdir(tmp_path)
    missing = "no-such-owner/no-such-model"
    code, out = run_cli(["compare", str(config), "--models", str(tiny_model_dir),
                         str(big_model_dir), missing, "gone.gguf", "--shots", "0", "2",
                         "--limit", "3", "--usable-gb", str(usable), "--out", "cmp",
                         "--json"], capsys)
    assert code == 0, out.err
    result = json.loads(out.out)
    rows = result["candidates"]
    assert list(rows) == [str(tiny_model_dir), str(big_model_dir), missing, "gone.gguf"]
    small = rows[str(tiny_model_dir)]
    assert small["error"] is None and small["source"] == "mlx"
    assert small["parameters"] == memory.plan(cmp.candidate_config(cfg, str(tiny_model_dir))
                                              ).shape.parameters()
    assert small["verdict"] == "fits" and set(small["tiers"]) == {"32", "64", "128"}
    assert small["step_s"] > 0 and small["steps"] == cmp.PROBE_STEPS
    assert small["decode_tokens_per_sec"] == small["sides"]["0-shot"]["tokens_per_sec"] > 0
    for side in ("0-shot", "2-shot"):
        for key in ("loss", "exact_match", "json_valid", "schema_match", "prompt_tokens",
                    "tokens_per_sec"):
            assert key in small["sides"][side], (side, key)
        assert small["sides"][side]["generated"] == 3
    assert small["sides"]["2-shot"]["prompt_tokens"] > small["sides"]["0-shot"]["prompt_tokens"]
    assert "tuned" not in small["sides"]  # no --train-steps
    big = rows[str(big_model_dir)]
    assert big["error"].startswith("does not fit: a training step's predicted peak")
    assert big["verdict"] == "no" and "sides" not in big
    assert "not in the local Hugging Face cache" in rows[missing]["error"]
    assert rows["gone.gguf"]["error"] == "model.path: GGUF file gone.gguf not found"
    assert all("\n" not in r["error"] for r in list(rows.values())[1:])
    assert result["ranking"] == [str(tiny_model_dir)]
    assert result["recommendation"]["model"] == str(tiny_model_dir)
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved == {k: v for k, v in result.items() if k != "out_dir"}
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md.splitlines()[2].startswith("Recommendation: ")
    assert "| 1 | `" in md and "| - | `gone.gguf` |" in md and "does not fit" in md
    assert not (tmp_path / "cmp" / ".probes").exists()  # the probe runs are cleaned up
    # Progress per candidate.
    for i, name in enumerate(rows, start=1):
        assert f"[{i}/4] {name}" in out.err
    assert f"[1/4] {tiny_model_dir} 2-shot: 3/3 examples" in out.err and "ETA" in out.err


def test_pilot_runs_add_the_tuned_side(tmp_path, tiny_model_dir, capsys, monkeypatch):
    config = write_config(tmp_path, tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(["compare", str(config), "--models", str(tiny_model_dir),
                         "--shots", "0", "--train-steps", "4", "--limit", "2", "--out", "c"],
                        capsys)
    assert code == 0, out.err
    result = json.loads((tmp_path / "c" / "compare.json").read_text())
    row = result["candidates"][str(tiny_model_dir)]
    assert row["steps"] == 4 and (Path(row["pilot_run"]) / "adapters").is_dir()
    assert set(row["sides"]) == {"0-shot", "tuned"}
    assert row["sides"]["tuned"]["loss"] < row["sides"]["0-shot"]["loss"]
    assert "exact match tuned" in out.out  # the markdown table on stdout


def test_rank_and_recommendation_by_hand():
    def row(model, gb, **sides):
        return {"model": model, "error": None, "peak_gb": gb,
                "sides": {k: {"metric": v, "loss": 1.0} for k, v in sides.items()}}

    result = {"metric_name": "m.py:field_accuracy", "candidates": {
        "a": row("a", 2.0, **{"0-shot": 0.50, "3-shot": 0.60}),   # best 0.60, 0.30 / GB
        "b": row("b", 1.0, **{"0-shot": 0.59, "3-shot": 0.40}),   # best 0.59, 0.59 / GB
        "c": row("c", 4.0, **{"0-shot": 0.70}),                   # best 0.70, 0.175 / GB
        "d": {"model": "d", "error": "does not fit: ..."}}}
    got = cmp.rank(result)
    assert got["main_metric"]["key"] == "metric"
    assert got["ranking"] == ["b", "a", "c"]
    assert result["candidates"]["b"]["main_per_gb"] == pytest.approx(0.59)
    assert result["candidates"]["a"]["main_side"] == "3-shot"
    # The best is c (0.70); nothing else within 0.02 of it: c is recommended.
    assert got["recommendation"]["model"] == "c"
    result["candidates"]["a"]["sides"]["3-shot"]["metric"] = 0.69  # now within 0.02
    got = cmp.rank(result)
    assert got["recommendation"]["model"] == "a"  # the smaller of a and c
    assert "within 0.02 of the best (c, 0.700)" in got["recommendation"]["text"]


def test_bad_input_is_one_line(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir)
    code, out = run_cli(["compare", str(config)], capsys)
    assert code != 0 and "--models" in out.err
    code, out = run_cli(["compare", str(tmp_path / "none.yaml"), "--models", "x"], capsys)
    assert code != 0 and "config file not found" in out.err
    assert len(out.err.strip().splitlines()) == 1
    code, out = run_cli(["compare", str(config), "--models", "a", "a"], capsys)
    assert code != 0 and "named twice" in out.err and len(out.err.strip().splitlines()) == 1
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    code, out = run_cli(["compare", str(config), "--models", "a", "--out",
                         str(tmp_path / "full")], capsys)
    assert code != 0 and "already exists and is not empty" in out.err
