"""How each format lives in MLX arrays, and its dequantization in MLX ops (the CPU path).

Layouts (rows first, like PyTorch and MLX; every array has the weight's rows as its first
axis except the two NF4 second-level ones, so rows can be permuted or gathered):

  affine  MLX's own: weight uint32 (bit stream of `bits`-bit codes), scales and biases per
          group of 32; w = scales*q + biases. GGUF Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K map
          onto it exactly. scales/biases are float16 where every value fits float16
          exactly (the 32-element types), otherwise float32 (K-quants: d*sc has up to 17
          significant bits), so MLX's kernels compute exactly what the file holds.
  q6_k    weight uint32 (low 4 bits, 8 per word), weight_high uint32 (top 2 bits, 16 per
          word), scales int8 per 16, d float16 per 256: GGUF Q6_K's own bits, reordered into
          element order. w = d*scales*(q - 32).
  nf4     weight uint32 (codes, 8 per word), absmax_q int8 per 64, absmax_scale float32 per
          256 absmaxes (flat block order), absmax_offset float32 (1,).
          w = NF4[code] * (absmax_q*absmax_scale + absmax_offset).
"""

from __future__ import annotations

import numpy as np

from mlxtune.quant import formats as F

AFFINE_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5}
OWN_TYPES = {"Q6_K": "q6_k"}
# Parameter names of our own formats (the packed state of a QuantLinear / QuantEmbedding).
KEYS = {"nf4": ("weight", "absmax_q", "absmax_scale", "absmax_offset"),
        "q6_k": ("weight", "weight_high", "scales", "d")}


def _fits_f16(x: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.array_equal(x.astype(np.float16).astype(np.float32), x))


def gguf_affine(raw: np.ndarray, kind: str, shape: tuple) -> tuple[dict, dict]:
    """({weight, scales, biases} as numpy, {group_size, bits}) for an affine-mappable type."""
    bits = AFFINE_TYPES[kind]
    lead, cols = tuple(shape[:-1]), shape[-1]
    rows = int(np.prod(lead))
    q, scale, bias, group = F.affine_form(F.unpack(raw, kind), kind)
    dtype = np.float16 if _fits_f16(scale) and _fits_f16(bias) else np.float32
    arrays = {"weight": F.pack_bits(q.reshape(rows, cols), bits).reshape(*lead, -1),
              "scales": scale.astype(dtype).reshape(*lead, cols // group),
              "biases": bias.astype(dtype).reshape(*lead, cols // group)}
    return arrays, {"group_size": group, "bits": bits}


def gguf_q6_k(raw: np.ndarray, shape: tuple) -> dict:
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    c = F.unpack(raw, "Q6_K")
    q = c["q"].reshape(rows, cols)
    return {"weight": F.pack_nibbles(q & 15),
            "weight_high": F.pack_bits(q >> 4, 2),
            "scales": c["sc"].reshape(rows, cols // 16),
            "d": c["d"].reshape(rows, cols // 256)}


def q6_k_to_gguf(arrays: dict) -> np.ndarray:
    """Our q6_k arrays back to raw GGUF blocks (rows, bytes per row)."""
    low = F.unpack_nibbles(np.asarray(arrays["weight"]))
    high = F.unpack_bits(np.asarray(arrays["weight_high"]), 2)
    rows, cols = low.shape
    c = {"q": (low | (high << 4)).reshape(-1, 256),
         "sc": np.asarray(arrays["scales"]).reshape(-1, 16),
         "d": np.asarray(arrays["d"]).reshape(-1)}
    return F.pack(c, "Q6_K").reshape(rows, -1)


def nf4_from_dense(w: np.ndarray) -> dict:
    p = F.nf4_quantize(w)
    return {"weight": F.pack_nibbles(p["codes"]), "absmax_q": p["absmax_q"],
            "absmax_scale": p["absmax_scale"], "absmax_offset": p["absmax_offset"]}


def nf4_to_reference(arrays: dict) -> dict:
    """Our nf4 arrays -> the numpy reference's dict (codes unpacked)."""
    return {"codes": F.unpack_nibbles(np.asarray(arrays["weight"])),
            "absmax_q": np.asarray(arrays["absmax_q"]),
            "absmax_scale": np.asarray(arrays["absmax_scale"]),
            "absmax_offset": np.asarray(arrays["absmax_offset"])}


# -- dequantization in MLX ops --------------------------------------------------------------

def _nf4_quads():
    """uint16 (four codes) -> their four levels: a 1 MiB table. On the CPU a gather costs
    ~10 ns per index whatever it fetches, so fetching 4 levels per index is ~2x faster
    than 2 per byte and ~3x faster than 1 per code (measured, mlx 0.32)."""
    import mlx.core as mx

    i = np.arange(1 << 16)
    return mx.array(np.stack([F.NF4[(i >> (4 * j)) & 15] for j in range(4)], axis=1))


def _nf4_levels(words):
    """uint32 words (..., n) -> float32 levels (..., 8n), in element order."""
    import mlx.core as mx

    if "quads" not in _cache:
        _cache["quads"] = _nf4_quads()
    lead = words.shape[:-1]
    vals = mx.take(_cache["quads"], mx.view(words, mx.uint16), axis=0)
    return vals.reshape(*lead, words.shape[-1] * 8)


_cache: dict = {}


def nf4_absmax(absmax_q, absmax_scale, absmax_offset):
    """Double-quantized absmax per block of 64, shaped like absmax_q."""
    import mlx.core as mx

    n = absmax_q.size
    scale = mx.repeat(absmax_scale, F.NF4_DQ_BLOCK)[:n].reshape(absmax_q.shape)
    return absmax_q.astype(mx.float32) * scale + absmax_offset


def dequantize(fmt: str, a: dict, dtype=None):
    """Dense float32 (or `dtype`) weight (rows, cols) from our format's arrays, in MLX ops.
    Element for element the same float32 values as the numpy reference."""
    import mlx.core as mx

    w = a["weight"]
    rows, cols = w.shape[0], w.shape[-1] * 8
    if fmt == "nf4":
        vals = _nf4_levels(w)
        absmax = nf4_absmax(a["absmax_q"], a["absmax_scale"], a["absmax_offset"])
        out = (vals.reshape(rows, cols // 64, 64) * absmax[..., None]).reshape(rows, cols)
    elif fmt == "q6_k":
        low = (w[..., None] >> mx.arange(0, 32, 4, dtype=mx.uint32)) & 15
        high = (a["weight_high"][..., None] >> mx.arange(0, 32, 2, dtype=mx.uint32)) & 3
        q = low.reshape(rows, cols) | (high.reshape(rows, cols) << 4)
        q = q.astype(mx.int32) - 32
        scale = (a["d"].astype(mx.float32)[..., None]
                 * a["scales"].astype(mx.float32).reshape(rows, cols // 256, 16))
        out = (q.astype(mx.float32).reshape(rows, cols // 16, 16)
               * scale.reshape(rows, cols // 16, 1)).reshape(rows, cols)
    else:
        raise ValueError(f"unknown format {fmt}")
    return out if dtype is None or dtype == mx.float32 else out.astype(dtype)


def gather_rows(fmt: str, a: dict, ids):
    """The arrays restricted to rows `ids` (for embeddings): {key: array} whose
    dequantization is those rows."""
    import mlx.core as mx

    out = {k: a[k][ids] for k in ("weight", "weight_high", "scales", "d", "absmax_q") if k in a}
    if fmt == "nf4":
        # The second-level scales are per 256 blocks of the whole matrix: resolve them now.
        per_row = a["absmax_q"].shape[-1]
        block = ids[..., None] * per_row + mx.arange(per_row)
        out["absmax_scale_rows"] = a["absmax_scale"][block // F.NF4_DQ_BLOCK]
        out["absmax_offset"] = a["absmax_offset"]
    return out


def dequantize_rows(fmt: str, a: dict, dtype=None):
    """Dequantize what `gather_rows` returned (any leading shape)."""
    import mlx.core as mx

    lead = a["weight"].shape[:-1]
    flat = {k: v.reshape(-1, v.shape[-1]) if k != "absmax_offset" else v for k, v in a.items()}
    if fmt == "nf4":
        absmax = flat["absmax_q"].astype(mx.float32) * flat["absmax_scale_rows"] \
            + flat["absmax_offset"]
        w = flat["weight"]
        rows, cols = w.shape[0], w.shape[-1] * 8
        vals = _nf4_levels(w)
        out = (vals.reshape(rows, cols // 64, 64) * absmax[..., None]).reshape(rows, cols)
        out = out if dtype is None else out.astype(dtype)
    else:
        out = dequantize(fmt, flat, dtype)
    return out.reshape(*lead, out.shape[-1])
