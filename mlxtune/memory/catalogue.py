"""Shapes of popular models, so that planning works offline.

Every number is copied from the model's config.json on the Hugging Face hub (the URL in
`source`; for Gemma 3 4B-27B, the `text_config` of the multimodal config, the part mlxtune
trains). tests/test_memory.py checks each shape's parameter count against the count the
publisher states, an independent reading of the same facts. Instruct / chat variants
share their base model's shape and are listed as aliases.
"""

from __future__ import annotations

import re
from dataclasses import replace

from mlxtune.memory.shapes import ModelShape

HF = "https://huggingface.co/{}/blob/main/config.json"

# hub id: (model_type, hidden, layers, intermediate, heads, kv heads, head dim, vocab, tied)
_SHAPES = {
    "meta-llama/Llama-3.2-1B": ("llama", 2048, 16, 8192, 32, 8, 64, 128256, True),
    "meta-llama/Llama-3.2-3B": ("llama", 3072, 28, 8192, 24, 8, 128, 128256, True),
    "meta-llama/Llama-3.1-8B": ("llama", 4096, 32, 14336, 32, 8, 128, 128256, False),
    "meta-llama/Llama-3.1-70B": ("llama", 8192, 80, 28672, 64, 8, 128, 128256, False),
    "meta-llama/Llama-2-7b-hf": ("llama", 4096, 32, 11008, 32, 32, 128, 32000, False),
    "meta-llama/Llama-2-13b-hf": ("llama", 5120, 40, 13824, 40, 40, 128, 32000, False),
    "codellama/CodeLlama-34b-hf": ("llama", 8192, 48, 22016, 64, 8, 128, 32000, False),
    "mistralai/Mistral-7B-v0.3": ("llama", 4096, 32, 14336, 32, 8, 128, 32768, False),
    "mistralai/Mistral-Small-24B-Base-2501": ("llama", 5120, 40, 32768, 32, 8, 128, 131072,
                                              False),
    "Qwen/Qwen2.5-0.5B": ("qwen2", 896, 24, 4864, 14, 2, 64, 151936, True),
    "Qwen/Qwen2.5-1.5B": ("qwen2", 1536, 28, 8960, 12, 2, 128, 151936, True),
    "Qwen/Qwen2.5-3B": ("qwen2", 2048, 36, 11008, 16, 2, 128, 151936, True),
    "Qwen/Qwen2.5-7B": ("qwen2", 3584, 28, 18944, 28, 4, 128, 152064, False),
    "Qwen/Qwen2.5-14B": ("qwen2", 5120, 48, 13824, 40, 8, 128, 152064, False),
    "Qwen/Qwen2.5-32B": ("qwen2", 5120, 64, 27648, 40, 8, 128, 152064, False),
    "Qwen/Qwen2.5-72B": ("qwen2", 8192, 80, 29568, 64, 8, 128, 152064, False),
    "Qwen/Qwen3-0.6B": ("qwen3", 1024, 28, 3072, 16, 8, 128, 151936, True),
    "Qwen/Qwen3-1.7B": ("qwen3", 2048, 28, 6144, 16, 8, 128, 151936, True),
    "Qwen/Qwen3-4B": ("qwen3", 2560, 36, 9728, 32, 8, 128, 151936, True),
    "Qwen/Qwen3-8B": ("qwen3", 4096, 36, 12288, 32, 8, 128, 151936, False),
    "Qwen/Qwen3-14B": ("qwen3", 5120, 40, 17408, 40, 8, 128, 151936, False),
    "Qwen/Qwen3-32B": ("qwen3", 5120, 64, 25600, 64, 8, 128, 151936, False),
    "google/gemma-2-2b": ("gemma2", 2304, 26, 9216, 8, 4, 256, 256000, True),
    "google/gemma-2-9b": ("gemma2", 3584, 42, 14336, 16, 8, 256, 256000, True),
    "google/gemma-2-27b": ("gemma2", 4608, 46, 36864, 32, 16, 128, 256000, True),
    "google/gemma-3-1b-pt": ("gemma3_text", 1152, 26, 6912, 4, 1, 256, 262144, True),
    "google/gemma-3-4b-pt": ("gemma3_text", 2560, 34, 10240, 8, 4, 256, 262208, True),
    "google/gemma-3-12b-pt": ("gemma3_text", 3840, 48, 15360, 16, 8, 256, 262208, True),
    "google/gemma-3-27b-pt": ("gemma3_text", 5376, 62, 21504, 32, 16, 128, 262208, True),
    "HuggingFaceTB/SmolLM2-135M": ("llama", 576, 30, 1536, 9, 3, 64, 49152, True),
    "HuggingFaceTB/SmolLM2-360M": ("llama", 960, 32, 2560, 15, 5, 64, 49152, True),
    "HuggingFaceTB/SmolLM2-1.7B": ("llama", 2048, 24, 8192, 32, 32, 64, 49152, True),
}

# Other hub ids with the same shape (instruct / chat tunes, re-uploads).
_ALIASES = {
    "meta-llama/Llama-3.2-1B-Instruct": "meta-llama/Llama-3.2-1B",
    "meta-llama/Llama-3.2-3B-Instruct": "meta-llama/Llama-3.2-3B",
    "meta-llama/Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",
    "meta-llama/Meta-Llama-3-8B": "meta-llama/Llama-3.1-8B",
    "meta-llama/Meta-Llama-3-8B-Instruct": "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3.1-70B-Instruct": "meta-llama/Llama-3.1-70B",
    "meta-llama/Llama-3.3-70B-Instruct": "meta-llama/Llama-3.1-70B",
    "meta-llama/Llama-2-7b-chat-hf": "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-13b-chat-hf": "meta-llama/Llama-2-13b-hf",
    "codellama/CodeLlama-34b-Instruct-hf": "codellama/CodeLlama-34b-hf",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistralai/Mistral-7B-v0.3",
    "mistralai/Mistral-Small-24B-Instruct-2501": "mistralai/Mistral-Small-24B-Base-2501",
    "google/gemma-2-2b-it": "google/gemma-2-2b",
    "google/gemma-2-9b-it": "google/gemma-2-9b",
    "google/gemma-2-27b-it": "google/gemma-2-27b",
    "google/gemma-3-1b-it": "google/gemma-3-1b-pt",
    "google/gemma-3-4b-it": "google/gemma-3-4b-pt",
    "google/gemma-3-12b-it": "google/gemma-3-12b-pt",
    "google/gemma-3-27b-it": "google/gemma-3-27b-pt",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M",
    "HuggingFaceTB/SmolLM2-360M-Instruct": "HuggingFaceTB/SmolLM2-360M",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "HuggingFaceTB/SmolLM2-1.7B",
}
for _size in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B"):
    _ALIASES[f"Qwen/Qwen2.5-{_size}-Instruct"] = f"Qwen/Qwen2.5-{_size}"
for _size in ("0.6B", "1.7B", "4B", "8B", "14B", "32B"):
    _ALIASES[f"Qwen/Qwen3-{_size}-Base"] = f"Qwen/Qwen3-{_size}"

# Parameter counts as their publishers state them (model cards, safetensors metadata,
# keras-hub presets); tests/test_memory.py compares them with ModelShape.parameters().
PUBLISHED_PARAMETERS = {
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "meta-llama/Llama-3.2-3B": 3_212_749_824,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Llama-2-13b-hf": 13_015_864_320,
    "mistralai/Mistral-7B-v0.3": 7_248_023_552,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "Qwen/Qwen2.5-32B": 32_763_876_352,
    "Qwen/Qwen2.5-72B": 72_706_203_648,
    "google/gemma-2-2b": 2_614_341_888,
    "google/gemma-2-9b": 9_241_705_984,
    "google/gemma-2-27b": 27_227_128_320,
    "google/gemma-3-1b-pt": 999_885_952,
    "google/gemma-3-12b-pt": 11_765_788_416,
    "google/gemma-3-27b-pt": 27_009_002_240,
    "HuggingFaceTB/SmolLM2-135M": 134_515_008,
    "HuggingFaceTB/SmolLM2-1.7B": 1_711_376_384,
}

# mlx-community conversions: "<org>/<name>-4bit" etc. (mlx-lm's default group size 64).
_MLX_SUFFIX = re.compile(r"^(?P<name>.+?)-(?:(?P<bits>[2-8])bit|bf16|fp16|f16|fp32)"
                         r"(?:-mlx)?$", re.IGNORECASE)


def _shape(repo_id: str, name: str | None = None) -> ModelShape:
    mt, d, n, inter, h, kv, hd, v, tied = _SHAPES[repo_id]
    return ModelShape(name=name or repo_id, model_type=mt, hidden_size=d, num_layers=n,
                      intermediate_size=inter, num_heads=h, num_kv_heads=kv, head_dim=hd,
                      vocab_size=v, tie_embeddings=tied, attention_bias=mt == "qwen2",
                      source=f"mlxtune catalogue, from {HF.format(repo_id)}")


def names() -> list[str]:
    return sorted(_SHAPES) + sorted(_ALIASES)


def _by_name() -> dict[str, str]:
    """Lower-case repo name (without the owner) -> catalogue id."""
    out = {}
    for repo in list(_SHAPES) + list(_ALIASES):
        out.setdefault(repo.split("/")[-1].lower(), repo)
    return out


def lookup(repo_id: str) -> ModelShape | None:
    """The catalogue's shape for a hub id: exact, an alias, or another owner's upload of a
    catalogued model (e.g. mlx-community/Llama-3.2-3B-Instruct-4bit: the 4-bit MLX
    conversion, quantized as its name says with mlx-lm's default group size)."""
    if repo_id in _SHAPES:
        return _shape(repo_id)
    if repo_id in _ALIASES:
        return _shape(_ALIASES[repo_id], repo_id)
    name = repo_id.split("/")[-1]
    by_name = _by_name()
    bits = None
    target = by_name.get(name.lower())
    if target is None:
        m = _MLX_SUFFIX.match(name)
        if m is None or m.group("name").lower() not in by_name:
            return None
        target = by_name[m.group("name").lower()]
        bits = int(m.group("bits")) if m.group("bits") else None
    base = _ALIASES.get(target, target)
    shape = _shape(base, repo_id)
    note = f"{shape.source} (shape of {target}"
    if bits:
        note += f"; {bits}-bit as the name says, group size 64 assumed"
        shape = replace(shape, quantization={"group_size": 64, "bits": bits})
    return replace(shape, source=note + ")")
