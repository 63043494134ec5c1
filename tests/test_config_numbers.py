"""Numbers as people write them: 1e-4 in a config file and --set train.learning_rate=2e-4.

YAML 1.1 (PyYAML) reads an exponent without a dot as a string; every float key takes any
decimal float literal, and real garbage is still one line naming the key."""

from __future__ import annotations

import pytest

from mlxtune import config
from mlxtune.cli import main
from mlxtune.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: train.jsonl\n" + text)
    return path


@pytest.mark.parametrize("literal, value", [
    ("1e-4", 1e-4), ("2E-4", 2e-4), ("3e+2", 300.0), (".5e-3", 5e-4), ("5.", 5.0),
    ("-1e-1", -0.1), ("1.0e-4", 1e-4), ("7", 7.0)])
def test_float_literals_in_a_config_file(tmp_path, literal, value):
    # simpo_gamma has no lower limit, so a negative literal is accepted there too
    cfg = config.load(write(tmp_path, f"objective:\n  simpo_gamma: {literal}\n"))
    assert cfg.objective.simpo_gamma == value and isinstance(cfg.objective.simpo_gamma, float)
    if value >= 0:
        cfg = config.load(write(tmp_path, f"train:\n  learning_rate: {literal}\n"))
        assert cfg.train.learning_rate == value


def test_float_literals_in_set_and_optional_floats(tmp_path):
    cfg = config.load(write(tmp_path, ""), ["train.learning_rate=2e-4", "objective.beta=1e-1",
                                            "train.max_grad_norm=5E-1", "train.weight_decay=1e-2"])
    assert cfg.train.learning_rate == 2e-4
    assert cfg.objective.beta == 0.1            # Optional[float]
    assert cfg.train.max_grad_norm == 0.5
    assert cfg.train.weight_decay == 0.01


@pytest.mark.parametrize("literal", ["2e-4x", "1e", "e-4", "nan", "inf", "1,5", "fast", "1e-4.0"])
def test_garbage_is_still_refused_with_the_key(tmp_path, literal):
    with pytest.raises(ConfigError, match=rf"c\.yaml: train\.learning_rate: expected number, "
                                          rf"got '{literal}'"):
        config.load(write(tmp_path, ""), [f"train.learning_rate={literal}"])


def test_limits_still_apply_to_an_exponent(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.learning_rate: must be >= 0.0, got -0.0001"):
        config.load(write(tmp_path, "train:\n  learning_rate: -1e-4\n"))


def test_integers_are_not_floats(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.iters: expected integer, got '1e3'"):
        config.load(write(tmp_path, ""), ["train.iters=1e3"])


def test_plan_accepts_it_from_the_command_line(tmp_path, tiny_model_dir, capsys):
    """As a new user types it: mlxtune plan CONFIG --set train.learning_rate=2e-4."""
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    path = write(tmp_path, f"model:\n  path: {tiny_model_dir}\ntrain:\n  learning_rate: 1e-4\n")
    main(["plan", str(path), "--set", "train.learning_rate=2e-4", "--json"])
    assert '"peak_gb"' in capsys.readouterr().out
