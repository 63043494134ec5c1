"""DoRA, rsLoRA and LoRA+: the layer against mlx-lm's, training end to end under both
profiles, resume, DPO from a DoRA adapter, evaluation, exports, config errors.

The logits test derives its tolerance from float32 itself: the same function (mlx-lm's
model with the adapter) evaluated in float64 is the reference, mlx-lm's own float32 (or
bfloat16) evaluation is off from it by some amount E, and mlxtune's evaluation must be as
close to the reference as mlx-lm's is (within 2E), hence within 3E of mlx-lm's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten, tree_map

from conftest import expected_compute_dtype
from test_train import chat, run_cli
from tiny import build_model, model_args, write_jsonl

from mlxtune import adapters, backend, models
from mlxtune.config import AdapterConfig, ModelConfig
from mlxtune.train.events import read_events

TOKENS = [[1, 87, 85, 71, 84, 201, 74, 75, 261, 84, 71, 2, 201, 1, 67, 85, 90, 40, 41, 99,
           12, 13, 140, 141, 142, 7, 8, 9, 55, 56],
          [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26,
           27, 28, 29, 30, 31, 32, 33, 34]]


def trained_looking_dora(base: Path, folder: Path, rank: int = 4, alpha: float = 8.0,
                         seed: int = 3, rslora: bool = False) -> None:
    """A DoRA adapter of `base` with non-zero B and magnitudes moved off the base's norms
    (as training leaves them), saved at `folder` by mlxtune."""
    loaded = models.load(ModelConfig(path=str(base), dtype="float32"))
    cfg = adapters.apply(loaded.model, AdapterConfig(type="dora", rank=rank, alpha=alpha,
                                                     rslora=rslora))
    mx.random.seed(seed)
    for _, m in adapters.lora_layers(loaded.model):
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.1
        m.m = m.m * (1 + 0.2 * mx.random.normal(m.m.shape))
    adapters.save(loaded.model, cfg, folder)


def _logits(model) -> np.ndarray:
    out = model(mx.array(TOKENS))
    return np.array(out.astype(mx.float32) if out.dtype != mx.float64 else out, np.float64)


def mlx_lm_logits(base: Path, adapter: Path, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(mlx-lm's logits with the adapter in `dtype`, the same model in float64). mlx-lm
    keeps its adapter's parameters in float32 and computes in the checkpoint's dtype (for
    a bfloat16 one, quantization scales included); the float64 model is mlx-lm's own,
    dequantized (in float32, the scales' dtype here) and cast."""
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    def cast(model, to):
        flat = [(k, v.astype(to) if mx.issubdtype(v.dtype, mx.floating) and
                 (to == mx.float64 or not k.endswith(("lora_a", "lora_b", ".m"))) else v)
                for k, v in tree_flatten(model.parameters())]
        model.load_weights(flat, strict=False)

    model, _ = load(str(base), adapter_path=str(adapter))
    if dtype != mx.float32:
        cast(model, dtype)
    theirs = _logits(model)
    reference, _ = load(str(base), adapter_path=str(adapter))
    reference = dequantize_model(reference)  # also the layers inside DoRALinear
    cast(reference, mx.float64)
    return theirs, _logits(reference)


@pytest.mark.parametrize("base", ["dense", "affine-4bit"])
def test_dora_logits_equal_mlx_lm(base, tiny_model_dir, tiny_quantized_model_dir, tmp_path,
                                  profile):
    """mlxtune's DoRALinear (its norm from r rows through the layer, the model as mlxtune
    loads it for training: its attention, quantized layers and dtypes) against
    mlx_lm.load(base, adapter_path=...) on an adapter mlxtune saved."""
    folder = tiny_model_dir if base == "dense" else tiny_quantized_model_dir
    adapter = tmp_path / "dora"
    trained_looking_dora(folder, adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    assert {k.rsplit(".", 1)[-1] for k in mx.load(str(adapter / "adapters.safetensors"))} \
        == {"lora_a", "lora_b", "m"}

    dtype = backend.compute_dtype("auto")
    loaded = models.load(ModelConfig(path=str(folder)))
    adapters.load(loaded.model, adapter)
    assert all(type(m).__name__ == "DoRALinear" for _, m in adapters.lora_layers(loaded.model))
    assert all(m.m.dtype == mx.float32 for _, m in adapters.lora_layers(loaded.model))
    ours = _logits(loaded.model)
    theirs, reference = mlx_lm_logits(folder, adapter, dtype)

    # The adapter changes the output: the comparison is not of two base models.
    plain = models.load(ModelConfig(path=str(folder)))
    assert np.abs(_logits(plain.model) - reference).max() > 0.1

    e_theirs = np.abs(theirs - reference).max()
    e_ours = np.abs(ours - reference).max()
    diff = np.abs(ours - theirs).max()
    print(f"\n{base} {profile}: |mlx-lm - f64| {e_theirs:.3g}, |mlxtune - f64| {e_ours:.3g}, "
          f"|mlxtune - mlx-lm| {diff:.3g} (logits up to {np.abs(reference).max():.2f})")
    assert e_ours <= 2 * e_theirs
    assert diff <= 3 * e_theirs


def test_dora_norm_without_a_dense_copy_equals_the_direct_norm(tiny_quantized_model_dir):
    """||W + scale (A B).T|| per row from r rows through the layer (quantized here) equals
    the norm of the dequantized matrix plus the update, in float64."""
    loaded = models.load(ModelConfig(path=str(tiny_quantized_model_dir), dtype="float32"))
    adapters.apply(loaded.model, AdapterConfig(type="dora", rank=4, alpha=8))
    mx.random.seed(0)
    (name, layer), *_ = adapters.lora_layers(loaded.model)
    b = mx.random.normal(layer.lora_b.shape) * 0.3
    from mlxtune.export.mlx_fused import dense_weight

    w = np.array(dense_weight(layer.linear), np.float64)
    v = w + layer.scale * (np.array(layer.lora_a, np.float64) @ np.array(b, np.float64)).T
    want = np.sqrt((v ** 2).sum(axis=1))
    got = np.array(layer.adapted_norm(layer.lora_a, b))
    assert np.abs(got / want - 1).max() < 1e-5, name
    # At the start (B = 0) the magnitudes are the base's row norms: the layer is the base.
    np.testing.assert_allclose(np.array(layer.m), np.sqrt((w ** 2).sum(axis=1)), rtol=1e-5)


def test_rslora_scale_and_lora_plus_groups():
    from mlxtune.train.optim import is_lora_plus_b, make_optimizer
    from mlxtune.config import TrainConfig

    model = build_model(model_args())
    cfg = adapters.apply(model, AdapterConfig(rank=16, alpha=8, rslora=True))
    assert cfg["lora_parameters"]["scale"] == pytest.approx(8 / math.sqrt(16))
    assert all(m.scale == pytest.approx(2.0) for _, m in adapters.lora_layers(model))
    model = build_model(model_args())
    adapters.apply(model, AdapterConfig(type="dora", rank=4, alpha=8))
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    fast = [k for k in names if is_lora_plus_b(k)]
    assert fast and all(k.endswith((".lora_b", ".m")) for k in fast)
    assert not any(k.endswith(".lora_a") for k in fast)

    # LoRA+: one Adam step moves B (and m) `ratio` times as far as A would at the same lr.
    t = TrainConfig(learning_rate=1e-2, lora_plus_ratio=16.0, optimizer="adam")
    opt = make_optimizer(t, 10)
    params = model.trainable_parameters()
    opt.init(params)
    grads = tree_map(lambda p: mx.ones_like(p), params)
    new = dict(tree_flatten(opt.apply_gradients(grads, params)))
    old = dict(tree_flatten(params))
    steps = {k: float(mx.abs(new[k] - old[k]).max()) for k in old}
    first = (1 - 0.9) / math.sqrt(1 - 0.999)  # MLX's Adam, step 1, no bias correction
    for k, step in steps.items():
        want = 1e-2 * first * (16.0 if is_lora_plus_b(k) else 1.0)
        assert step == pytest.approx(want, rel=1e-3), k


# ---------------------------------------------------------------------------- end to end


@pytest.fixture
def dora_workdir(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(24)])
    write_jsonl(tmp_path / "valid.jsonl", [chat(i) for i in range(100, 108)])
    write_jsonl(tmp_path / "test.jsonl", [chat(i) for i in range(200, 204)])
    config = {
        "name": "dora",
        "model": {"path": str(tiny_model_dir)},
        "adapter": {"type": "dora", "rank": 4, "alpha": 8},
        "data": {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl",
                 "max_seq_len": 64},
        "train": {"iters": 12, "batch_size": 4, "learning_rate": 3e-3, "eval_every": 4,
                  "save_every": 4, "log_every": 2, "seed": 3, "lora_plus_ratio": 4.0},
        "eval": {"shots": 0, "forgetting": False, "max_new_tokens": 8},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_dora_run_resume_eval_and_mlx_lm(dora_workdir, capsys, profile):
    """A DoRA run with LoRA+ under each profile: it learns, its adapter and optimizer
    state are float32, a run stopped after step 8 and resumed ends where the whole run
    does, its evaluation measures base and tuned apart, and mlx-lm loads the adapter."""
    config = dora_workdir / "config.yaml"
    run_dir = dora_workdir / "run"
    code, out = run_cli(["run", str(config), "--run-dir", str(run_dir)], capsys)
    assert code == 0, out.err
    events = read_events(run_dir)
    start = events[0]
    assert start["compute_dtype"] == expected_compute_dtype(profile)
    assert start["config"]["adapter"]["type"] == "dora"
    vals = [e["loss"] for e in events if e["event"] == "val"]
    assert vals[-1] < vals[0]
    for name in ("adapters/adapters.safetensors", "checkpoints/step-12/optimizer.safetensors"):
        dtypes = {v.dtype for v in mx.load(str(run_dir / name)).values()
                  if mx.issubdtype(v.dtype, mx.floating)}
        assert dtypes == {mx.float32}, (name, dtypes)
    weights = mx.load(str(run_dir / "adapters" / "adapters.safetensors"))
    assert any(k.endswith(".m") for k in weights)
    # LoRA+: two optimizers' states in the checkpoint; the logged lr is A's (the base's).
    opt = mx.load(str(run_dir / "checkpoints/step-12/optimizer.safetensors"))
    assert any(k.startswith("states.1.") for k in opt)
    assert max(e["lr"] for e in events if e["event"] == "train") <= 3e-3 + 1e-9

    # Resume from step 8 (a run stopped there) ends where the uninterrupted one does.
    import shutil

    cut = dora_workdir / "cut"
    shutil.copytree(run_dir, cut)
    shutil.rmtree(cut / "checkpoints" / "step-12")
    shutil.rmtree(cut / "adapters")
    code, out = run_cli(["run", str(config), "--run-dir", str(cut), "--resume", "--no-eval"],
                        capsys)
    assert code == 0, out.err
    a, b = (mx.load(str(d / "adapters" / "adapters.safetensors")) for d in (run_dir, cut))
    tol = 1e-5 if profile == "cpu" else 1e-3
    for k in a:
        assert float(mx.abs(a[k] - b[k]).max()) <= tol, k

    ev = json.loads((run_dir / "eval.json").read_text())
    best = min(e["loss"] for e in events if e["event"] == "val")
    assert ev["tuned"]["loss"] != pytest.approx(ev["base"]["loss"], rel=1e-3)
    assert ev["compute_dtype"] == expected_compute_dtype(profile)
    from mlx_lm import load

    load(str(start["config"]["model"]["path"]), adapter_path=str(run_dir / "adapters"))
    assert best < vals[0]


def test_dpo_from_a_dora_adapter_keeps_its_magnitudes_as_the_reference(tmp_path,
                                                                      tiny_model_dir, capsys,
                                                                      profile):
    """DPO starting from a DoRA adapter: the reference is base + that adapter (a frozen
    copy with its magnitudes), so the first step's rewards are 0 and the policy moves."""
    start = tmp_path / "sft"
    trained_looking_dora(tiny_model_dir, start)
    rows = [{"prompt": f"color {i}?", "chosen": f"the color is {c}", "rejected": "no idea"}
            for i, c in enumerate(["red", "green", "blue", "amber"] * 4)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    write_jsonl(tmp_path / "valid.jsonl", rows[:4])
    config = {"name": "dpo", "model": {"path": str(tiny_model_dir), "adapter": str(start)},
              "objective": {"type": "dpo"},
              "data": {"train": "pairs.jsonl", "valid": "valid.jsonl", "max_seq_len": 64},
              "train": {"iters": 4, "batch_size": 4, "learning_rate": 1e-2, "eval_every": 4,
                        "log_every": 1, "save_every": 0}}
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(config))
    code, out = run_cli(["run", str(tmp_path / "dpo.yaml"), "--run-dir",
                         str(tmp_path / "run"), "--no-eval"], capsys)
    assert code == 0, out.err
    trains = [e for e in read_events(tmp_path / "run") if e["event"] == "train"]
    assert abs(trains[0]["rewards/margins"]) < (1e-3 if profile == "cpu" else 0.05)
    assert trains[-1]["rewards/margins"] > trains[0]["rewards/margins"]
    saved = json.loads((tmp_path / "run" / "adapters" / "adapter_config.json").read_text())
    assert saved["fine_tune_type"] == "dora"


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("setting,match", [
    ({"adapter": {"type": "qlora"}}, "adapter.type: 'qlora' is not one of: lora, dora, full"),
    ({"adapter": {"type": "full"}, "train": {"lora_plus_ratio": 4}},
     "train.lora_plus_ratio: LoRA\\+ sets the learning rate"),
    ({"adapter": {"type": "full", "rslora": True}}, "adapter.rslora: scales a LoRA update"),
    ({"adapter": {"type": "full"}, "model": {"quantize": {"format": "nf4"}}},
     "model.quantize: adapter.type full trains every weight and needs a dense base"),
    ({"adapter": {"type": "full"}, "objective": {"type": "dpo"}},
     "objective.precompute_reference: dpo with adapter.type full needs it true"),
    ({"train": {"lora_plus_ratio": 0.5}}, "train.lora_plus_ratio: must be >= 1.0"),
])
def test_adapter_config_errors_name_the_key(setting, match):
    from mlxtune import config
    from mlxtune.errors import ConfigError

    raw = {"data": {"train": "x.jsonl"}}
    for k, v in setting.items():
        raw.setdefault(k, {}).update(v)
    with pytest.raises(ConfigError, match=match):
        config.from_dict(raw, where="c.yaml")


def test_run_says_what_trains(tiny_quantized_model_dir, tiny_model_dir):
    """`mlxtune run`'s adapter line: DoRA on a quantized base says what it does."""
    loaded = models.load(ModelConfig(path=str(tiny_quantized_model_dir)))
    cfg = adapters.apply(loaded.model, AdapterConfig(type="dora", rank=4, alpha=8))
    line = adapters.describe(loaded.model, cfg)
    assert line.startswith("adapter: DoRA r4, scale 2, on 14 linear layers of the last 2 "
                           "blocks; the base is quantized: the magnitudes start at its "
                           "dequantized rows' norms"), line
    loaded = models.load(ModelConfig(path=str(tiny_model_dir)))
    cfg = adapters.apply(loaded.model, AdapterConfig(rank=16, alpha=8, rslora=True))
    assert adapters.describe(loaded.model, cfg) == \
        "adapter: rsLoRA r16, scale 2, on 14 linear layers of the last 2 blocks"
