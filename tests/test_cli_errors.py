"""Bad input: one clear line naming the file/line or key, non-zero exit, no traceback,
nothing written."""

import json
from pathlib import Path

import pytest
import yaml

from mlxtune.cli import main
from tiny import write_jsonl

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _config(tmp_path, model_path, **sections):
    cfg = {"name": "bad", "model": {"path": str(model_path)},
           "data": {"train": "train.jsonl", "max_seq_len": 64},
           "train": {"iters": 2, "batch_size": 2, "eval_every": 0}}
    for key, value in sections.items():
        cfg[key] = value
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "config.yaml"


def _bad_lines(tmp_path, lines: list[bytes]):
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")


def _good_data(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [GOOD] * 4)


J = lambda obj: json.dumps(obj).encode()  # noqa: E731


def case_invalid_json(tmp, model):
    _bad_lines(tmp, [J(GOOD), b'{"messages": [', J(GOOD)])
    return _config(tmp, model), [], "train.jsonl:2"


def case_not_an_object(tmp, model):
    _bad_lines(tmp, [J(GOOD), b'[1, 2, 3]'])
    return _config(tmp, model), [], "train.jsonl:2"


def case_missing_keys(tmp, model):
    _bad_lines(tmp, [J({"question": "x", "answer": "y"})])
    return _config(tmp, model), [], "train.jsonl:1"


def case_unknown_role(tmp, model):
    bad = {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}
    _bad_lines(tmp, [J(GOOD), J(GOOD), J(bad)])
    return _config(tmp, model), [], "train.jsonl:3"


def case_empty_content(tmp, model):
    bad = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}
    _bad_lines(tmp, [J(bad)])
    return _config(tmp, model), [], "train.jsonl:1"


def case_last_not_assistant(tmp, model):
    bad = {"messages": [{"role": "user", "content": "x"}]}
    _bad_lines(tmp, [J(GOOD), J(bad)])
    return _config(tmp, model), [], "train.jsonl:2"


def case_empty_file(tmp, model):
    _bad_lines(tmp, [b""])
    return _config(tmp, model), [], "train.jsonl"


def case_not_utf8(tmp, model):
    _bad_lines(tmp, [J(GOOD), b'{"text": "caf\xe9"}'])
    return _config(tmp, model), [], "train.jsonl:2"


def case_mixed_formats(tmp, model):
    _bad_lines(tmp, [J(GOOD), J({"prompt": "a", "completion": "b"})])
    return _config(tmp, model), [], "train.jsonl:2"


def case_missing_data_file(tmp, model):
    return _config(tmp, model, data={"train": "nope.jsonl"}), [], "nope.jsonl"


def case_unknown_config_key(tmp, model):
    _good_data(tmp)
    return _config(tmp, model, train={"iterz": 3}), [], "train.iterz"


def case_wrong_type(tmp, model):
    _good_data(tmp)
    return _config(tmp, model, train={"batch_size": "four"}), [], "train.batch_size"


def case_bad_choice(tmp, model):
    _good_data(tmp)
    return _config(tmp, model), ["--set", "train.optimizer=adam2"], "train.optimizer"


def case_set_without_value(tmp, model):
    _good_data(tmp)
    return _config(tmp, model), ["--set", "train.iters"], "--set train.iters"


def case_invalid_yaml(tmp, model):
    (tmp / "config.yaml").write_text("name: x\nmodel: [unclosed\n")
    return tmp / "config.yaml", [], "config.yaml"


def case_missing_config(tmp, model):
    return tmp / "absent.yaml", [], "absent.yaml"


def case_missing_model(tmp, model):
    _good_data(tmp)
    return _config(tmp, tmp / "no-such-model"), [], "no-such-model"


def case_folder_without_config(tmp, model):
    _good_data(tmp)
    (tmp / "empty-model").mkdir()
    return _config(tmp, tmp / "empty-model"), [], "empty-model"


def case_garbage_gguf(tmp, model):
    _good_data(tmp)
    (tmp / "garbage.gguf").write_bytes(b"this is not a gguf file at all" * 10)
    return _config(tmp, tmp / "garbage.gguf"), [], "garbage.gguf"


def case_truncated_gguf(tmp, model):
    from mlxtune.models import packaged_path

    _good_data(tmp)
    try:
        src = packaged_path("smollm2-135m-instruct")
    except Exception:
        pytest.skip("packaged model not installed")
    with open(src, "rb") as f:
        (tmp / "cut.gguf").write_bytes(f.read(3_000_000))
    return _config(tmp, tmp / "cut.gguf"), [], "cut.gguf"


def case_unknown_target(tmp, model):
    _good_data(tmp)
    return _config(tmp, model, adapter={"targets": ["qkv"]}), [], "adapter.targets"


def case_resume_without_checkpoint(tmp, model):
    _good_data(tmp)
    return _config(tmp, model), ["--resume", "--run-dir", str(tmp / "run")], "--resume"


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_clear_line(case, tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, extra, needle = CASES[case](tmp_path, tiny_model_dir)
    args = ["run", str(config), *extra]
    if "--run-dir" not in extra:
        args += ["--run-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code not in (0, None)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "runs").exists()


def test_existing_run_dir_is_refused(tmp_path, tiny_model_dir, capsys):
    _good_data(tmp_path)
    config = _config(tmp_path, tiny_model_dir)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(config), "--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code != 0
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["keep.txt"]
