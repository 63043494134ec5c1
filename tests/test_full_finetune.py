"""Full fine-tuning (adapter.type full): every weight of the adapted blocks trains, as
float32 master weights whatever the compute dtype; the saved folder is mlx-lm's
fine_tune_type full; run end to end under both profiles, resume, DPO with the reference
precomputed, evaluation against the base, a quantized base refused, the planner's items."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten

from conftest import expected_compute_dtype
from test_dora import TOKENS, _logits, mlx_lm_logits
from test_grpo import grpo_dir  # noqa: F401  (a fixture)
from test_train import chat, run_cli
from tiny import build_model, model_args, write_jsonl

from mlxtune import adapters, backend, models
from mlxtune.config import AdapterConfig, ModelConfig
from mlxtune.train.events import read_events


@pytest.fixture
def full_workdir(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(24)])
    write_jsonl(tmp_path / "valid.jsonl", [chat(i) for i in range(100, 108)])
    write_jsonl(tmp_path / "test.jsonl", [chat(i) for i in range(200, 204)])
    config = {
        "name": "full",
        "model": {"path": str(tiny_model_dir)},
        "adapter": {"type": "full", "layers": 1},
        "data": {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl",
                 "max_seq_len": 64},
        "train": {"iters": 8, "batch_size": 4, "learning_rate": 1e-3, "eval_every": 4,
                  "save_every": 4, "log_every": 2, "seed": 3},
        "eval": {"shots": 0, "forgetting": False, "max_new_tokens": 8},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_master_weights_under_a_16_bit_compute_dtype():
    """The trained blocks hold float32 weights; activations stay bfloat16; the gradient
    reaches the float32 weights; frozen parts keep the compute dtype."""
    model = build_model(model_args())
    model.update(tree_map_floats(model.parameters(), mx.bfloat16))
    cfg = adapters.apply(model, AdapterConfig(type="full", layers=1))
    assert cfg == {"fine_tune_type": "full", "num_layers": 1, "lora_parameters": None}
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all(k.startswith("model.layers.1.") for k in trainable)
    assert {v.dtype for v in trainable.values()} == {mx.float32}
    assert model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16
    x = mx.array([TOKENS[0]])
    h = model.model.embed_tokens(x)
    assert model.layers[1](h, mask="causal", cache=None).dtype == mx.bfloat16

    def loss(m):
        return m(x).astype(mx.float32).sum()

    _, grads = nn.value_and_grad(model, loss)(model)
    grads = dict(tree_flatten(grads))
    assert grads.keys() == trainable.keys()
    assert {g.dtype for g in grads.values()} == {mx.float32}
    assert all(float(mx.abs(g).max()) > 0 for g in grads.values())


def tree_map_floats(tree, dtype):
    from mlx.utils import tree_map

    return tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                    tree)


def test_full_run_resume_eval_and_mlx_lm(full_workdir, capsys, profile):
    """A full fine-tune of the last block under each profile: it learns; adapters/ is
    mlx-lm's fine_tune_type full with the block's weights in float32 (with the optimizer
    state); mlx-lm loads it and computes mlxtune's logits (within float rounding, derived
    as in test_dora); a run stopped at step 4 and resumed ends where the whole run does;
    eval compares it with the base; mlx-fused loads in mlx-lm with the same logits."""
    config = full_workdir / "config.yaml"
    run_dir = full_workdir / "run"
    code, out = run_cli(["run", str(config), "--run-dir", str(run_dir)], capsys)
    assert code == 0, out.err
    events = read_events(run_dir)
    start = events[0]
    assert start["compute_dtype"] == expected_compute_dtype(profile)
    blocks = build_model(model_args())
    block_params = sum(v.size for _, v in tree_flatten(blocks.layers[1].parameters()))
    assert start["trainable_params"] == block_params
    vals = [e["loss"] for e in events if e["event"] == "val"]
    assert vals[-1] < vals[0]
    saved = json.loads((run_dir / "adapters" / "adapter_config.json").read_text())
    assert saved["fine_tune_type"] == "full" and saved["num_layers"] == 1
    weights = mx.load(str(run_dir / "adapters" / "adapters.safetensors"))
    assert weights.keys() == {f"model.layers.1.{k}" for k, _ in
                              tree_flatten(blocks.layers[1].parameters())}
    for name in ("adapters/adapters.safetensors", "checkpoints/step-8/optimizer.safetensors"):
        assert {v.dtype for v in mx.load(str(run_dir / name)).values()
                if mx.issubdtype(v.dtype, mx.floating)} == {mx.float32}

    base = Path(start["config"]["model"]["path"])
    loaded = models.load(ModelConfig(path=str(base)))
    adapters.load(loaded.model, run_dir / "adapters")
    ours = _logits(loaded.model)
    theirs, reference = mlx_lm_logits(base, run_dir / "adapters",
                                      backend.compute_dtype("auto"))
    e_theirs = np.abs(theirs - reference).max()
    with capsys.disabled():
        print(f"\nfull {profile}: |mlx-lm - f64| {e_theirs:.3g}, |mlxtune - f64| "
              f"{np.abs(ours - reference).max():.3g}, |mlxtune - mlx-lm| "
              f"{np.abs(ours - theirs).max():.3g} (logits up to "
              f"{np.abs(reference).max():.2f})")
    assert np.abs(ours - reference).max() <= 2 * e_theirs
    assert np.abs(ours - theirs).max() <= 3 * e_theirs
    plain = models.load(ModelConfig(path=str(base)))
    assert np.abs(_logits(plain.model) - reference).max() > 0.05

    # Resume from step 4.
    cut = full_workdir / "cut"
    shutil.copytree(run_dir, cut)
    shutil.rmtree(cut / "checkpoints" / "step-8")
    shutil.rmtree(cut / "adapters")
    code, out = run_cli(["run", str(config), "--run-dir", str(cut), "--resume", "--no-eval"],
                        capsys)
    assert code == 0, out.err
    a, b = (mx.load(str(d / "adapters" / "adapters.safetensors")) for d in (run_dir, cut))
    tol = 1e-5 if profile == "cpu" else 1e-3
    assert max(float(mx.abs(a[k] - b[k]).max()) for k in a) <= tol

    # eval: the base side swaps the base's weights back in.
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["tuned"]["loss"] < ev["base"]["loss"]

    if profile == "cpu":
        from mlx_lm import load as mlx_lm_load
        from mlxtune.export import export

        folder = export(run_dir, "mlx-fused", full_workdir / "fused", adapter="final",
                        outtype="f32").path
        model, _ = mlx_lm_load(str(folder))
        fused = _logits(model)
        assert np.abs(fused - theirs).max() <= 3 * e_theirs


def test_dpo_with_full_fine_tuning_precomputes_the_reference(tmp_path, tiny_model_dir,
                                                             capsys, profile):
    rows = [{"prompt": f"color {i}?", "chosen": f"the color is {c}", "rejected": "no idea"}
            for i, c in enumerate(["red", "green", "blue", "amber"] * 4)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    write_jsonl(tmp_path / "valid.jsonl", rows[:4])
    config = {"name": "dpo", "model": {"path": str(tiny_model_dir)},
              "adapter": {"type": "full", "layers": 1},
              "objective": {"type": "dpo", "precompute_reference": True},
              "data": {"train": "pairs.jsonl", "valid": "valid.jsonl", "max_seq_len": 64},
              "train": {"iters": 4, "batch_size": 4, "learning_rate": 1e-3, "eval_every": 4,
                        "log_every": 1, "save_every": 2}}
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    code, out = run_cli(["run", str(tmp_path / "dpo.yaml"), "--run-dir", str(run_dir),
                         "--no-eval"], capsys)
    assert code == 0, out.err
    trains = [e for e in read_events(run_dir) if e["event"] == "train"]
    assert abs(trains[0]["rewards/margins"]) < (1e-4 if profile == "cpu" else 0.05)
    assert trains[-1]["rewards/margins"] > trains[0]["rewards/margins"]
    assert len(list((run_dir / "reference").glob("*.npy"))) == 2

    # Resuming reads the cache back; without it, one line: it cannot be recomputed.
    shutil.rmtree(run_dir / "checkpoints" / "step-4")
    shutil.rmtree(run_dir / "reference")
    code, out = run_cli(["run", str(tmp_path / "dpo.yaml"), "--run-dir", str(run_dir),
                         "--resume", "--no-eval"], capsys)
    assert code != 0 and "cannot be recomputed after its first step" in out.err, out.err


def test_a_quantized_base_is_refused_before_anything_is_written(full_workdir,
                                                                tiny_quantized_model_dir,
                                                                capsys):
    cfg = yaml.safe_load((full_workdir / "config.yaml").read_text())
    cfg["model"]["path"] = str(tiny_quantized_model_dir)
    (full_workdir / "q.yaml").write_text(yaml.safe_dump(cfg))
    code, out = run_cli(["run", str(full_workdir / "q.yaml"), "--run-dir",
                         str(full_workdir / "run")], capsys)
    assert code != 0
    assert "adapter.type: full trains every weight and needs a dense base" in out.err
    assert len(out.err.strip().splitlines()) == 1, out.err
    assert not (full_workdir / "run").exists()
    code, out = run_cli(["plan", str(full_workdir / "q.yaml")], capsys)
    assert code != 0 and "needs a dense base" in out.err, out.err


def test_planner_counts_the_trained_weights(tiny_model_dir):
    """The planner's trained weights equal the trainer's, with float32 weights, gradients
    and two Adam states; on a Mac (bfloat16) a compute copy beside the master weights."""
    from mlxtune import config
    from mlxtune.memory.estimate import estimate, workload
    from mlxtune.memory.shapes import resolve

    raw = {"model": {"path": str(tiny_model_dir)}, "adapter": {"type": "full", "layers": 1},
           "data": {"train": "x.jsonl", "max_seq_len": 64}}
    cfg = config.from_dict(raw)
    loaded = models.load(cfg.model)
    adapters.apply(loaded.model, cfg.adapter)
    trainable, _ = adapters.parameter_counts(loaded.model)
    cpu = workload(cfg, resolve(cfg.model), "cpu")
    assert cpu.trainable_parameters == trainable and cpu.lora_parameters == 0
    items = estimate(cpu).items
    assert items["gradients"] == 4 * trainable
    assert items["LoRA adapter"] == 0
    mac = workload(cfg, resolve(cfg.model), "metal")
    dense_bf16 = sum(w.nbytes for w in mac.weights)
    # float32 masters (4 bytes) and a bfloat16 copy (2 bytes) instead of 2 bytes a weight
    assert estimate(mac).items["base weights"] == dense_bf16 + 4 * trainable
    # With checkpointing only the block being recomputed holds its copy (both blocks here).
    ckpt = config.from_dict({**raw, "adapter": {"type": "full"},
                             "train": {"grad_checkpoint": True}})
    w = workload(ckpt, resolve(ckpt.model), "metal")
    n = w.trainable_parameters
    assert estimate(w).items["base weights"] == dense_bf16 + 2 * n + 2 * (n / 2)


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_two_ranks_match_one_process(tmp_path, tiny_model_dir, capsys, kind):
    """DoRA and full fine-tuning under mlx.launch (two ranks on a loopback ring): the same
    loss curves and weights as one process at the same global batch."""
    from test_distributed import chat as dp_chat, curve, launch, run_here

    write_jsonl(tmp_path / "train.jsonl", [dp_chat(i) for i in range(29)])
    write_jsonl(tmp_path / "valid.jsonl", [dp_chat(i) for i in range(100, 110)])
    config = {"name": "tiny", "model": {"path": str(tiny_model_dir)},
              "adapter": {"type": kind, "rank": 4, "alpha": 8, "layers": 1},
              "data": {"train": "train.jsonl", "valid": "valid.jsonl", "max_seq_len": 64,
                       "packing": False, "group_by_length": True},
              "train": {"iters": 6, "batch_size": 4, "learning_rate": 1e-3, "eval_every": 3,
                        "save_every": 3, "log_every": 1, "seed": 3}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    one, two = tmp_path / "one", tmp_path / "two"
    code, err = run_here("run", str(tmp_path / "config.yaml"), "--run-dir", str(one), "-q",
                         capsys=capsys)
    assert code == 0, err
    done = launch("run", str(tmp_path / "config.yaml"), "--run-dir", str(two))
    assert done.returncode == 0 and (two / "adapters").is_dir(), done.stdout + done.stderr
    for what in ("train", "val"):
        a, b = curve(one, what), curve(two, what)
        assert [s for s, _ in a] == [s for s, _ in b] and a
        assert max(abs(x - y) / abs(x) for (_, x), (_, y) in zip(a, b)) <= 1e-3, (a, b)
    wa, wb = (mx.load(str(d / "adapters" / "adapters.safetensors")) for d in (one, two))
    assert wa.keys() == wb.keys()
    assert max(float(mx.abs(wa[k] - wb[k]).max()) for k in wa) <= 1e-4


def test_tui_plan_view_offers_each_type(tiny_model_dir):
    """The plan view's adapter knob cycles lora / dora / full, and the planner answers
    each (the view shows the same object `mlxtune plan --json` prints)."""
    from mlxtune import config, memory
    from mlxtune.tui.plan_view import knobs, plan_config

    (adapter,) = [k for k in knobs() if k.key == "adapter.type"]
    assert tuple(adapter.ladder) == ("lora", "dora", "full")
    cfg = config.from_dict({"model": {"path": str(tiny_model_dir)},
                            "data": {"train": "x.jsonl", "max_seq_len": 64}})
    peaks = {}
    for kind in adapter.ladder:
        changed = memory.with_changes(cfg, {"adapter.type": kind})
        plan = plan_config(changed, 16.0)
        peaks[kind] = memory.plan(changed, usable_gb=16.0).mac.items
        label = {"lora": "LoRA rank", "dora": "DoRA rank", "full": "full fine-tuning"}[kind]
        assert any(line.startswith(label) for line in plan["assumptions"]), kind
    assert peaks["full"]["gradients"] > peaks["dora"]["gradients"] > peaks["lora"]["gradients"]
    assert peaks["dora"]["activations"] > peaks["lora"]["activations"]


@pytest.mark.parametrize("kind,beta", [("dora", 0.01), ("full", 0.0)])
def test_grpo_trains_dora_and_full(grpo_dir, capsys, kind, beta):
    """GRPO with DoRA (its KL term to the base: the adapter switched off) and with full
    fine-tuning (no KL term: with one it would need a second copy of the weights, which
    the config refuses); the reward rises either way."""
    from test_grpo import trains

    run_dir = grpo_dir / f"run-{kind}"
    lr = "1e-2" if kind == "dora" else "1e-3"
    code, out = run_cli(["run", str(grpo_dir / "config.yaml"), "--run-dir", str(run_dir),
                         "--set", f"adapter.type={kind}", "--set", f"objective.beta={beta}",
                         "--set", "train.iters=12", "--set", f"train.learning_rate={lr}",
                         "--set", "adapter.layers=1"], capsys)
    assert code == 0, out.err
    events = trains(run_dir)
    assert np.mean([e["reward"] for e in events[-3:]]) > np.mean(
        [e["reward"] for e in events[:2]]), [e["reward"] for e in events]
    if beta:
        assert events[0]["kl"] == pytest.approx(0, abs=1e-6)  # DoRA starts as the base
    saved = json.loads((run_dir / "adapters" / "adapter_config.json").read_text())
    assert saved["fine_tune_type"] == kind
    code, out = run_cli(["run", str(grpo_dir / "config.yaml"), "--run-dir",
                         str(grpo_dir / "refused"), "--set", "adapter.type=full",
                         "--set", "objective.beta=0.04"], capsys)
    assert code != 0 and "objective.beta: grpo's KL term with adapter.type full" in out.err
    assert not (grpo_dir / "refused").exists()
