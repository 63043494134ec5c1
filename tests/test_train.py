"""The training loop end to end on tiny models: run directory, events, resume, NaN, signals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from mlxtune.cli import main
from mlxtune.train import optim as train_optim
from mlxtune.train.events import read_events
from conftest import expected_compute_dtype
from tiny import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def chat(i: int) -> dict:
    colors = ["red", "green", "blue", "amber", "violet"]
    return {"messages": [
        {"role": "user", "content": f"color {i}?"},
        {"role": "assistant", "content": f"the color is {colors[i % len(colors)]}"}],
        "user": f"u{i % 7}"}


@pytest.fixture
def workdir(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(24)])
    write_jsonl(tmp_path / "valid.jsonl", [chat(i) for i in range(100, 108)])
    config = {
        "name": "tiny",
        "model": {"path": str(tiny_model_dir)},
        "adapter": {"rank": 4, "alpha": 8},
        "data": {"train": "train.jsonl", "valid": "valid.jsonl", "max_seq_len": 64},
        "train": {"iters": 12, "batch_size": 4, "learning_rate": 3e-3, "eval_every": 4,
                  "save_every": 4, "log_every": 2, "seed": 3},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def run_cli(args, capsys=None):
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr() if capsys else None
    return code, out


def adapter_of(path: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path / "adapters.safetensors")).items()}


def test_run_writes_the_run_directory(workdir, capsys, profile):
    run_dir = workdir / "run"
    code, out = run_cli(["run", str(workdir / "config.yaml"), "--run-dir", str(run_dir)], capsys)
    assert code == 0, out.err
    assert out.out.strip() == str(run_dir)
    for name in ("config.yaml", "events.jsonl", "adapters/adapters.safetensors",
                 "adapters/adapter_config.json", "best/adapters.safetensors",
                 "checkpoints/step-12/state.json", "checkpoints/step-12/optimizer.safetensors"):
        assert (run_dir / name).exists(), name
    events = read_events(run_dir)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "stop" and events[-1]["reason"] == "done"
    start = events[0]
    for key in ("config", "trainable_params", "total_params", "backend", "planned_peak_gb"):
        assert key in start
    assert start["profile"] == profile
    assert start["compute_dtype"] == expected_compute_dtype(profile)
    assert start["cpu_kernels"].startswith("not used" if profile == "gpu" else
                                           ("native", "MLX's ops"))
    assert start["kernels"] == []  # no GPU: no kernel self-check ran
    # Adapters and optimizer state in float32 whatever the compute dtype (as mlx-lm).
    for name in ("adapters/adapters.safetensors", "checkpoints/step-12/optimizer.safetensors"):
        dtypes = {v.dtype for v in mx.load(str(run_dir / name)).values()
                  if mx.issubdtype(v.dtype, mx.floating)}
        assert dtypes == {mx.float32}, (name, dtypes)
    trains = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in trains] == [2, 4, 6, 8, 10, 12]
    for e in trains:
        assert {"step", "loss", "lr", "tokens", "tokens_per_sec", "peak_memory_gb", "time"} <= set(e)
    assert trains[-1]["tokens"] > trains[0]["tokens"] > 0
    vals = [e for e in events if e["event"] == "val"]
    assert [v["step"] for v in vals] == [0, 4, 8, 12]
    assert vals[-1]["loss"] < vals[0]["loss"]  # it learns
    # The resolved config has every default filled in and absolute paths.
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["optimizer"] == "adamw"
    assert Path(resolved["data"]["train"]).is_absolute()
    # mlx-lm loads the final adapter.
    from mlx_lm import load as mlx_lm_load
    mlx_lm_load(resolved["model"]["path"], adapter_path=str(run_dir / "adapters"))


def _config_with(workdir, data=None, **train):
    cfg = yaml.safe_load((workdir / "config.yaml").read_text())
    cfg["train"].update(train)
    cfg["data"].update(data or {})
    path = workdir / f"config-{len(list(workdir.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli_process(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "mlxtune", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_resume_after_sigkill_matches_uninterrupted_run(workdir, capsys, profile):
    config = _config_with(workdir, iters=60, save_every=5, eval_every=0, log_every=5,
                          learning_rate=5e-3)
    ref_dir = workdir / "ref"
    code, out = run_cli(["run", str(config), "--run-dir", str(ref_dir), "-q"], capsys)
    assert code == 0, out.err

    killed_dir = workdir / "killed"
    proc = _cli_process(["run", str(config), "--run-dir", str(killed_dir), "-q"])
    deadline = time.time() + 120
    while not (killed_dir / "checkpoints" / "step-10").exists():
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed_dir / "adapters").exists()

    code, out = run_cli(["run", str(config), "--run-dir", str(killed_dir), "--resume", "-q"],
                        capsys)
    assert code == 0, out.err
    ref, resumed = adapter_of(ref_dir / "adapters"), adapter_of(killed_dir / "adapters")
    assert ref.keys() == resumed.keys()
    for k in ref:
        assert np.abs(ref[k] - resumed[k]).max() <= 1e-5, k
    starts = [e for e in read_events(killed_dir) if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"]


@pytest.mark.parametrize("quantize", ["affine", "nf4"])
def test_quantized_base_trains(workdir, capsys, profile, quantize):
    """QLoRA end to end: MLX's affine 4-bit layers or our NF4 format. Under the GPU profile
    those are MLX's quantized layers' own forward and backward, and our kernels' dispatch
    (served by the reference on a CPU); under the CPU profile dequantize-then-BLAS."""
    cfg = yaml.safe_load((workdir / "config.yaml").read_text())
    cfg["model"]["quantize"] = {"format": quantize, "bits": 4, "group_size": 32}
    cfg["train"].update(iters=8, eval_every=8, save_every=0)
    config = workdir / "q.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_dir = workdir / f"run-{quantize}"
    code, out = run_cli(["run", str(config), "--run-dir", str(run_dir), "-q", "--no-eval"],
                        capsys)
    assert code == 0, out.err
    events = read_events(run_dir)
    start = events[0]
    assert start["profile"] == profile
    assert start["compute_dtype"] == expected_compute_dtype(profile)
    assert start["kernels"] == []  # no GPU here: no kernel self-check ran
    vals = [e["loss"] for e in events if e["event"] == "val"]
    assert len(vals) == 2 and vals[1] < vals[0]
    weights = mx.load(str(run_dir / "adapters" / "adapters.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.float32}


def test_nan_loss_stops_cleanly(workdir, capsys):
    config = _config_with(workdir, learning_rate=1e30, max_grad_norm=None, optimizer="sgd",
                          momentum=0.0, save_every=1, eval_every=0, iters=20)
    run_dir = workdir / "nan"
    code, out = run_cli(["run", str(config), "--run-dir", str(run_dir)], capsys)
    assert code == 3
    assert "loss became" in out.err and "Traceback" not in out.err
    stop = read_events(run_dir)[-1]
    assert stop["event"] == "stop" and stop["reason"] == "nan"
    assert not (run_dir / "adapters").exists()
    # The checkpoints left behind are the good ones, from before the NaN.
    for ckpt in (run_dir / "checkpoints").glob("step-*"):
        assert all(np.isfinite(v).all() for v in adapter_of(ckpt).values())


def test_sigterm_saves_a_checkpoint_and_stops(workdir):
    config = _config_with(workdir, iters=100000, save_every=0, eval_every=0, log_every=1)
    run_dir = workdir / "term"
    proc = _cli_process(["run", str(config), "--run-dir", str(run_dir)])
    deadline = time.time() + 120
    while not any(e["event"] == "train" for e in read_events(run_dir)):
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    stop = read_events(run_dir)[-1]
    assert stop["reason"] == "interrupted"
    assert (run_dir / "checkpoints" / f"step-{stop['step']}" / "state.json").exists()


def test_early_stopping_keeps_best(workdir, capsys):
    config = _config_with(workdir, learning_rate=0.0, eval_every=2, iters=50,
                          early_stopping={"patience": 2})
    run_dir = workdir / "es"
    code, out = run_cli(["run", str(config), "--run-dir", str(run_dir)], capsys)
    assert code == 0, out.err
    stop = read_events(run_dir)[-1]
    assert stop["reason"] == "early_stopping" and stop["step"] == 4  # val at 0 is best; 2 and 4 do not improve
    assert (run_dir / "best" / "adapters.safetensors").exists()
    best = min(e["loss"] for e in read_events(run_dir) if e["event"] == "val")
    assert stop["message"].startswith("validation loss has not improved for 2 evaluations")
    assert f"early_stopping: step 4, best val loss {best:.4f}" in out.err


def test_grad_accumulation_equals_bigger_batch(workdir, capsys):
    # 4 examples: one step of batch 4 sees the same tokens as 2 micro-batches of 2.
    write_jsonl(workdir / "four.jsonl", [chat(i) for i in range(4)])
    results = {}
    for name, (bs, acc) in {"big": (4, 1), "accum": (2, 2)}.items():
        cfg = yaml.safe_load((workdir / "config.yaml").read_text())
        cfg["data"] = {"train": "four.jsonl", "max_seq_len": 64}
        cfg["train"].update(iters=1, batch_size=bs, grad_accumulation=acc, optimizer="sgd",
                            momentum=0.0, learning_rate=0.5, max_grad_norm=None, eval_every=0)
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        code, out = run_cli(["run", str(path), "--run-dir", str(workdir / name), "-q"], capsys)
        assert code == 0, out.err
        results[name] = adapter_of(workdir / name / "adapters")
    for k in results["big"]:
        assert np.abs(results["big"][k] - results["accum"][k]).max() < 1e-5, k
    assert any(np.abs(v).max() > 0 for k, v in results["big"].items() if k.endswith("lora_b"))


@pytest.mark.parametrize("option", [{"grad_checkpoint": True}, {"compile": False},
                                    {"loss_chunk": 7}, {"max_batch_tokens": 1},
                                    {"cpu_streams": 2}, {"cpu_streams": 4},
                                    {"cpu_streams": 3, "max_batch_tokens": 100}])
def test_checkpointing_and_compile_do_not_change_results(workdir, capsys, option):
    runs = {}
    for name, extra in {"plain": {}, "variant": option}.items():
        # Length-grouped rows: with random batches, max_batch_tokens and cpu_streams change
        # how a batch's examples share rows (data.batcher.mix_row_length), and so the
        # rounding (test_packing compares those layouts' gradients).
        config = _config_with(workdir, data={"group_by_length": True}, iters=3, eval_every=0,
                              **extra)
        code, out = run_cli(["run", str(config), "--run-dir", str(workdir / name), "-q"], capsys)
        assert code == 0, out.err
        runs[name] = adapter_of(workdir / name / "adapters")
    # AdamW turns float32 rounding in a near-zero gradient (another summation order of
    # the same rows) into up to ~0.5% of a step of lr = 3e-3: 1% of a step is the bound.
    for k in runs["plain"]:
        assert np.abs(runs["plain"][k] - runs["variant"][k]).max() < 3e-5, k


def test_cpu_losses_do_not_change_results(workdir, capsys, monkeypatch):
    """The trainer's loss on the CPU (fastmath's, its gradient computed in the forward pass,
    and mlxtune.native's kernel where it is built) against MLX's ops (MLXTUNE_FASTMATH=0):
    the same adapter after 3 steps."""
    from mlxtune import forward, native

    used = []
    original = forward._fast_cross_entropy_with_gradient
    monkeypatch.setattr(forward, "_fast_cross_entropy_with_gradient",
                        lambda *a: used.append("fastmath") or original(*a))
    paths = {"mlx": ("0", "0"), "fastmath": ("1", "0")}
    kernels = native.load()
    if kernels is not None:
        paths["native"] = ("1", "1")
        original_native = kernels.cross_entropy
        monkeypatch.setattr(kernels, "cross_entropy",
                            lambda *a: used.append("native") or original_native(*a))
    runs = {}
    for name, (fast, native_flag) in paths.items():
        used.clear()
        monkeypatch.setenv("MLXTUNE_FASTMATH", fast)
        monkeypatch.setenv("MLXTUNE_NATIVE", native_flag)
        # Length-grouped rows: without the native kernels random batches share rows
        # differently (data.batcher.mix_row_length).
        config = _config_with(workdir, data={"group_by_length": True}, iters=3, eval_every=0)
        code, out = run_cli(["run", str(config), "--run-dir", str(workdir / name), "-q"], capsys)
        assert code == 0, out.err
        runs[name] = adapter_of(workdir / name / "adapters")
        assert set(used) == ({name} - {"mlx"}), (name, used)
    for name in paths.keys() - {"mlx"}:
        for k in runs["mlx"]:  # the bound of the test above
            assert np.abs(runs["mlx"][k] - runs[name][k]).max() < 3e-5, (name, k)


def test_packed_step_equals_unpacked_step(workdir, capsys):
    """One step over the same 4 examples: packed into one row, or a batch of 4 rows."""
    write_jsonl(workdir / "four.jsonl", [chat(i) for i in range(4)])
    results = {}
    for name, (packing, bs) in {"rows": (False, 4), "packed": (True, 1)}.items():
        cfg = yaml.safe_load((workdir / "config.yaml").read_text())
        cfg["data"] = {"train": "four.jsonl", "max_seq_len": 512, "packing": packing}
        cfg["train"].update(iters=1, batch_size=bs, optimizer="sgd", momentum=0.0,
                            learning_rate=0.5, max_grad_norm=None, eval_every=0)
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        code, out = run_cli(["run", str(path), "--run-dir", str(workdir / name)], capsys)
        assert code == 0, out.err
        results[name] = adapter_of(workdir / name / "adapters")
        start = next(e for e in read_events(workdir / name) if e["event"] == "start")
        assert start["packing"] is packing
    assert "4.0 examples a row" in out.err
    for k in results["rows"]:
        np.testing.assert_allclose(results["packed"][k], results["rows"][k], atol=2e-5,
                                   err_msg=k)


def test_schedules():
    from mlxtune.config import TrainConfig

    cos = train_optim.schedule(TrainConfig(learning_rate=1.0, schedule="cosine", warmup=10,
                                           min_lr=0.1), 110)
    assert float(cos(mx.array(0))) == pytest.approx(0.0)
    assert float(cos(mx.array(5))) == pytest.approx(0.5)
    assert float(cos(mx.array(10))) == pytest.approx(1.0)
    assert float(cos(mx.array(60))) == pytest.approx(0.55, abs=1e-3)
    assert float(cos(mx.array(110))) == pytest.approx(0.1, abs=1e-6)
    lin = train_optim.schedule(TrainConfig(learning_rate=1.0, schedule="linear"), 100)
    assert float(lin(mx.array(50))) == pytest.approx(0.5)
    const = train_optim.schedule(TrainConfig(learning_rate=0.3, warmup=4), 100)
    assert float(const(mx.array(2))) == pytest.approx(0.15)
    assert float(const(mx.array(50))) == pytest.approx(0.3)


def test_events_reader_takes_a_run_directory_made_while_it_looked(tmp_path, monkeypatch):
    """A reader polling a run directory that `mlxtune run` creates between the reader's
    is_dir() and its read (seen in CI): the events inside, not IsADirectoryError."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "events.jsonl").write_text(json.dumps({"event": "start"}) + "\n")
    monkeypatch.setattr(Path, "is_dir", lambda self: False)  # as before the mkdir
    assert [e["event"] for e in read_events(run_dir)] == ["start"]


def test_events_reader_tolerates_a_torn_line(tmp_path):
    good = {"event": "train", "time": 1.0, "step": 1, "loss": 2.0}
    (tmp_path / "events.jsonl").write_text(json.dumps(good) + "\n" + '{"event": "tra')
    assert read_events(tmp_path) == [good]
