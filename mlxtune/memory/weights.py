"""The base model's weights, tensor by tensor, in the layout they will have in memory.

For a GGUF file every tensor keeps the type it is stored in (a Q4_K_M file mixes Q4_K,
Q5_K / Q6_K and F32 tensors); for other sources every matrix has the model's one layout:
dense, the folder's mlx-lm quantization, or what `model.quantize` asks for (ignored, as
mlxtune.models.prepare ignores it, when the base is already quantized).
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxtune.memory import storage
from mlxtune.memory.shapes import ModelShape
from mlxtune.memory.storage import DENSE, Format


@dataclass(frozen=True)
class Weight:
    name: str          # mlx_lm module path (or GGUF tensor name)
    rows: int
    cols: int
    kind: str          # 'embedding' | 'linear' | 'head' | 'vector'
    format: Format
    nbytes: int

    @property
    def quantized(self) -> bool:
        return self.format.quantized


def canonical(shape: ModelShape) -> list[tuple[str, int, int, str]]:
    """(module path, rows, cols, kind) of every weight of an mlx_lm model of this shape."""
    d = shape.hidden_size
    out = [("model.embed_tokens", shape.vocab_size, d, "embedding")]
    for i in range(shape.num_layers):
        for name, n_in, n_out in shape.block_linears():
            out.append((f"model.layers.{i}.{name}", n_out, n_in, "linear"))
        out.append((f"model.layers.{i}.norms", 1, shape.block_vectors(), "vector"))
    out.append(("model.norm", 1, d, "vector"))
    if not shape.tie_embeddings:
        out.append(("lm_head", shape.vocab_size, d, "head"))
    return out


def _quantize_request(model_cfg) -> Format | None:
    q = getattr(model_cfg, "quantize", None) if model_cfg is not None else None
    if q is None or q.format == "none":
        return None
    if q.format == "nf4":
        return storage.NF4
    return storage.affine(q.bits, q.group_size)


def _mlx_format(quantization: dict, path: str, cols: int) -> Format:
    """The format mlx-lm's "quantization" config gives a module (per-module overrides:
    a dict of its own, or False for a module left dense)."""
    override = quantization.get(path)
    if override is False:
        return DENSE
    q = override if isinstance(override, dict) else quantization
    group, bits = int(q.get("group_size", 64)), int(q["bits"])
    if cols % group:
        return DENSE
    return storage.affine(bits, group)


def base_weights(shape: ModelShape, model_cfg, compute_bytes: int) -> list[Weight]:
    """Every weight of the base as it will sit in memory."""
    if shape.tensors is not None:
        weights = _gguf_weights(shape, compute_bytes)
    else:
        weights = []
        for path, rows, cols, kind in canonical(shape):
            fmt = DENSE
            if shape.quantization and kind != "vector":
                fmt = _mlx_format(shape.quantization, path, cols)
            weights.append(Weight(path, rows, cols, kind, fmt,
                                  storage.nbytes(fmt, rows, cols, compute_bytes)))
    request = _quantize_request(model_cfg)
    if request is None or any(w.quantized for w in weights):
        return weights  # a quantized base stays as it is (models.prepare)
    return [_requantize(w, request, compute_bytes) for w in weights]


def densified(weights: list[Weight], compute_bytes: int) -> list[Weight]:
    """The weights after quant.densify: every quantized matrix dequantized to the compute
    dtype (GRPO's objective.dense_base)."""
    return [Weight(w.name, w.rows, w.cols, w.kind, DENSE,
                   storage.nbytes(DENSE, w.rows, w.cols, compute_bytes)) if w.quantized else w
            for w in weights]


def _requantize(w: Weight, fmt: Format, compute_bytes: int) -> Weight:
    """model.quantize on a dense base: affine quantizes every linear and embedding matrix
    whose input size the group divides (quant.quantize_dense); nf4 only the linear layers
    of the blocks whose input size 64 divides (quant.quantize_nf4)."""
    if fmt.kind == "affine":
        ok = w.kind != "vector" and w.cols % fmt.group_size == 0
    else:
        ok = w.kind == "linear" and w.cols % 64 == 0
    if not ok:
        return w
    return Weight(w.name, w.rows, w.cols, w.kind, fmt,
                  storage.nbytes(fmt, w.rows, w.cols, compute_bytes))


def _gguf_kind(name: str, shape: tuple) -> str:
    if len(shape) < 2:
        return "vector"
    if name.startswith("token_embd"):
        return "embedding"
    if name.startswith("output."):
        return "head"
    return "linear"


def _gguf_weights(shape: ModelShape, compute_bytes: int) -> list[Weight]:
    out = []
    for t in shape.tensors:
        if t.name == "rope_freqs.weight":  # consumed into the RoPE settings
            continue
        kind = _gguf_kind(t.name, t.shape)
        rows = 1 if len(t.shape) < 2 else int(t.shape[0])
        cols = int(t.shape[-1]) if len(t.shape) < 2 else int(t.shape[-1]) * \
            (1 if len(t.shape) == 2 else int(t.shape[1]))
        fmt = storage.from_gguf_type(t.type, two_d=kind != "vector")
        out.append(Weight(t.name, rows, cols, kind, fmt,
                          storage.nbytes(fmt, rows, cols, compute_bytes)))
    return out


def summary(weights: list[Weight]) -> dict[str, dict]:
    """Format label -> {"tensors", "parameters", "bytes"}, largest first."""
    groups: dict[str, dict] = {}
    for w in weights:
        g = groups.setdefault(w.format.label(), {"tensors": 0, "parameters": 0, "bytes": 0})
        g["tensors"] += 1
        g["parameters"] += w.rows * w.cols
        g["bytes"] += w.nbytes
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]["bytes"]))
