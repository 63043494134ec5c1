"""Model shapes without loading weights: what the planner needs to know about a model.

A shape comes from the same places a model does (mlxtune.models.resolve), read as
metadata only:

- a .gguf file (or the packaged default): its header, through the project's own GGUF
  reader (mlxtune.models.gguf_file), including each tensor's stored type;
- a local mlx-lm / Hugging Face folder: its config.json (and mlx-lm's "quantization");
- a hub id: config.json from the local Hugging Face cache when it is there, else the
  catalogue of popular models (mlxtune.memory.catalogue), else config.json alone fetched
  from the hub (never the weights).

The transformer block is described as its linear layers (mlx_lm module paths, input and
output sizes) and its norm vectors; that is all the arithmetic needs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from mlxtune.errors import ModelError

# mlx_lm's default for tie_word_embeddings when a config does not say (ModelArgs).
_TIED_DEFAULT = {"llama": True, "mistral": True, "qwen2": True, "granite": True,
                 "olmo2": True, "starcoder2": True, "smollm3": True, "gemma": True,
                 "gemma2": True, "gemma3_text": True, "gemma3": True, "phi3": False}
# Families whose blocks carry extra norms (RMSNorm vectors) besides the two of llama:
# gemma2/3 norm before and after attention and MLP; qwen3/gemma3/olmo2 normalise q and k.
_BLOCK_NORMS = {"gemma2": 4, "gemma3_text": 4}
_QK_NORM = {"qwen3", "gemma3_text", "olmo2"}
# MLPs without a gate (two matrices instead of three).
_PLAIN_MLP = {"starcoder2"}


@dataclass(frozen=True)
class Tensor:
    """One stored weight: its name in the source, shape (rows first) and storage type as
    stored (a GGUF type name such as 'Q4_K', or 'F16' / 'BF16' / 'F32')."""
    name: str
    shape: tuple[int, ...]
    type: str


@dataclass(frozen=True)
class ModelShape:
    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    source: str = ""                  # where these numbers come from (file, URL)
    # mlx-lm "quantization" of a quantized folder / hub model ({bits, group_size, ...}).
    quantization: dict | None = None
    # Per-tensor storage of a GGUF file; None for other sources (all one dtype).
    tensors: tuple[Tensor, ...] | None = field(default=None, compare=False)
    # Whether mlx_lm decodes the family with a plain KV cache in every layer (no sliding
    # window, no recurrent state): GRPO's step then computes each prompt once per group.
    plain_kv_cache: bool = True

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def block_linears(self) -> list[tuple[str, int, int]]:
        """(mlx_lm module path inside a block, input size, output size) of each linear."""
        d, inter = self.hidden_size, self.intermediate_size
        out = [("self_attn.q_proj", d, self.q_dim), ("self_attn.k_proj", d, self.kv_dim),
               ("self_attn.v_proj", d, self.kv_dim), ("self_attn.o_proj", self.q_dim, d)]
        if self.model_type in _PLAIN_MLP:
            out += [("mlp.c_fc", d, inter), ("mlp.c_proj", inter, d)]
        else:
            out += [("mlp.gate_proj", d, inter), ("mlp.up_proj", d, inter),
                    ("mlp.down_proj", inter, d)]
        return out

    def block_vectors(self) -> int:
        """Elements of a block's norm weights and biases."""
        n = _BLOCK_NORMS.get(self.model_type, 2) * self.hidden_size
        if self.model_type in _QK_NORM:
            n += 2 * self.head_dim
        if self.attention_bias:
            n += self.q_dim + 2 * self.kv_dim
        if self.mlp_bias:
            n += sum(o for _, _, o in self.block_linears()[4:])
        return n

    @property
    def gated_mlp(self) -> bool:
        return self.model_type not in _PLAIN_MLP

    @property
    def qk_norm(self) -> bool:
        return self.model_type in _QK_NORM

    def parameters(self) -> int:
        """Total parameters (embeddings counted once when tied)."""
        block = sum(i * o for _, i, o in self.block_linears()) + self.block_vectors()
        head = 0 if self.tie_embeddings else self.vocab_size * self.hidden_size
        return (self.vocab_size * self.hidden_size + self.num_layers * block + head
                + self.hidden_size)

    def describe(self) -> str:
        return (f"{self.name}: {self.model_type}, {self.parameters() / 1e9:.2f}B parameters, "
                f"{self.num_layers} layers, d={self.hidden_size}, ffn={self.intermediate_size}, "
                f"heads {self.num_heads}/{self.num_kv_heads}x{self.head_dim}, "
                f"vocab {self.vocab_size}{', tied' if self.tie_embeddings else ''}")


def from_config(config: dict, name: str, source: str) -> ModelShape:
    """A shape from an mlx-lm / Hugging Face config.json mapping."""
    if "text_config" in config and "hidden_size" not in config:  # multimodal wrappers
        merged = dict(config["text_config"])
        merged.setdefault("model_type", config.get("model_type"))
        if "quantization" in config:
            merged["quantization"] = config["quantization"]
        config = merged
    try:
        d = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        model_type = str(config.get("model_type", "llama"))
        if model_type == "gemma3":
            model_type = "gemma3_text"
        if model_type == "mistral":
            model_type = "llama"
        shape = ModelShape(
            name=name, model_type=model_type, hidden_size=d,
            num_layers=int(config["num_hidden_layers"]),
            intermediate_size=int(config["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or d // heads),
            vocab_size=int(config["vocab_size"]),
            tie_embeddings=bool(config.get("tie_word_embeddings",
                                           _TIED_DEFAULT.get(model_type, False))),
            attention_bias=bool(config.get("attention_bias", model_type in ("qwen2",
                                                                            "starcoder2"))),
            mlp_bias=bool(config.get("mlp_bias", model_type == "starcoder2")),
            source=source,
            quantization=_mlx_quantization(config),
            plain_kv_cache=_plain_kv_cache(model_type, config),
        )
    except KeyError as e:
        raise ModelError(f"{source}: config has no {e.args[0]} (needed to plan memory)")
    except (TypeError, ValueError) as e:
        raise ModelError(f"{source}: config has a malformed size ({e})")
    return shape


def _plain_kv_cache(model_type: str, config: dict) -> bool:
    """Whether mlx_lm's cache for the family is a plain KVCache in every layer, as
    mlxtune.decode.batchable finds on the loaded model: a family whose model defines its
    own make_cache has sliding windows or recurrent state, except llama's (sliding only
    for the layers layer_types marks). An unknown family counts as not plain."""
    import importlib

    if "sliding_attention" in (config.get("layer_types") or []):
        return False
    try:
        module = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError:
        return False
    return model_type == "llama" or not hasattr(getattr(module, "Model", None), "make_cache")


def _mlx_quantization(config: dict) -> dict | None:
    """mlx-lm's "quantization" entry ({group_size, bits, mode, per-module overrides}), or
    None for a dense model (other tools' quantization_config is not mlx-lm's)."""
    q = config.get("quantization")
    if isinstance(q, dict) and "bits" in q:
        return q
    return None


def from_gguf(path: str | Path, name: str | None = None) -> ModelShape:
    """A shape from a GGUF header (no tensor data is read), with every tensor's type."""
    from mlxtune.models.gguf import read_gguf_info
    from mlxtune.models.gguf_config import model_config

    info = read_gguf_info(path)
    shapes = {t["name"]: tuple(t["shape"]) for t in info["tensors"]}
    config = model_config(info["metadata"], shapes, path)
    shape = from_config(config, name or Path(path).name, f"GGUF header of {path}")
    tensors = tuple(Tensor(t["name"], tuple(t["shape"]), t["type"]) for t in info["tensors"])
    return replace(shape, tensors=tensors)


def from_folder(path: str | Path, name: str | None = None) -> ModelShape:
    p = Path(path) / "config.json"
    try:
        config = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelError(f"{p}: cannot read the model config ({e.strerror})")
    except ValueError as e:
        raise ModelError(f"{p}: not valid JSON ({e})")
    if not isinstance(config, dict):
        raise ModelError(f"{p}: not a model config (expected a JSON object)")
    return from_config(config, name or Path(path).name, str(p))


def from_hub(repo_id: str, revision: str | None = None, download: bool = True) -> ModelShape:
    """config.json of a hub model: the local cache, else the catalogue, else the hub
    (config.json only, unless `download` is false or HF_HUB_OFFLINE is set)."""
    from mlxtune.memory import catalogue

    cached = _cached_config(repo_id, revision)
    if cached is not None:
        return from_folder(cached.parent, repo_id)
    known = catalogue.lookup(repo_id)
    if known is not None:
        return known
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    reason = "offline"
    if download and not offline and _hub_reachable():
        try:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.utils import logging as hub_logging

            hub_logging.set_verbosity_error()  # one line of ours, not its retries
            path = Path(hf_hub_download(repo_id, "config.json", revision=revision))
            return from_folder(path.parent, repo_id)
        except Exception as e:  # gated, missing: say what can be done instead
            reason = f"{type(e).__name__}"
    raise ModelError(
        f"model.path: {repo_id}: its shape is not in the local Hugging Face cache nor in "
        f"mlxtune's catalogue, and config.json could not be fetched ({reason}); download "
        "the model once, or point model.path at a local folder or .gguf file")


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub's host answers at all (an offline machine fails fast here instead
    of through the hub client's retries)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co",
                                  url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_config(repo_id: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:
        return None
    return Path(found) if isinstance(found, str) else None


def resolve(model_cfg) -> ModelShape:
    """The shape of the model a config's `model:` section names (mlxtune.config
    ModelConfig), reading metadata only."""
    from mlxtune import models

    given = model_cfg.path
    source = models.resolve(given)
    if source.kind in ("gguf", "packaged"):
        return from_gguf(source.location, given if source.kind == "packaged" else None)
    if source.kind == "mlx":
        return from_folder(source.location)
    return from_hub(source.location, model_cfg.revision)
