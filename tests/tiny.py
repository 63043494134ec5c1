"""Tiny random models and tokenizers, built inside the tests (no hub, no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_tokenizer(merges: list[tuple[str, str]] | None = None):
    """A byte-level BPE tokenizer: the 256 byte symbols, a few merges, ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    merges = merges or [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    return tok


def save_tokenizer(path: Path, chat_template: str = CHATML) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_tokenizer(),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        chat_template=chat_template,
    )
    fast.save_pretrained(str(path))


def vocab_size() -> int:
    return byte_level_tokenizer().get_vocab_size()


def model_args(model_type: str = "llama", **overrides) -> dict:
    args = {
        "model_type": model_type,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size(),
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 512,
    }
    if model_type == "qwen2":
        args["tie_word_embeddings"] = False
    args.update(overrides)
    return args


def build_model(args: dict, seed: int = 0):
    """An mlx_lm model with random float32 weights (larger than init, so outputs vary)."""
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{args['model_type']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(args))
    params = tree_flatten(model.parameters())
    model.load_weights([(k, (mx.random.normal(v.shape) * 0.2).astype(mx.float32)
                         if not k.endswith("norm.weight") else mx.ones(v.shape))
                        for k, v in params])
    mx.eval(model.parameters())
    return model


def make_model_dir(path: Path, model_type: str = "llama", quantize: dict | None = None,
                   seed: int = 0, **overrides) -> Path:
    """Write an mlx-lm model folder (config.json, model.safetensors, tokenizer) to `path`."""
    from mlx_lm.utils import save_config, save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    args = model_args(model_type, **overrides)
    model = build_model(args, seed)
    if quantize:
        nn.quantize(model, group_size=quantize["group_size"], bits=quantize["bits"])
        args["quantization"] = dict(quantize)
    save_model(path, model)
    save_config(dict(args), path / "config.json")
    save_tokenizer(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def save_random_adapter(path: Path, seed: int = 7, rank: int = 4, alpha: float = 8) -> None:
    """An 'SFT' adapter for the tiny model with random non-zero weights (so base + adapter
    is not the base), saved at `path`: a starting point for preference runs."""
    from mlxtune import adapters
    from mlxtune.config import AdapterConfig

    model = build_model(model_args())
    mx.random.seed(seed)
    cfg = adapters.apply_lora(model, AdapterConfig(rank=rank, alpha=alpha))
    for _, m in adapters.lora_layers(model):
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    adapters.save(model, cfg, path)
