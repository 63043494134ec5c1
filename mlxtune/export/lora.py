"""A run's trained adapter, read for export: its matrices as numpy, and the base it
belongs to.

Every exporter starts here, so every check on what can be exported lives here too: a run
without an adapter, adapters on the embeddings or the output layer, target modules or
architectures no exporter can map, a format that cannot hold the adapter's type. Each is
one ExportError naming what is supported.

The matrices are in mlx-lm's layout and Hugging Face row order (adapters.py): for a
module with weight W (out x in), the adapter adds scale * (x @ A) @ B, A: in x r,
B: r x out, i.e. W' = W + scale * (A @ B).T. DoRA (kind "dora") also has a magnitude m
(out) per module: W' = m / ||W + scale (A @ B).T||_row * (W + scale (A @ B).T), so its
merged weight depends on W (`merged`). A full fine-tune (kind "full") is the trained
blocks' weights themselves (`weights`), exported as a whole model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxtune import adapters
from mlxtune.errors import ModelError

# Linear layers inside a transformer block that exporters map, by their Hugging Face
# names (which mlx_lm's models share for every architecture below).
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# mlx_lm model_type -> GGUF general.architecture, as llama.cpp's converter names them
# (it writes Mistral-style models as "llama").
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}

_PARAM = re.compile(r"^model\.layers\.(\d+)\.(.+)\.lora_(a|b)$")
_MAGNITUDE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.m$")
_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class ExportError(ModelError):
    """The run or its adapter cannot be exported as asked."""


def supported_targets() -> str:
    return ", ".join(t.split(".")[-1] for t in TARGETS)


@dataclass
class Base:
    """The base model a run trained on, as far as the exporters need it."""
    given: str                 # model.path from the run's config
    kind: str                  # 'gguf' | 'packaged' | 'mlx' | 'hub'
    location: str              # the .gguf file or the model folder (hub: the repo id)
    model_type: str            # mlx_lm model_type
    gguf_arch: str             # GGUF general.architecture
    heads: int
    kv_heads: int
    n_layers: int
    shapes: dict = field(default_factory=dict)   # GGUF tensor name -> (rows, cols), GGUF bases

    @property
    def is_gguf(self) -> bool:
        return self.kind in ("gguf", "packaged")


@dataclass
class Lora:
    run_dir: Path
    adapter_dir: Path
    rank: int
    alpha: float               # the run's alpha: scale = alpha / rank (rsLoRA: / sqrt(rank))
    dropout: float
    # (layer index, module key inside the block, e.g. "self_attn.q_proj") -> (A, B)
    pairs: dict
    base: Base
    kind: str = "lora"         # lora | dora | full
    scale: float = 0.0         # the update's multiplier, as trained (lora_parameters.scale)
    rslora: bool = False
    # DoRA: (layer, key) -> m (out,), float32
    magnitudes: dict = field(default_factory=dict)
    # full: "model.layers.N.<path>" -> the trained parameter, float32
    weights: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.scale and self.rank:
            self.scale = self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)

    @property
    def is_adapter(self) -> bool:
        return self.kind != "full"

    @property
    def keys(self) -> list[str]:
        return [k for k in TARGETS if any(key == k for _, key in self.pairs)]

    @property
    def layers(self) -> list[int]:
        return sorted({i for i, _ in self.pairs})

    def delta(self, layer: int, key: str) -> np.ndarray:
        """LoRA's change to the module's weight, out x in, float32, Hugging Face row order."""
        a, b = self.pairs[(layer, key)]
        return (self.scale * (a @ b)).T.astype(np.float32)

    def merged(self, layer: int, key: str, w: np.ndarray) -> np.ndarray:
        """The module's weight with the adapter merged, from its base weight `w` (out x in,
        float32; rows in any order, as long as `rows` of DoRA's magnitude follow it: use
        merged_rows for a permuted file layout)."""
        v = w + self.delta(layer, key)
        if self.kind != "dora":
            return v
        m = self.magnitudes[(layer, key)]
        norm = np.sqrt((v.astype(np.float64) ** 2).sum(axis=1))
        return (v * (m / norm)[:, None]).astype(np.float32)


def adapter_dir(run_dir: Path, which: str) -> Path:
    """`which`: 'final' (adapters/), 'best' (best/), or 'auto' (best/ when validation
    chose one, else adapters/)."""
    final, best = run_dir / "adapters", run_dir / "best"
    has = {p: (p / adapters.ADAPTER_FILE).exists() for p in (final, best)}
    if which == "auto":
        which = "best" if has[best] else "final"
    path = best if which == "best" else final
    if not has[path]:
        other = final if path == best else best
        hint = f" ({other.name}/ has one: --adapter {'final' if other == final else 'best'})" \
            if has[other] else " (has the run finished a step?)"
        raise ExportError(f"{run_dir}: the run has no adapter in {path.name}/{hint}")
    return path


def read(run_dir: str | Path, which: str = "auto") -> Lora:
    import yaml

    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise ExportError(f"{run_dir}: not a run directory (no config.yaml)")
    try:
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
        model_cfg = cfg.get("model") or {}
        given = model_cfg["path"]
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise ExportError(f"{cfg_file}: model.path is missing or unreadable ({e})")
    path = adapter_dir(run_dir, which)
    config = _adapter_config(path)
    base = describe_base(str(given), model_cfg.get("revision"))
    if config["fine_tune_type"] == "full":
        return Lora(run_dir, path, 0, 0.0, 0.0, {}, base, kind="full",
                    weights=_full_weights(path, base))
    kind = config["fine_tune_type"]
    pairs, magnitudes = _pairs(path, base, dora=kind == "dora")
    rank = int(config["lora_parameters"]["rank"])
    ranks = {a.shape[1] for a, _ in pairs.values()}
    if ranks != {rank}:
        # llama.cpp and PEFT take the rank from the tensors: they must agree with the scale
        raise ExportError(f"{path / adapters.CONFIG_FILE}: rank {rank}, but the adapter's "
                          f"matrices have rank {', '.join(map(str, sorted(ranks)))}")
    alpha = float(config.get("alpha", config["lora_parameters"]["scale"] * rank))
    if alpha == 0:
        # llama.cpp reads alpha 0 as "no alpha" and applies scale 1: refuse, it is a no-op
        raise ExportError(f"{path / adapters.CONFIG_FILE}: alpha is 0, the adapter changes "
                          "nothing")
    return Lora(run_dir, path, rank, alpha,
                float(config["lora_parameters"].get("dropout", 0.0)), pairs, base, kind=kind,
                scale=float(config["lora_parameters"]["scale"]),
                rslora=bool(config.get("rslora", False)), magnitudes=magnitudes)


def _adapter_config(path: Path) -> dict:
    cfg_file = path / adapters.CONFIG_FILE
    try:
        raw = json.loads(cfg_file.read_text())
        kind = raw.get("fine_tune_type", "lora")
    except (OSError, ValueError, AttributeError) as e:
        raise ExportError(f"{cfg_file}: cannot read the adapter config ({e})")
    if kind not in adapters.FINE_TUNE_TYPES:
        raise ExportError(f"{cfg_file}: fine_tune_type '{kind}' cannot be exported "
                          f"(supported: {', '.join(adapters.FINE_TUNE_TYPES)})")
    return adapters.read_config(path)


def _pairs(path: Path, base: Base, dora: bool = False) -> tuple[dict, dict]:
    """(pairs, DoRA magnitudes) of an adapter file."""
    import mlx.core as mx

    weights = mx.load(str(path / adapters.ADAPTER_FILE))
    found: dict = {}
    magnitudes: dict = {}
    for name, w in weights.items():
        if dora:
            mm = _MAGNITUDE.match(name)
            if mm is not None:
                magnitudes[(int(mm.group(1)), mm.group(2))] = np.array(w.astype(mx.float32))
                continue
        m = _PARAM.match(name)
        if m is None:
            raise ExportError(f"{path / adapters.ADAPTER_FILE}: {_unsupported(name)}")
        layer, key, which = int(m.group(1)), m.group(2), m.group(3)
        if key not in TARGETS:
            raise ExportError(f"{path / adapters.ADAPTER_FILE}: target module {key} cannot be "
                              f"exported (supported: {supported_targets()})")
        found.setdefault((layer, key), {})[which] = np.array(w.astype(mx.float32))
    pairs = {}
    for (layer, key), ab in sorted(found.items()):
        if set(ab) != {"a", "b"}:
            raise ExportError(f"{path / adapters.ADAPTER_FILE}: model.layers.{layer}.{key} has "
                              "only one of lora_a / lora_b")
        a, b = ab["a"], ab["b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ExportError(f"{path / adapters.ADAPTER_FILE}: model.layers.{layer}.{key}: "
                              f"lora_a {a.shape} and lora_b {b.shape} do not pair up")
        if layer >= base.n_layers:
            raise ExportError(f"{path}: adapter for layer {layer}, the base has "
                              f"{base.n_layers} layers (another base model?)")
        pairs[(layer, key)] = (a, b)
    if not pairs:
        raise ExportError(f"{path / adapters.ADAPTER_FILE}: the adapter holds no LoRA weights")
    if dora:
        for (layer, key), (a, b) in pairs.items():
            m = magnitudes.get((layer, key))
            if m is None or m.shape != (b.shape[1],):
                raise ExportError(f"{path / adapters.ADAPTER_FILE}: model.layers.{layer}.{key}"
                                  f" has no DoRA magnitude m of {b.shape[1]} values")
        extra = sorted(set(magnitudes) - set(pairs))
        if extra:
            raise ExportError(f"{path / adapters.ADAPTER_FILE}: model.layers.{extra[0][0]}."
                              f"{extra[0][1]}.m has no lora_a / lora_b")
    return pairs, magnitudes


def _full_weights(path: Path, base: Base) -> dict:
    """A full fine-tune's block weights, float32, by their mlx-lm names."""
    import mlx.core as mx

    out = {}
    for name, w in mx.load(str(path / adapters.ADAPTER_FILE)).items():
        m = _BLOCK.match(name)
        if m is None:
            raise ExportError(f"{path / adapters.ADAPTER_FILE}: {name} is not a weight of a "
                              "transformer block (a full fine-tune trains model.layers.N.*)")
        if int(m.group(1)) >= base.n_layers:
            raise ExportError(f"{path}: weights for layer {m.group(1)}, the base has "
                              f"{base.n_layers} layers (another base model?)")
        out[name] = np.array(w.astype(mx.float32))
    if not out:
        raise ExportError(f"{path / adapters.ADAPTER_FILE}: the full fine-tune holds no weights")
    return out


def _unsupported(name: str) -> str:
    if name.endswith(".m") or ".lora_magnitude" in name:
        return (f"{name} is a DoRA magnitude, but the adapter config says fine_tune_type "
                "lora")
    if "embed_tokens" in name or "lm_head" in name:
        return (f"{name}: adapters on the embeddings or the output layer cannot be exported "
                f"(supported: linear layers of the blocks: {supported_targets()})")
    return (f"{name} is not a LoRA weight of a block's linear layer this exporter can map "
            f"(supported: model.layers.N.<{supported_targets()}>.lora_a/lora_b)")


# -- the base ------------------------------------------------------------------------------

def describe_base(given: str, revision: str | None = None) -> Base:
    """What the exporters need to know about the base, without loading its weights."""
    from mlxtune import models
    from mlxtune.models.gguf_config import ARCHES

    source = models.resolve(given)
    if source.kind in ("gguf", "packaged"):
        from mlxtune.models.gguf import read_gguf_info

        info = read_gguf_info(source.location)
        meta, arch = info["metadata"], info["architecture"]
        if arch not in ARCHES:
            raise ExportError(f"{source.location}: GGUF architecture '{arch}' cannot be "
                              f"exported (supported: {', '.join(ARCHES)})")
        heads = int(meta[f"{arch}.attention.head_count"])
        return Base(given, source.kind, source.location, ARCHES[arch].model_type, arch, heads,
                    int(meta.get(f"{arch}.attention.head_count_kv", heads)),
                    int(meta[f"{arch}.block_count"]),
                    {t["name"]: tuple(t["shape"]) for t in info["tensors"]})
    folder = Path(source.location)
    if source.kind == "hub":
        folder = models.fetch_from_hub(source.location, revision)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{folder / 'config.json'}: cannot read the model config ({e})")
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCH:
        raise ExportError(f"{folder}: model_type '{model_type}' cannot be exported "
                          f"(supported: {', '.join(GGUF_ARCH)})")
    heads = int(config["num_attention_heads"])
    return Base(given, source.kind, str(folder), model_type, GGUF_ARCH[model_type], heads,
                int(config.get("num_key_value_heads") or heads),
                int(config["num_hidden_layers"]))


def permutes_qk(base: Base) -> bool:
    from mlxtune.models.gguf_config import ARCHES

    return ARCHES[base.gguf_arch].permute_qk


def to_gguf_rows(rows: np.ndarray, key: str, base: Base) -> np.ndarray:
    """Rows (output features) of a Q or K projection in Hugging Face order -> the order
    llama.cpp's converter writes for the llama family (rows of each head's two RoPE halves
    interleaved); other modules and architectures unchanged."""
    if not permutes_qk(base) or key not in ("self_attn.q_proj", "self_attn.k_proj"):
        return rows
    heads = base.heads if key == "self_attn.q_proj" else base.kv_heads
    n = rows.shape[0]
    return (rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def gguf_tensor_name(layer: int, key: str, base: Base) -> str:
    """GGUF name of the weight a LoRA pair adapts (gguf-py's own name map)."""
    import gguf

    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[base.gguf_arch]
    names = gguf.get_tensor_name_map(arch_id, base.n_layers)
    name = names.get_name(f"model.layers.{layer}.{key}.weight", try_suffixes=(".weight",))
    if name is None:
        raise ExportError(f"no GGUF tensor name for model.layers.{layer}.{key} in "
                          f"{base.gguf_arch}")
    return name


def gguf_param_name(name: str, base: Base) -> str:
    """GGUF name of a block parameter given by its mlx-lm name (model.layers.N.<path>)."""
    import gguf

    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[base.gguf_arch]
    names = gguf.get_tensor_name_map(arch_id, base.n_layers)
    found = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ExportError(f"no GGUF tensor name for {name} in {base.gguf_arch}")
    if base.shapes and found not in base.shapes:
        raise ExportError(f"{base.location}: has no tensor {found} for {name} (another base "
                          "model?)")
    return found


def to_gguf_value(w: np.ndarray, name: str, base: Base) -> np.ndarray:
    """A block parameter (mlx-lm name and layout) as llama.cpp stores it: Q/K rows in its
    interleaved order for the llama family, norm weights with the family's offset
    (gemma's 1 + w), the inverse of mlxtune.models.gguf's reading."""
    from mlxtune.models.gguf_config import ARCHES

    m = _BLOCK.match(name)
    key = m.group(2).rsplit(".", 1)[0] if m else ""
    w = to_gguf_rows(np.asarray(w, np.float32), key, base)
    offset = ARCHES[base.gguf_arch].norm_offset
    if offset and name.endswith("norm.weight"):
        w = w + offset
    return w


def check_shapes(lora: Lora) -> None:
    """Against a GGUF base's tensor directory: every adapted weight exists and fits."""
    if not lora.base.shapes:
        return
    for (layer, key), (a, b) in lora.pairs.items():
        name = gguf_tensor_name(layer, key, lora.base)
        shape = lora.base.shapes.get(name)
        if shape is None:
            raise ExportError(f"{lora.base.location}: has no tensor {name} for the adapter's "
                              f"model.layers.{layer}.{key} (another base model?)")
        if tuple(shape) != (b.shape[1], a.shape[0]):
            raise ExportError(f"{lora.adapter_dir}: model.layers.{layer}.{key} adapts a "
                              f"{b.shape[1]}x{a.shape[0]} weight, {name} in the base is "
                              f"{shape[0]}x{shape[1]} (another base model?)")
