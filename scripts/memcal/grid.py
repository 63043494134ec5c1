"""The calibration grid of scripts/calibrate_memory.py: its configurations, the models they
train (built once into the cache folder), and the data and config each one trains on."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from memcal import CACHE, ROOT

WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone "
         "cloud forest ember quiet rapid golden silver window garden harbor meadow").split()

# ---------------------------------------------------------------------------- the grid

TINY = {"hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 512,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8192}
MEDIUM = {"hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 2048,
          "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 32000}


def tiny(**over) -> dict:
    return {"tiny": {**TINY, **over}}


def fit_grid() -> list[dict]:
    base = {"seq": 256, "batch": 4}
    grid = []

    def add(name, model, **kw):
        grid.append({"name": f"fit-{name}", "part": "fit", "model": model, **{**base, **kw}})

    for layers in (2, 6):
        add(f"base-{layers}l", tiny(num_hidden_layers=layers))
        add(f"ffn1024-{layers}l", tiny(num_hidden_layers=layers, intermediate_size=1024))
        add(f"d512-{layers}l", tiny(num_hidden_layers=layers, hidden_size=512,
                                   num_attention_heads=8, num_key_value_heads=4))
        add(f"seq512-{layers}l", tiny(num_hidden_layers=layers), seq=512)
        add(f"vocab32k-{layers}l", tiny(num_hidden_layers=layers, vocab_size=32768))
        add(f"ckpt-{layers}l", tiny(num_hidden_layers=layers), set={"train.grad_checkpoint": True})
        add(f"chunked-{layers}l", tiny(num_hidden_layers=layers), seq=1024,
            set={"train.loss_chunk": 2048})
        add(f"bf16-{layers}l", tiny(num_hidden_layers=layers), set={"model.dtype": "bfloat16"})
        add(f"q4-{layers}l", tiny(num_hidden_layers=layers),
            set={"model.quantize": {"format": "affine", "bits": 4, "group_size": 64}})
    add("kv4-6l", tiny(num_hidden_layers=6, num_key_value_heads=4))
    add("headdim128-6l", tiny(num_hidden_layers=6, head_dim=128))
    add("seq1024-b1-6l", tiny(num_hidden_layers=6), seq=1024, batch=1)
    add("b1-6l", tiny(num_hidden_layers=6), batch=1)
    add("b8-2l", tiny(), batch=8)
    add("rank64-6l", tiny(num_hidden_layers=6), set={"adapter.rank": 64})
    add("qv-6l", tiny(num_hidden_layers=6), set={"adapter.targets": ["q_proj", "v_proj"]})
    add("odown-6l", tiny(num_hidden_layers=6), set={"adapter.targets": ["o_proj", "down_proj"]})
    add("vocab512-6l", tiny(num_hidden_layers=6, vocab_size=512))
    add("last2-6l", tiny(num_hidden_layers=6), set={"adapter.layers": 2})
    add("ckpt-ffn1024-6l", tiny(num_hidden_layers=6, intermediate_size=1024),
        set={"train.grad_checkpoint": True})
    add("ckpt-seq512-6l", tiny(num_hidden_layers=6), seq=512,
        set={"train.grad_checkpoint": True})
    add("ckpt-vocab32k-6l", tiny(num_hidden_layers=6, vocab_size=32768),
        set={"train.grad_checkpoint": True})
    add("chunked4-2l", tiny(), seq=1024, batch=8)
    add("nf4-6l", tiny(num_hidden_layers=6), set={"model.quantize": {"format": "nf4"}})
    for layers in (4, 12):  # dequantized copies of many layers (the CPU path)
        add(f"q4-medium-{layers}l", {"tiny": {**MEDIUM, "num_hidden_layers": layers}},
            batch=2, set={"model.quantize": {"format": "affine", "bits": 4, "group_size": 64}})
    for layers in (4, 12):
        add(f"q4-medium-ckpt-{layers}l", {"tiny": {**MEDIUM, "num_hidden_layers": layers}},
            batch=2, set={"model.quantize": {"format": "affine", "bits": 4, "group_size": 64},
                          "train.grad_checkpoint": True})
    add("q4-medium-seq1024-4l", {"tiny": {**MEDIUM, "num_hidden_layers": 4}}, batch=1,
        seq=1024, set={"model.quantize": {"format": "affine", "bits": 4, "group_size": 64}})
    add("nf4-medium-12l", {"tiny": MEDIUM}, batch=2, set={"model.quantize": {"format": "nf4"}})
    add("dpo-6l", tiny(num_hidden_layers=6), batch=2, data="pref", set={"objective.type": "dpo"})
    add("orpo-6l", tiny(num_hidden_layers=6), batch=2, data="pref",
        set={"objective.type": "orpo"})
    # adapter.type dora / full: their own counts (saved_dora, full_update) come from these
    for layers in (2, 6):
        add(f"dora-{layers}l", tiny(num_hidden_layers=layers), set={"adapter.type": "dora"})
        add(f"full-{layers}l", tiny(num_hidden_layers=layers), set={"adapter.type": "full"})
    # Full fine-tuning's count multiplies the trained weights: models where they weigh.
    add("full-medium-4l", {"tiny": {**MEDIUM, "num_hidden_layers": 4}}, batch=2,
        set={"adapter.type": "full"})
    add("full-medium-8l-b1", {"tiny": {**MEDIUM, "num_hidden_layers": 8}}, batch=1,
        set={"adapter.type": "full"})
    return grid


def check_grid() -> list[dict]:
    smol = {"packaged": "smollm2-135m-instruct"}
    dense = {"smollm2_dense": True}
    medium = {"tiny": MEDIUM}
    mixed = {"gguf": {**TINY, "hidden_size": 512, "num_hidden_layers": 8,
                      "intermediate_size": 1536, "num_attention_heads": 8,
                      "num_key_value_heads": 4},
             "types": {"self_attn": "Q4_K", "mlp.down_proj": "Q6_K", "mlp": "Q5_K",
                       "embed_tokens": "Q8_0"}}
    grid = [
        ("smollm2-gguf-sft", smol, {"seq": 256, "batch": 4}),
        ("smollm2-gguf-r16-seq512", smol, {"seq": 512, "batch": 4,
                                           "set": {"adapter.rank": 16}}),
        ("smollm2-gguf-ckpt-seq1024", smol, {"seq": 1024, "batch": 2,
                                             "set": {"train.grad_checkpoint": True}}),
        ("smollm2-gguf-chunked", smol, {"seq": 1024, "batch": 2,
                                        "set": {"train.loss_chunk": 1024}}),
        ("smollm2-gguf-dpo", smol, {"seq": 256, "batch": 2, "data": "pref",
                                    "set": {"objective.type": "dpo"}}),
        ("smollm2-gguf-qv-r64-accum2", smol, {"seq": 512, "batch": 4, "set": {
            "adapter.targets": ["q_proj", "v_proj"], "adapter.rank": 64,
            "train.grad_accumulation": 2}}),
        ("smollm2-gguf-microbatches", smol, {"seq": 512, "batch": 4, "set": {
            "train.max_batch_tokens": 1024}}),
        ("smollm2-dense-sft", dense, {"seq": 512, "batch": 2}),
        ("smollm2-affine4", dense, {"seq": 512, "batch": 2, "set": {
            "model.quantize": {"format": "affine", "bits": 4, "group_size": 64}}}),
        ("smollm2-nf4-ckpt", dense, {"seq": 256, "batch": 4, "set": {
            "model.quantize": {"format": "nf4"}, "train.grad_checkpoint": True}}),
        ("medium-packed", medium, {"seq": 1024, "batch": 2, "data": "short",
                                   "set": {"data.packing": True}}),
        ("medium-orpo-r32", medium, {"seq": 512, "batch": 2, "data": "pref",
                                     "set": {"objective.type": "orpo", "adapter.rank": 32}}),
        ("medium-bf16", medium, {"seq": 256, "batch": 2, "set": {"model.dtype": "bfloat16"}}),
        ("gguf-kquants-mixed", mixed, {"seq": 512, "batch": 4}),
        ("smollm2-dense-dora", dense, {"seq": 512, "batch": 2,
                                       "set": {"adapter.type": "dora"}}),
        ("smollm2-gguf-dora-r16", smol, {"seq": 256, "batch": 4,
                                         "set": {"adapter.type": "dora", "adapter.rank": 16}}),
        ("medium-dora-ckpt", medium, {"seq": 512, "batch": 2, "set": {
            "adapter.type": "dora", "train.grad_checkpoint": True}}),
        ("smollm2-dense-full", dense, {"seq": 512, "batch": 2,
                                       "set": {"adapter.type": "full"}}),
        ("medium-full", medium, {"seq": 256, "batch": 2, "set": {"adapter.type": "full"}}),
        ("medium-full-ckpt-seq512", medium, {"seq": 512, "batch": 2, "set": {
            "adapter.type": "full", "train.grad_checkpoint": True}}),
        ("qwen2-dense", {"tiny": {**MEDIUM, "model_type": "qwen2", "hidden_size": 512,
                                  "num_attention_heads": 8, "num_key_value_heads": 2,
                                  "num_hidden_layers": 8}}, {"seq": 512, "batch": 4}),
    ]
    return [{"name": n, "part": "check", "model": m, **kw} for n, m, kw in grid]


def cpu_fit_grid() -> list[dict]:
    """The fit grid again on the path `mlxtune run` takes here by default (mlxtune's CPU
    kernels: fastmath SwiGLU and loss, native attention and cross-entropy). Not fitted:
    at these sizes a step holds tens of MB that real sizes do not scale (fitting them
    with the real-width entries took the 1.5B 4-bit prediction from +2% to +58%); they
    show how the CPU kernels' plan does on small models (docs/memory.md)."""
    # DoRA's and full fine-tuning's own counts keep their MLX values (fitted on those
    # alone); NF4 on the 12-block medium model is the slowest and varies nothing the
    # 6-block tiny one does not.
    skip = ("dora", "full", "nf4-medium-12l")
    return [{**e, "name": "cpu-" + e["name"], "part": "tiny-cpu", "path": "cpu"}
            for e in fit_grid() if not any(k in e["name"] for k in skip)]


def grid() -> list[dict]:
    from memcal.real import real_grid

    return fit_grid() + check_grid() + cpu_fit_grid() + real_grid()


# ---------------------------------------------------------------------------- models


def _key(spec) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def model_path(spec: dict) -> str:
    """A model for `spec`, built once into the cache folder."""
    sys.path.insert(0, str(ROOT / "tests"))
    if "packaged" in spec:
        return spec["packaged"]
    if "tiny" in spec:
        from tiny import make_model_dir

        args = dict(spec["tiny"])
        folder = CACHE / "models" / _key({"tiny": spec["tiny"]})  # a label names, not shapes
        if not (folder / "config.json").exists():
            model_type = args.pop("model_type", "llama")
            make_model_dir(folder, model_type=model_type, **args)
            if args.get("tie_word_embeddings"):
                _drop_tied_head(folder)
        return str(folder)
    if "gguf" in spec:
        path = CACHE / "models" / f"{_key(spec)}.gguf"
        if not path.exists():
            from gguf import GGMLQuantizationType as T
            from tiny import build_model, byte_level_tokenizer, model_args
            from tiny_gguf import write_gguf

            args = model_args("llama", **{**spec["gguf"], "vocab_size": None})
            args["vocab_size"] = byte_level_tokenizer().get_vocab_size()
            path.parent.mkdir(parents=True, exist_ok=True)
            types = {k: getattr(T, v) for k, v in spec["types"].items()}
            write_gguf(path, build_model(args), args, byte_level_tokenizer(), types=types)
        return str(path)
    if "smollm2_dense" in spec:
        folder = CACHE / "models" / "smollm2-dense-f32"
        if not (folder / "config.json").exists():
            _dense_smollm2(folder)
        return str(folder)
    raise ValueError(f"unknown model spec {spec}")


def _drop_tied_head(folder: Path) -> None:
    """A tied model's folder as published: no lm_head.weight. mlx_lm builds some families
    (gemma3_text) with an lm_head that it drops only when the checkpoint has none; a
    random model saved with it would hold a second [vocab, hidden] matrix that the real
    model does not."""
    import mlx.core as mx

    for f in folder.glob("*.safetensors"):
        weights = mx.load(str(f))
        if "lm_head.weight" in weights:
            del weights["lm_head.weight"]
            mx.save_safetensors(str(f), weights, metadata={"format": "mlx"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data.get("weight_map", {}).pop("lm_head.weight", None)
        index.write_text(json.dumps(data, indent=2))


def _dense_smollm2(folder: Path) -> None:
    """The packaged SmolLM2 dequantized to a float32 mlx-lm folder."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import save_config, save_model

    from mlxtune import models
    from mlxtune.export.mlx_fused import dense_weight
    from mlxtune.models.gguf import _build_model, load_gguf

    model, tokenizer, config = load_gguf(models.packaged_path("smollm2-135m-instruct"))
    config = {k: v for k, v in config.items() if k not in ("quantization",
                                                          "quantization_formats")}
    dense = _build_model(config)
    weights = {}
    for path, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weights[f"{path}.weight"] = dense_weight(m)
    for k, v in tree_flatten(model.parameters()):
        if k.endswith("norm.weight"):
            weights[k] = v.astype(mx.float32)
    dense.load_weights(list(weights.items()), strict=True)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder, dense)
    save_config(config, folder / "config.json")
    tokenizer._tokenizer.save_pretrained(str(folder))


# ---------------------------------------------------------------------------- data


def write_data(path: Path, kind: str, seq: int, n: int = 24, seed: int = 0) -> None:
    """Records long enough to fill `seq` tokens (every word is at least one token), or
    short ones ('short', about seq/6 words) for packing."""
    rng = random.Random(seed)

    def text(words):
        return " ".join(rng.choice(WORDS) for _ in range(words))

    rows = []
    for _ in range(n):
        if kind == "pref":
            rows.append({"prompt": "say " + text(3), "chosen": text(seq),
                         "rejected": text(seq)})
        else:
            words = max(8, seq // 6) if kind == "short" else seq
            rows.append({"messages": [{"role": "user", "content": "say " + text(3)},
                                      {"role": "assistant", "content": text(words)}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def config_for(spec: dict, work: Path) -> Path:
    """The YAML config of a grid entry (data written next to it)."""
    import yaml

    data = work / "train.jsonl"
    write_data(data, spec.get("data", "chat"), spec["seq"], n=max(24, 6 * spec["batch"]))
    raw = {"name": spec["name"], "model": {"path": model_path(spec["model"])},
           "adapter": {"rank": 8, "alpha": 16},
           # Every record fills a row, so a batch is one example a row however it is drawn;
           # length-grouped batches are planned without the packing mask, as they run.
           "data": {"train": str(data), "max_seq_len": spec["seq"], "packing": False,
                    "group_by_length": True},
           # One stream (the default, and how a step runs on Metal / CUDA); several CPU
           # streams change the peak (docs/memory.md).
           "train": {"iters": spec.get("steps", 3), "batch_size": spec["batch"],
                     "eval_every": 0, "save_every": 0, "log_every": 1, "seed": 0,
                     "cpu_streams": 1},
           "eval": {"auto": False}}
    for key, value in spec.get("set", {}).items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
