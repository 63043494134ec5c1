"""Data parallelism (mlxtune.train.distributed): two ranks over MLX's ring backend on
loopback, started by mlx.launch as a user would, against one process at the same global
batch; and bad input, with the ranks started directly (MLX_RANK / MLX_HOSTFILE, what
mlx.launch sets) so each rank's exit code and output can be checked on its own."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from mlxtune.cli import main
from mlxtune.train.events import read_events
from tiny import save_random_adapter, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).with_name("mlx.launch")
# Two ranks share this machine's cores: one BLAS thread each keeps them from fighting.
RANK_ENV = {"OPENBLAS_NUM_THREADS": "1"}
COLORS = ["red", "green", "blue", "amber", "violet"]


def chat(i: int) -> dict:
    return {"messages": [
        {"role": "user", "content": f"color {i}?"},
        {"role": "assistant", "content": f"the color is {COLORS[i % 5]}" + " and more" * (i % 4)}]}


def pair(i: int) -> dict:
    return {"prompt": [{"role": "user", "content": f"color {i}?"}],
            "chosen": [{"role": "assistant", "content": f"the color is {COLORS[i % 5]}"}],
            "rejected": [{"role": "assistant",
                          "content": f"well, I think it could be {COLORS[(i + 2) % 5]} or so"}],
            "user": f"u{i % 7}"}


@pytest.fixture
def workdir(tmp_path, tiny_model_dir):
    # 29 examples in batches of 4: one batch of an epoch holds a single example, so one
    # rank has no share of it (World.shard's stand-in) within the first 10 steps.
    write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(29)])
    write_jsonl(tmp_path / "valid.jsonl", [chat(i) for i in range(100, 110)])
    config = {
        "name": "tiny",
        "model": {"path": str(tiny_model_dir)},
        "adapter": {"rank": 4, "alpha": 8},
        "data": {"train": "train.jsonl", "valid": "valid.jsonl", "max_seq_len": 64,
                 "packing": False},
        "train": {"iters": 10, "batch_size": 4, "learning_rate": 3e-3, "eval_every": 5,
                  "save_every": 5, "log_every": 1, "seed": 3},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


# ----------------------------------------------------------------------------- helpers


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair() -> int:
    """p with p and p + 1 free (mlx.launch's ring gives rank r port p + r)."""
    for _ in range(200):
        p = random.randint(20000, 60000)
        if _free(p) and _free(p + 1):
            return p
    raise RuntimeError("no two consecutive free ports")


def launch(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`mlx.launch -n 2 --backend ring ... -- -m mlxtune ARGS` from the repository root.
    mlx.launch (MLX 0.32) exits 0 even when a rank fails: callers check what was written."""
    launcher = LAUNCH if LAUNCH.exists() else shutil.which("mlx.launch")
    assert launcher, "mlx.launch (installed with mlx) is not beside this Python nor on PATH"
    env_args = [a for k, v in RANK_ENV.items() for a in ("--env", f"{k}={v}")]
    cmd = [str(launcher), "-n", "2", "--backend", "ring", "--starting-port",
           str(free_port_pair()), *env_args, "--python", sys.executable, "--",
           "-m", "mlxtune", *args]
    # In a session of its own, so that a hang is ended with the ranks, not just the launcher.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def spawn_ranks(tmp_path: Path, per_rank: list[list[str]], timeout: int = 180) -> list:
    """Start one `python -m mlxtune ARGS` per rank on a loopback ring, as mlx.launch would;
    [(exit code, stdout, stderr)] per rank. A rank still running after `timeout` fails
    the test (a hang)."""
    ports = []
    while len(ports) < len(per_rank):
        p = random.randint(20000, 60000)
        if p not in ports and _free(p):
            ports.append(p)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    procs = []
    for rank, args in enumerate(per_rank):
        env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile), **RANK_ENV)
        procs.append(subprocess.Popen([sys.executable, "-m", "mlxtune", *args], cwd=ROOT,
                                      env=env, stdin=subprocess.DEVNULL, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def run_here(*args: str, capsys) -> tuple[int, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def curve(run_dir: Path, kind: str) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in read_events(run_dir) if e["event"] == kind]


def adapter_of(path: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path / "adapters.safetensors")).items()}


def assert_same_run(one: Path, two: Path, rel: float = 1e-3, atol: float = 1e-4) -> dict:
    """The loss curves (train and validation) within `rel`, the same tokens at every
    step, the final and best adapters within `atol`. Returns the largest differences."""
    worst = {}
    for kind in ("train", "val"):
        a, b = curve(one, kind), curve(two, kind)
        assert [s for s, _ in a] == [s for s, _ in b] and a, kind
        worst[kind] = max(abs(x - y) / abs(x) for (_, x), (_, y) in zip(a, b))
        assert worst[kind] <= rel, (kind, a, b)
    tokens = [[e["tokens"] for e in read_events(d) if e["event"] == "train"] for d in (one, two)]
    assert tokens[0] == tokens[1]
    for folder in ("adapters", "best"):
        a, b = adapter_of(one / folder), adapter_of(two / folder)
        assert a.keys() == b.keys()
        worst[folder] = max(float(np.abs(a[k] - b[k]).max()) for k in a)
        assert worst[folder] <= atol, (folder, worst)
    # It trained: the adapter moved from its zero start.
    assert any(np.abs(v).max() > 1e-2 for k, v in adapter_of(two / "adapters").items()
               if k.endswith("lora_b"))
    return worst


# ----------------------------------------------------------------------------- agreement


# Random batches: each rank lays its share out in rows of its own, so the rows differ from
# the single process's and so does the float rounding of near-zero gradients, which AdamW
# turns into whole steps; SGD keeps the comparison tight.
@pytest.mark.parametrize("sets", [["data.group_by_length=true"],
                                  ["data.group_by_length=false", "train.optimizer=sgd",
                                   "train.momentum=0", "train.learning_rate=0.5"]],
                         ids=["by_length", "random"])
def test_two_ranks_match_one_process(workdir, capsys, sets):
    config = str(workdir / "config.yaml")
    sets = [a for s in sets for a in ("--set", s)]
    code, err = run_here("run", config, "--run-dir", str(workdir / "one"), "-q", *sets,
                         capsys=capsys)
    assert code == 0, err
    two = workdir / "two"
    done = launch("run", config, "--run-dir", str(two), *sets)
    assert done.returncode == 0 and (two / "adapters").is_dir(), done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.split() == [str(two)]  # rank 0 alone reports
    assert "data parallel: 2 ranks, 2 of each batch per rank" in done.stderr
    worst = assert_same_run(workdir / "one", two)
    print(f"two ranks vs one process: {worst}")
    # Rank 0 alone wrote: one start event, which knows the ranks; checkpoints record them.
    events = read_events(two)
    assert [e["event"] for e in events].count("start") == 1
    assert events[0]["ranks"] == 2 and events[-1]["reason"] == "done"
    state = json.loads((two / "checkpoints" / "step-10" / "state.json").read_text())
    assert state["ranks"] == 2 and state["step"] == 10


@pytest.mark.slow
def test_packed_rows_with_grad_accumulation(workdir, capsys):
    sets = ["--set", "data.packing=true", "--set", "data.max_seq_len=128",
            "--set", "train.grad_accumulation=2"]
    config = str(workdir / "config.yaml")
    code, err = run_here("run", config, "--run-dir", str(workdir / "one"), *sets,
                         capsys=capsys)
    assert code == 0, err
    assert "packed rows" in err
    done = launch("run", config, "--run-dir", str(workdir / "two"), "-q", *sets)
    assert done.returncode == 0 and (workdir / "two" / "adapters").is_dir(), done.stderr
    assert read_events(workdir / "two")[0]["packing"] is True
    print(f"packed, grad accumulation 2: {assert_same_run(workdir / 'one', workdir / 'two')}")


@pytest.mark.slow
@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_two_ranks_match_one_process(tmp_path, tiny_model_dir, capsys, precompute):
    write_jsonl(tmp_path / "pairs.jsonl", [pair(i) for i in range(30)])
    save_random_adapter(tmp_path / "sft")  # a starting adapter: the reference is not the base
    config = {
        "name": "tiny-dpo",
        "model": {"path": str(tiny_model_dir), "adapter": str(tmp_path / "sft")},
        "adapter": {"rank": 4, "alpha": 8},
        "data": {"path": "pairs.jsonl", "split": {"by": "user", "valid": 0.3, "test": 0.0},
                 "max_seq_len": 96},
        "objective": {"type": "dpo", "beta": 0.1, "precompute_reference": precompute},
        "train": {"iters": 10, "batch_size": 4, "learning_rate": 5e-4, "eval_every": 5,
                  "save_every": 5, "log_every": 1, "seed": 1},
    }
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(config))
    code, err = run_here("run", str(tmp_path / "dpo.yaml"), "--run-dir", str(tmp_path / "one"),
                         "-q", "--no-eval", capsys=capsys)
    assert code == 0, err
    done = launch("run", str(tmp_path / "dpo.yaml"), "--run-dir", str(tmp_path / "two"), "-q",
                  "--no-eval")
    assert done.returncode == 0 and (tmp_path / "two" / "adapters").is_dir(), done.stderr
    worst = assert_same_run(tmp_path / "one", tmp_path / "two")
    print(f"dpo, precompute_reference={precompute}: {worst}")
    for name in ("rewards/accuracies", "rewards/margins", "logps/chosen"):
        a, b = [[e[name] for e in read_events(d) if e["event"] == "train"]
                for d in (tmp_path / "one", tmp_path / "two")]
        if name == "rewards/accuracies":
            # At step 1 policy and reference are the same adapter: every reward is 0 up to
            # rounding (a rank's shard pads to another width), so "chosen > rejected" is a
            # coin toss there.
            a, b = a[1:], b[1:]
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4, err_msg=name)
    assert (tmp_path / "two" / "reference").is_dir() == precompute


@pytest.mark.slow
def test_resume_with_two_ranks_and_refuse_one(workdir, capsys):
    config = str(workdir / "config.yaml")
    # Length-grouped rows, laid out alike by one process and two ranks (AdamW: see above).
    grouped = ["--set", "data.group_by_length=true"]
    code, err = run_here("run", config, "--run-dir", str(workdir / "one"), "-q", *grouped,
                         capsys=capsys)
    assert code == 0, err
    two = workdir / "two"
    first = launch("run", config, "--run-dir", str(two), "-q", "--set", "train.iters=5",
                   *grouped)
    assert first.returncode == 0 and (two / "checkpoints" / "step-5").is_dir(), first.stderr
    # Rank 0 reads the checkpoint and hands weights, optimizer state and position over.
    again = launch("run", config, "--run-dir", str(two), "-q", "--resume",
                   "--set", "train.iters=10", *grouped)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    assert read_events(two)[-1]["reason"] == "done"
    worst = assert_same_run(workdir / "one", two)
    code, err = run_here("run", config, "--run-dir", str(two), "--resume", *grouped,
                         capsys=capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"mlxtune: error: --resume: {two / 'checkpoints' / 'step-10'} was trained with 2 "
        "ranks and this run has 1; resume it with mlx.launch with 2 ranks"]
    print(f"two ranks, stopped at 5 and resumed: {worst}")


# ----------------------------------------------------------------------------- bad input


def assert_every_rank_says(results, line: str) -> None:
    """Each rank exits non-zero with exactly this one line on stderr, nothing on stdout."""
    for rank, (code, out, err) in enumerate(results):
        assert code == 2, (rank, code, err)
        assert err.strip().splitlines() == [f"mlxtune: error: {line}"], (rank, err)
        assert out == "", (rank, out)


def test_batch_not_divisible_by_ranks(workdir):
    config = str(workdir / "config.yaml")
    args = ["run", config, "--run-dir", str(workdir / "run"), "--set", "train.batch_size=5"]
    results = spawn_ranks(workdir, [args, args])
    assert_every_rank_says(results, f"{config}: train.batch_size: 5 is the global batch, "
                           "split evenly among the 2 ranks; make it a multiple of 2 (4 or 6)")
    assert not (workdir / "run").exists()


def test_ranks_disagree_on_the_config(workdir):
    config = str(workdir / "config.yaml")
    base = ["run", config, "--run-dir", str(workdir / "run")]
    results = spawn_ranks(workdir, [base, [*base, "--set", "train.learning_rate=0.01",
                                           "--set", "adapter.dropout=0.1"]])
    assert_every_rank_says(results, f"{config}: the ranks disagree on adapter.dropout, "
                           "train.learning_rate (rank 1 differs from rank 0); every rank must "
                           "run the same configuration on the same data and model")
    assert not (workdir / "run").exists()


@pytest.mark.slow
def test_ranks_disagree_on_the_data(workdir):
    # The same config keys, but rank 1's file holds other examples (another machine's copy).
    config = str(workdir / "config.yaml")
    other = workdir / "elsewhere"
    other.mkdir()
    write_jsonl(other / "train.jsonl", [chat(i) for i in range(1, 30)])
    cfg = yaml.safe_load((workdir / "config.yaml").read_text())
    cfg["data"].update(train=str(other / "train.jsonl"), valid=str(workdir / "valid.jsonl"))
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    results = spawn_ranks(workdir, [["run", config, "--run-dir", str(workdir / "run")],
                                    ["run", str(other / "config.yaml"), "--run-dir",
                                     str(workdir / "run")]])
    for (code, out, err), where in zip(results, (config, other / "config.yaml")):
        # Each rank names its own config file.
        assert code == 2 and out == "", err
        assert err.strip().splitlines() == [
            f"mlxtune: error: {where}: the ranks disagree on data.train (tokens and loss "
            "masks) (rank 1 differs from rank 0); every rank must run the same configuration "
            "on the same data and model"], err


@pytest.mark.slow
def test_a_failure_on_one_rank_stops_every_rank(workdir):
    # Rank 1 cannot read its config (a machine without the file): rank 0, already waiting
    # for it, exits with rank 1's line instead of hanging.
    config = str(workdir / "config.yaml")
    missing = str(workdir / "missing.yaml")
    results = spawn_ranks(workdir, [["run", config, "--run-dir", str(workdir / "run")],
                                    ["run", missing, "--run-dir", str(workdir / "run")]])
    assert_every_rank_says(results, f"rank 1: {missing}: config file not found")
    # And a bad data line on rank 1 only, found after rank 0 has loaded its model.
    bad = workdir / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text(json.dumps(chat(0)) + "\n{not json\n")
    cfg = yaml.safe_load((workdir / "config.yaml").read_text())
    cfg["data"].update(train=str(bad / "train.jsonl"), valid=str(workdir / "valid.jsonl"))
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    results = spawn_ranks(workdir, [["run", config, "--run-dir", str(workdir / "run")],
                                    ["run", str(bad / "config.yaml"), "--run-dir",
                                     str(workdir / "run")]])
    for code, _, err in results:
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"mlxtune: error: rank 1: {bad / 'train.jsonl'}:2:"), err
    assert not (workdir / "run").exists()
