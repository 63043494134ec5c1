"""The real-size part of the calibration grid: random-weight models with the exact
published shapes of models people fine-tune (0.5B-3B), measured on the path a run takes
here by default (mlxtune's CPU kernels: `path: cpu`) and, for a few, on MLX's own ops
(the graph Metal and CUDA run: `path: mlx`, like the tiny grid).

Shapes decide memory, not weight values, so these models are built here from their
config.json values (from each model's Hugging Face config.json) without downloading
anything. `fit-real` entries keep the real widths (hidden, ffn, heads, vocab) with a few
blocks: the per-block and per-vocabulary counts at real sizes, cheap to measure; `real`
entries are whole models, held out of every fit."""

from __future__ import annotations

# Published shapes (config.json of each model on the Hugging Face hub).
QWEN25_05B = {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24,
              "intermediate_size": 4864, "num_attention_heads": 14,
              "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1000000.0,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
              "tie_word_embeddings": True}
QWEN25_15B = {**QWEN25_05B, "hidden_size": 1536, "num_hidden_layers": 28,
              "intermediate_size": 8960, "num_attention_heads": 12}
QWEN25_3B = {**QWEN25_05B, "hidden_size": 2048, "num_hidden_layers": 36,
             "intermediate_size": 11008, "num_attention_heads": 16}
LLAMA32_1B = {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16,
              "intermediate_size": 8192, "num_attention_heads": 32,
              "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
              "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 131072, "tie_word_embeddings": True}
GEMMA3_1B = {"model_type": "gemma3_text", "hidden_size": 1152, "num_hidden_layers": 26,
             "intermediate_size": 6912, "num_attention_heads": 4, "num_key_value_heads": 1,
             "head_dim": 256, "vocab_size": 262144, "rope_theta": 1000000.0,
             "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
             "tie_word_embeddings": True, "query_pre_attn_scalar": 256,
             "sliding_window": 512, "sliding_window_pattern": 6}

NAMES = {id(QWEN25_05B): "Qwen2.5-0.5B", id(QWEN25_15B): "Qwen2.5-1.5B",
         id(QWEN25_3B): "Qwen2.5-3B", id(LLAMA32_1B): "Llama-3.2-1B",
         id(GEMMA3_1B): "gemma-3-1b"}

Q4 = {"format": "affine", "bits": 4, "group_size": 64}
NF4 = {"format": "nf4"}


def _model(shape: dict, layers: int | None = None) -> dict:
    name = NAMES[id(shape)]
    args = dict(shape)
    if layers is not None:
        args["num_hidden_layers"] = layers
        name = f"{name} widths x{layers}"
    return {"tiny": args, "label": name}


def real_grid() -> list[dict]:
    grid = []

    def add(name, part, shape, layers=None, path="cpu", **kw):
        grid.append({"name": name, "part": part, "model": _model(shape, layers),
                     "path": path, **kw})

    # -- fit-real: real widths, a few blocks (the CPU path's counts are fitted on these)
    add("fitr-q15-2l", "fit-real", QWEN25_15B, 2, seq=512, batch=1, set={"adapter.rank": 16})
    add("fitr-q15-6l", "fit-real", QWEN25_15B, 6, seq=512, batch=1, set={"adapter.rank": 16})
    add("fitr-q15-4l-b2x1024", "fit-real", QWEN25_15B, 4, seq=1024, batch=2)
    add("fitr-q15-4l-ckpt", "fit-real", QWEN25_15B, 4, seq=512, batch=2,
        set={"train.grad_checkpoint": True})
    add("fitr-q15-4l-q4", "fit-real", QWEN25_15B, 4, seq=512, batch=2, set={"model.quantize": Q4})
    add("fitr-q15-2l-q4", "fit-real", QWEN25_15B, 2, seq=512, batch=2, set={"model.quantize": Q4})
    add("fitr-q15-6l-q4-ckpt", "fit-real", QWEN25_15B, 6, seq=512, batch=2,
        set={"model.quantize": Q4, "train.grad_checkpoint": True})
    add("fitr-q15-2l-q4-ckpt", "fit-real", QWEN25_15B, 2, seq=512, batch=2,
        set={"model.quantize": Q4, "train.grad_checkpoint": True})
    add("fitr-q15-4l-nf4", "fit-real", QWEN25_15B, 4, seq=512, batch=2,
        set={"model.quantize": NF4})
    add("fitr-l1b-4l-b1x2048", "fit-real", LLAMA32_1B, 4, seq=2048, batch=1)
    add("fitr-l1b-4l-q4", "fit-real", LLAMA32_1B, 4, seq=512, batch=2, set={"model.quantize": Q4})
    add("fitr-q3b-4l-nf4-ckpt", "fit-real", QWEN25_3B, 4, seq=512, batch=2,
        set={"model.quantize": NF4, "train.grad_checkpoint": True})
    add("fitr-l1b-4l-ckpt-b1x2048", "fit-real", LLAMA32_1B, 4, seq=2048, batch=1,
        set={"train.grad_checkpoint": True})
    add("fitr-l1b-10l-ckpt-b1x2048", "fit-real", LLAMA32_1B, 10, seq=2048, batch=1,
        set={"train.grad_checkpoint": True})
    add("fitr-l1b-4l-dpo", "fit-real", LLAMA32_1B, 4, seq=512, batch=1, data="pref",
        set={"objective.type": "dpo"})
    add("fitr-g1b-6l", "fit-real", GEMMA3_1B, 6, seq=1024, batch=1)  # 6: one sliding-window cycle

    # -- real: whole models, held out of every fit. The two configurations run 3
    # steps; the others 2 (the peak is reached in the second step, once AdamW's state
    # exists: the third added at most 0.5% where measured).
    add("real-q15-dense", "real", QWEN25_15B, seq=512, batch=1, set={"adapter.rank": 16})
    add("real-q15-q4-ckpt-b2", "real", QWEN25_15B, seq=512, batch=2,
        set={"adapter.rank": 16, "train.grad_checkpoint": True, "model.quantize": Q4})
    add("real-q05-dense-b2x1024", "real", QWEN25_05B, seq=1024, batch=2, steps=2)
    add("real-q05-nf4-dpo", "real", QWEN25_05B, seq=512, batch=2, data="pref", steps=2,
        set={"model.quantize": NF4, "objective.type": "dpo"})
    add("real-l1b-dense-ckpt-b1x2048", "real", LLAMA32_1B, seq=2048, batch=1, steps=2,
        set={"train.grad_checkpoint": True})
    add("real-l1b-q4-b2x512", "real", LLAMA32_1B, seq=512, batch=2, steps=2,
        set={"model.quantize": Q4})
    add("real-g1b-dense-b1x1024", "real", GEMMA3_1B, seq=1024, batch=1, steps=2)
    add("real-q3b-nf4-ckpt-b2x512", "real", QWEN25_3B, seq=512, batch=2, steps=2,
        set={"model.quantize": NF4, "train.grad_checkpoint": True})
    # The graph Metal and CUDA run (MLX's ops), at a real size: the tiny grid's counts.
    add("real-q15-dense-mlx", "real", QWEN25_15B, path="mlx", seq=512, batch=1,
        set={"adapter.rank": 16})
    # The GPU profile (MLX's attention with its materialised scores, as a Mac's plan
    # assumes), in float32: the Mac's graph at a real size, planned as a Mac's step.
    add("real-q15-dense-gpu", "real", QWEN25_15B, path="gpu", seq=512, batch=1, steps=2,
        set={"adapter.rank": 16, "model.dtype": "float32"})
    return grid
