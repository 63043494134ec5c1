"""export --to hub: the folder (PEFT, mlx-lm and GGUF adapters, Modelfile), the model card
(metadata, the eval table from eval.json, the training run, usage), and --push's checks.

The upload itself needs the Hub and a token, which these machines do not have: the tests
check that a missing token or an unreachable Hub is one line with nothing written, and
drive `push` through a stand-in for huggingface_hub.HfApi (the calls, one commit of the
complete folder, a repository it created deleted again when the commit fails).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from export_helpers import make_run
from test_export import tiny_gguf

from mlxtune.cli import main
from mlxtune.export import export, hub
from mlxtune.export.lora import ExportError
from tiny import write_jsonl

ROOT = Path(__file__).resolve().parents[1]

EVAL = {
    "run_dir": "x", "split": "test", "split_examples": 20, "adapter": "/x/best",
    "generated_examples": 20, "max_new_tokens": 64, "metric_name": "metrics.py:field_accuracy",
    "base": {"loss": 1.4321, "exact_match": 0.05, "json_valid": 0.1, "metric": 0.21},
    "few_shot": {"loss": 1.2, "exact_match": 0.35, "json_valid": 0.9, "metric": 0.6},
    "few_shot_setup": {"shots": 3},
    "tuned": {"loss": 0.0845, "exact_match": 0.8, "json_valid": 1.0, "metric": 0.93},
    "verdict": "The tuned adapter beats 3-shot prompting by 45.0 points of exact match.",
}


def run_cli(capsys, *argv):
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    """A run on the packaged SmolLM2 whose config names a hub dataset and DPO, with an
    eval.json that has base, few-shot and tuned sides."""
    tmp = tmp_path_factory.mktemp("hub-smollm2")
    run = make_run(tmp / "quickstart-dpo", "smollm2-135m-instruct", rank=4, alpha=8.0,
                   targets=["q_proj", "v_proj"])
    cfg = {"name": "quickstart-dpo",
           "model": {"path": "smollm2-135m-instruct"},
           "adapter": {"rank": 4, "alpha": 8.0},
           "data": {"hub": {"id": "HuggingFaceH4/no_robots"}, "max_seq_len": 256},
           "objective": {"type": "dpo", "beta": 0.1},
           "train": {"iters": 60, "batch_size": 4, "learning_rate": 2e-5},
           "eval": {"schema": "/home/someone/private/task.schema.json",
                    "metric": "/home/someone/private/metrics.py:field_accuracy"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "eval.json").write_text(json.dumps(EVAL))
    return run


def test_hub_folder_and_card_for_a_packaged_base(smollm2_run, tmp_path, capsys):
    out = tmp_path / "hub"
    code, stdout, err = run_cli(capsys, "export", str(smollm2_run), "--to", "hub", "--out",
                                str(out))
    assert code == 0, err
    assert stdout.strip() == str(out)
    assert files(out) == {"README.md", "adapter_config.json", "adapter_model.safetensors",
                          "mlx/adapters.safetensors", "mlx/adapter_config.json",
                          "adapter.gguf", "Modelfile"}
    # PEFT at the top names the hub id; mlx-lm's folder is the run's adapter unchanged
    peft_cfg = json.loads((out / "adapter_config.json").read_text())
    assert peft_cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert peft_cfg["target_modules"] == ["q_proj", "v_proj"]
    for name in ("adapters.safetensors", "adapter_config.json"):
        assert (out / "mlx" / name).read_bytes() == \
            (smollm2_run / "adapters" / name).read_bytes()
    # the GGUF adapter is f16 by default
    import gguf

    reader = gguf.GGUFReader(str(out / "adapter.gguf"))
    assert {t.tensor_type.name for t in reader.tensors} == {"F16"}
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./SmolLM2-135M-Instruct.Q4_1.gguf" in modelfile
    assert "ADAPTER ./adapter.gguf" in modelfile and "TEMPLATE" in modelfile

    text = (out / "README.md").read_text()
    meta = hub.read_card_metadata(text)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft"
    assert meta["datasets"] == ["HuggingFaceH4/no_robots"]
    assert {"mlxtune", "lora", "peft", "dpo", "qlora", "gguf"} <= set(meta["tags"])
    # the eval table: every side eval.json has, in order, with its numbers
    assert "| metric | base | 3-shot | tuned |" in text
    assert "| exact match | 5.0% | 35.0% | 80.0% |" in text
    assert "| loss | 1.4321 | 1.2000 | 0.0845 |" in text
    assert EVAL["verdict"] in text
    # the config without local paths
    assert "/home/someone" not in text
    assert "schema: task.schema.json" in text and "metric: metrics.py:field_accuracy" in text
    # usage for each tool
    for needle in ("mlx_lm.generate --model HuggingFaceTB/SmolLM2-135M-Instruct "
                   "--adapter-path quickstart-dpo/mlx",
                   'PeftModel.from_pretrained(base, "USER/quickstart-dpo")',
                   "llama-server -m SmolLM2-135M-Instruct.Q4_1.gguf --lora "
                   "quickstart-dpo/adapter.gguf",
                   "ollama create quickstart-dpo -f Modelfile"):
        assert needle in text, needle


def test_card_shows_only_the_sides_eval_json_has(smollm2_run, tmp_path):
    """No few-shot side yet (or no eval at all): the table has what exists."""
    result = {k: v for k, v in EVAL.items() if not k.startswith("few_shot") and k != "verdict"}
    (smollm2_run / "eval.json").write_text(json.dumps(result))
    try:
        out = export(smollm2_run, "hub", tmp_path / "a", push=None).path
        text = (out / "README.md").read_text()
        assert "| metric | base | tuned |" in text and "shot" not in text.split("## Training")[0]
        (smollm2_run / "eval.json").unlink()
        res = export(smollm2_run, "hub", tmp_path / "b")
        assert "No evaluation was run" in (res.path / "README.md").read_text()
        assert "no eval.json" in res.note
    finally:
        (smollm2_run / "eval.json").write_text(json.dumps(EVAL))


def test_a_trained_gguf_run_end_to_end(tmp_path, capsys):
    """`mlxtune run` on a tiny GGUF base with its evaluation, then --to hub: the card's
    table holds eval.json's numbers; a GGUF file has no hub id, so no base_model (and the
    command says so), and the PEFT config names none."""
    base, _, _ = tiny_gguf(tmp_path / "base.gguf")
    rows = [{"messages": [{"role": "user", "content": f"n {i}?"},
                          {"role": "assistant", "content": f"the number is {i % 5}"}],
             "user": f"u{i % 6}"} for i in range(30)]
    write_jsonl(tmp_path / "data.jsonl", rows)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "name": "tiny-hub", "model": {"path": str(base)}, "adapter": {"rank": 4, "alpha": 8},
        "data": {"path": "data.jsonl", "split": {"by": "user", "valid": 0.2, "test": 0.2},
                 "max_seq_len": 48},
        "train": {"iters": 4, "batch_size": 4, "learning_rate": "1e-2", "eval_every": 2,
                  "save_every": 0, "log_every": 2},
        "eval": {"examples": 2, "max_new_tokens": 4}}))
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "run", str(tmp_path / "c.yaml"), "--run-dir", str(run), "-q")
    assert code == 0, err
    result = json.loads((run / "eval.json").read_text())
    code, stdout, err = run_cli(capsys, "export", str(run), "--to", "hub", "--outtype", "f32")
    assert code == 0, err
    out = Path(stdout.strip())
    assert out == run / "export" / "hub"
    assert "base_model unknown" in err
    text = (out / "README.md").read_text()
    meta = hub.read_card_metadata(text)
    assert "base_model" not in meta and meta["library_name"] == "peft"
    assert "datasets" not in meta and "qlora" not in meta["tags"]   # an F32 GGUF
    assert json.loads((out / "adapter_config.json").read_text())[
        "base_model_name_or_path"] is None
    from mlxtune.evaluate import report

    sides = report.sides(result)
    assert sides[0] == "base" and sides[-1] == "tuned"
    assert "| loss | " + " | ".join(f"{result[s]['loss']:.4f}" for s in sides) + " |" in text
    assert "| steps | 4 (done)" in text and "learning rate 0.01" in text
    assert str(tmp_path) not in text           # no local path in the card
    assert {"adapter.gguf", "Modelfile", "mlx/adapters.safetensors"} <= files(out)


# -- --push ------------------------------------------------------------------------------

@pytest.mark.parametrize("case, env, message", [
    ("no token", {"HF_TOKEN": ""}, "--push: no Hugging Face token"),
    ("no network", {"HF_TOKEN": "hf_not_a_real_token", "HF_ENDPOINT": "http://127.0.0.1:9"},
     "--push: the Hub did not accept the token or could not be reached"),
])
def test_push_without_token_or_network_is_one_line_and_writes_nothing(
        smollm2_run, tmp_path, case, env, message):
    # a fresh HF_HOME: no stored token; HF_TOKEN only where the case sets one
    env = {**{k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT")},
           "HF_HOME": str(tmp_path / "hf-home"), "MLXTUNE_PROFILE": "cpu",
           **{k: v for k, v in env.items() if v}}
    out = tmp_path / "hub"
    proc = subprocess.run(
        [sys.executable, "-m", "mlxtune", "export", str(smollm2_run), "--to", "hub",
         "--out", str(out), "--push", "someone/tiny"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "nothing was written or uploaded" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".hub.*"))


def test_push_flags_only_with_hub(smollm2_run, tmp_path):
    with pytest.raises(ExportError, match="--push: only with --to hub"):
        export(smollm2_run, "peft", tmp_path / "p", push="a/b")
    with pytest.raises(ExportError, match="--private: only with --push"):
        export(smollm2_run, "hub", tmp_path / "p", private=True)
    with pytest.raises(ExportError, match="'nope' is not a repository id"):
        export(smollm2_run, "hub", tmp_path / "p", push="nope")
    assert not (tmp_path / "p").exists()


class FakeApi:
    """Records HfApi calls; `fail_upload` makes the commit fail."""
    calls: list = []
    fail_upload = False
    exists = False

    def whoami(self):
        self.calls.append(("whoami",))
        return {"name": "someone"}

    def repo_exists(self, repo_id):
        self.calls.append(("repo_exists", repo_id))
        return FakeApi.exists

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, commit_message=None):
        folder = Path(folder_path)
        self.calls.append(("upload_folder", repo_id, sorted(
            str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())))
        if FakeApi.fail_upload:
            raise ConnectionError("connection reset by peer")

    def delete_repo(self, repo_id):
        self.calls.append(("delete_repo", repo_id))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls, FakeApi.fail_upload, FakeApi.exists = [], False, False
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    return FakeApi


def test_push_uploads_the_complete_folder_in_one_commit(smollm2_run, tmp_path, fake_hub,
                                                        capsys):
    out = tmp_path / "hub"
    code, stdout, err = run_cli(capsys, "export", str(smollm2_run), "--to", "hub", "--out",
                                str(out), "--push", "someone/tiny-tasks", "--private")
    assert code == 0, err
    assert "uploaded to https://huggingface.co/someone/tiny-tasks" in err
    names = [c[0] for c in fake_hub.calls]
    assert names == ["whoami", "repo_exists", "create_repo", "upload_folder"]
    assert fake_hub.calls[2] == ("create_repo", "someone/tiny-tasks", True, True)
    assert fake_hub.calls[3][2] == sorted(files(out))
    # the card's usage names the repository it was pushed to
    assert 'PeftModel.from_pretrained(base, "someone/tiny-tasks")' in \
        (out / "README.md").read_text()


@pytest.mark.parametrize("existed", [False, True])
def test_a_failed_commit_leaves_no_new_repository(smollm2_run, tmp_path, fake_hub, capsys,
                                                  existed):
    fake_hub.fail_upload, fake_hub.exists = True, existed
    out = tmp_path / "hub"
    code, _, err = run_cli(capsys, "export", str(smollm2_run), "--to", "hub", "--out",
                           str(out), "--push", "someone/tiny-tasks")
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "the upload to someone/tiny-tasks failed" in lines[0]
    assert "ConnectionError: connection reset by peer" in lines[0]
    assert f"the folder is complete at {out}" in lines[0]
    deleted = ("delete_repo", "someone/tiny-tasks") in fake_hub.calls
    assert deleted == (not existed)          # only a repository this command created
    assert "README.md" in files(out)
