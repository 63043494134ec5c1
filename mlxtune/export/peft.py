"""A LoRA adapter as Hugging Face PEFT saves one (transformers, vLLM, TGI load it).

PEFT's checkpoint layout (its docs, "PEFT checkpoint format"): `adapter_model.safetensors`
holds `base_model.model.<module>.lora_A.weight` (r x in, an nn.Linear(in, r)'s weight) and
`.lora_B.weight` (out x r); `adapter_config.json` holds `peft_type: LORA`, `r`,
`lora_alpha` (scale = lora_alpha / r without rsLoRA), `target_modules` (names matched
against the end of module names) and, for adapters on only some blocks,
`layers_to_transform` with `layers_pattern`. Our matrices are the transposes, in the same
Hugging Face row order, so no permutation is involved.

rsLoRA is `use_rslora: true` (PEFT's scale lora_alpha / sqrt(r)). DoRA is `use_dora:
true` with each module's magnitude saved as `<module>.lora_magnitude_vector` (out,):
PEFT's checkpoint name (peft/tuners/lora/model.py strips the ".weight" its DoraLinearLayer
holds it under), the same quantity as mlx-lm's `m`: PEFT's forward scales the base output
plus scale * B A x by magnitude / ||W + scale B A||, the norm over each output row of W
(out x in, torch.linalg.norm(dim=1)), detached, as mlx-lm's DoRALinear does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlxtune.export.lora import Lora

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"

# Hub ids of the packaged models (their GGUF metadata does not name the repository).
PACKAGED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def state_dict(lora: Lora) -> dict[str, np.ndarray]:
    out = {}
    for (layer, key), (a, b) in sorted(lora.pairs.items()):
        prefix = f"base_model.model.model.layers.{layer}.{key}"
        out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.T, np.float32)
        out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.T, np.float32)
        if lora.kind == "dora":
            out[f"{prefix}.lora_magnitude_vector"] = np.ascontiguousarray(
                lora.magnitudes[(layer, key)], np.float32)
    return out


def base_model_id(lora: Lora) -> str | None:
    base = lora.base
    if base.kind == "packaged":
        return PACKAGED_HUB_IDS.get(base.given)
    if base.kind == "hub":
        return base.given
    if base.kind == "mlx":
        return base.location
    return None   # a GGUF file: no Hugging Face model to name


def adapter_config(lora: Lora) -> dict:
    layers = lora.layers
    partial = layers != list(range(lora.base.n_layers))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_id(lora),
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted({k.split(".")[-1] for k in lora.keys}),
        "layers_to_transform": layers if partial else None,
        "layers_pattern": "layers" if partial else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": lora.rslora,
        "use_dora": lora.kind == "dora",
        "modules_to_save": None,
        "inference_mode": True,
    }


def write(lora: Lora, folder: Path) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(state_dict(lora), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(adapter_config(lora), indent=2) + "\n")
