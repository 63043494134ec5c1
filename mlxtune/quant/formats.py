"""Quantization formats as plain numpy: the reference every other path is checked against.

Each GGUF block type has `unpack` (raw blocks -> integer codes and scales, as named below),
`pack` (the inverse, byte for byte), `dequantize` (codes -> float32, in the order of
operations that makes the result exact: see `dequantize`) and a simple round-to-nearest
`quantize` (enough to write test files and K-quants, which gguf-py cannot quantize; it is
not llama.cpp's search). Layouts follow ggml's block structs:

  Q4_0  d:f16 | 16 bytes: element j in the low nibble of byte j, j+16 in the high one
  Q4_1  d:f16 m:f16 | 16 bytes as Q4_0                          w = d*q + m
  Q5_0  d:f16 | qh:u32 (bit j = 5th bit of element j) | 16 bytes  w = d*(q-16)
  Q5_1  d:f16 m:f16 | qh:u32 | 16 bytes                          w = d*q + m
  Q8_0  d:f16 | 32 x int8                                       w = d*q
  Q4_K  d:f16 dmin:f16 | 12 bytes: eight 6-bit scales and mins | 128 bytes: chunk c of
        32 bytes holds sub-block 2c in its low nibbles, 2c+1 in its high ones
        w = d*sc[j]*q - dmin*mn[j] for sub-block j of 32
  Q5_K  as Q4_K with qh:32 bytes between scales and qs (bit j of byte l = 5th bit of
        element l of sub-block j)
  Q6_K  ql:128 | qh:64 | scales:16 x int8 | d:f16; per half of 128: ql's 64 bytes hold
        elements 0..63 in low nibbles and 64..127 in high ones (32-byte chunks), qh's 32
        bytes hold the top 2 bits of chunk c (0..3) at bit 2c   w = d*sc[e/16]*(q-32)

NF4 (Dettmers et al. 2023, QLoRA): 4-bit codes into the 16 NormalFloat levels, one absmax
per block of 64, and double quantization: the absmaxes minus their mean are quantized to
8 bits, with one float32 scale per block of 256 absmaxes. The 8-bit code is signed linear
(scale = max |absmax - mean| / 127) rather than bitsandbytes' dynamic 8-bit float map:
simpler to decode in a kernel, no coarser for the largest blocks, same storage
(8 + 32/256 bits per 64 weights).
"""

from __future__ import annotations

import numpy as np

QK_K = 256

# type name -> (elements per block, bytes per block)
BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
          "Q8_0": (32, 34), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
SYMMETRIC = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 0}   # w = d * (q - offset)
DENSE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}

# The 16 NF4 levels: quantiles of N(0, 1) normalized to [-1, 1], 8 positive and 7
# negative plus an exact zero (QLoRA, appendix E). tests/test_quant_formats.py derives
# them again from the normal distribution.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
NF4_BLOCK = 64        # weights per absmax
NF4_DQ_BLOCK = 256    # absmaxes per second-level scale


def _f16(b: np.ndarray) -> np.ndarray:
    """Two little-endian bytes per row -> float16 (n,)."""
    return np.ascontiguousarray(b).view(np.float16).reshape(-1)


def _bytes(x: np.ndarray, dtype) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=dtype).view(np.uint8).reshape(len(x), -1)


# -- 4/5-bit nibble layouts shared by the 32-element types ---------------------------------

def _split_nibbles32(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 values: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _join_nibbles32(q: np.ndarray) -> np.ndarray:
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits32(qh: np.ndarray) -> np.ndarray:
    """4 bytes (a little-endian uint32) -> bit j of it, for j = 0..31."""
    word = np.ascontiguousarray(qh).view("<u4").reshape(-1, 1)
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _pack_high_bits32(q: np.ndarray) -> np.ndarray:
    bits = ((q >> 4) & 1).astype(np.uint32)
    word = (bits << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return word.astype("<u4").view(np.uint8).reshape(-1, 4)


# -- K-quant 6-bit scale packing ----------------------------------------------------------

def _unpack_scale_min_k4(s: np.ndarray):
    """12 bytes -> eight 6-bit scales and eight 6-bit mins."""
    s = s.astype(np.uint8)
    sc = np.empty((len(s), 8), np.uint8)
    mn = np.empty((len(s), 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def _pack_scale_min_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    s = np.empty((len(sc), 12), np.uint8)
    s[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    s[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return s


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> 256 values: chunk c of 32 bytes gives elements 64c..64c+31 (low
    nibbles) and 64c+32..64c+63 (high nibbles)."""
    c = qs.reshape(len(qs), 4, 1, 32)
    return np.concatenate([c & 0x0F, c >> 4], axis=2).reshape(len(qs), 256)


def _k_join_nibbles(q: np.ndarray) -> np.ndarray:
    c = q.reshape(len(q), 4, 2, 32)
    return ((c[:, :, 0] & 0x0F) | ((c[:, :, 1] & 0x0F) << 4)).reshape(len(q), 128)


# -- unpack / pack per type ---------------------------------------------------------------

def unpack(raw: np.ndarray, kind: str) -> dict:
    """Raw GGUF blocks (n_blocks, bytes per block) uint8 -> components (see module doc)."""
    raw = np.asarray(raw, np.uint8).reshape(-1, BLOCKS[kind][1])
    if kind == "Q4_0":
        return {"d": _f16(raw[:, 0:2]), "q": _split_nibbles32(raw[:, 2:18])}
    if kind == "Q4_1":
        return {"d": _f16(raw[:, 0:2]), "m": _f16(raw[:, 2:4]),
                "q": _split_nibbles32(raw[:, 4:20])}
    if kind == "Q5_0":
        return {"d": _f16(raw[:, 0:2]),
                "q": _split_nibbles32(raw[:, 6:22]) | (_high_bits32(raw[:, 2:6]) << 4)}
    if kind == "Q5_1":
        return {"d": _f16(raw[:, 0:2]), "m": _f16(raw[:, 2:4]),
                "q": _split_nibbles32(raw[:, 8:24]) | (_high_bits32(raw[:, 4:8]) << 4)}
    if kind == "Q8_0":
        return {"d": _f16(raw[:, 0:2]), "q": np.ascontiguousarray(raw[:, 2:34]).view(np.int8)}
    if kind in ("Q4_K", "Q5_K"):
        sc, mn = _unpack_scale_min_k4(raw[:, 4:16])
        if kind == "Q4_K":
            q = _k_nibbles(raw[:, 16:144])
        else:
            qh = raw[:, 16:48].reshape(len(raw), 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]
            q = _k_nibbles(raw[:, 48:176]) | ((qh & 1).reshape(len(raw), 256) << 4)
        return {"d": _f16(raw[:, 0:2]), "dmin": _f16(raw[:, 2:4]), "sc": sc, "mn": mn, "q": q}
    if kind == "Q6_K":
        ql = raw[:, 0:128].reshape(len(raw), 2, 1, 64)
        low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(len(raw), 2, 128)
        qh = raw[:, 128:192].reshape(len(raw), 2, 1, 32)
        high = ((qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(len(raw), 2, 128)
        return {"d": _f16(raw[:, 208:210]),
                "sc": np.ascontiguousarray(raw[:, 192:208]).view(np.int8),
                "q": (low | (high << 4)).reshape(len(raw), 256)}
    raise ValueError(f"unknown block type {kind}")


def pack(c: dict, kind: str) -> np.ndarray:
    """Components -> raw blocks (n_blocks, bytes per block) uint8; inverse of `unpack`."""
    q = np.asarray(c["q"])
    if kind == "Q4_0":
        return np.concatenate([_bytes(c["d"], "<f2"), _join_nibbles32(q.astype(np.uint8))], 1)
    if kind == "Q4_1":
        return np.concatenate([_bytes(c["d"], "<f2"), _bytes(c["m"], "<f2"),
                               _join_nibbles32(q.astype(np.uint8))], 1)
    if kind == "Q5_0":
        q = q.astype(np.uint8)
        return np.concatenate([_bytes(c["d"], "<f2"), _pack_high_bits32(q),
                               _join_nibbles32(q)], 1)
    if kind == "Q5_1":
        q = q.astype(np.uint8)
        return np.concatenate([_bytes(c["d"], "<f2"), _bytes(c["m"], "<f2"),
                               _pack_high_bits32(q), _join_nibbles32(q)], 1)
    if kind == "Q8_0":
        return np.concatenate([_bytes(c["d"], "<f2"), q.astype(np.int8).view(np.uint8)], 1)
    if kind in ("Q4_K", "Q5_K"):
        q = q.astype(np.uint8)
        parts = [_bytes(c["d"], "<f2"), _bytes(c["dmin"], "<f2"),
                 _pack_scale_min_k4(c["sc"].astype(np.uint8), c["mn"].astype(np.uint8))]
        if kind == "Q5_K":
            bits = ((q >> 4) & 1).reshape(len(q), 8, 32).astype(np.uint16)
            parts.append((bits << np.arange(8, dtype=np.uint16)[:, None]).sum(1).astype(np.uint8))
        parts.append(_k_join_nibbles(q))
        return np.concatenate(parts, 1)
    if kind == "Q6_K":
        q = q.astype(np.uint8).reshape(len(q), 2, 4, 32)       # half, chunk, element
        low, high = q & 0x0F, q >> 4
        ql = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(len(q), 128)
        qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4)
              | (high[:, :, 3] << 6)).reshape(len(q), 64)
        return np.concatenate([ql, qh, np.asarray(c["sc"], np.int8).view(np.uint8),
                               _bytes(c["d"], "<f2")], 1)
    raise ValueError(f"unknown block type {kind}")


def affine_form(c: dict, kind: str):
    """(q unsigned, scale, bias, group) with w = scale*q + bias exactly in float32, for the
    types that have that form (all but Q6_K): scale and bias are float32 per group."""
    f32 = np.float32
    d = c["d"].astype(f32)[:, None]
    if kind in ("Q4_0", "Q5_0"):
        off = 8 if kind == "Q4_0" else 16
        return c["q"].astype(np.uint8), d, -off * d, 32
    if kind in ("Q4_1", "Q5_1"):
        return c["q"].astype(np.uint8), d, c["m"].astype(f32)[:, None], 32
    if kind == "Q8_0":
        return (c["q"].astype(np.int16) + 128).astype(np.uint8), d, -128 * d, 32
    if kind in ("Q4_K", "Q5_K"):
        scale = d * c["sc"].astype(f32)                               # exact: 11 x 6 bits
        bias = -(c["dmin"].astype(f32)[:, None] * c["mn"].astype(f32))  # exact
        return c["q"].astype(np.uint8), scale, bias, 32
    raise ValueError(f"{kind} has no affine form")


def dequantize(c: dict, kind: str) -> np.ndarray:
    """Components -> float32 (n_blocks, block elements).

    Every product below is exact in float32 (at most 11 + 8 + 6 significant bits), so each
    element is rounded once at most: any correct implementation agrees bit for bit. (The
    affine form scale*q + bias of the symmetric types gives +0.0 where d*(q - offset) gives
    -0.0 for a negative d; the symmetric ones are computed as ggml does.)"""
    if kind in SYMMETRIC:
        q = np.asarray(c["q"]).astype(np.int16) - SYMMETRIC[kind]
        return q.astype(np.float32) * c["d"].astype(np.float32)[:, None]
    if kind == "Q6_K":
        scale = c["d"].astype(np.float32)[:, None] * c["sc"].astype(np.float32)   # exact
        q = (c["q"].astype(np.int16) - 32).astype(np.float32).reshape(len(scale), 16, 16)
        return (q * scale[:, :, None]).reshape(len(scale), 256)
    q, scale, bias, group = affine_form(c, kind)
    n = len(q)
    q = q.astype(np.float32).reshape(n, -1, group)
    return (q * scale[:, :, None] + bias[:, :, None]).reshape(n, -1)


def dequantize_raw(raw: np.ndarray, kind: str, shape: tuple) -> np.ndarray:
    """Any listed GGUF type (including F32/F16/BF16) from its raw bytes -> float32 `shape`."""
    if kind in DENSE:
        a = np.asarray(raw, np.uint8).view(DENSE[kind])
        if kind == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32).reshape(shape)
    return dequantize(unpack(raw, kind), kind).reshape(shape)


# -- quantizers (round to nearest; for test files and requantizing dense weights) ---------

def _safe_inv(x):
    with np.errstate(divide="ignore"):
        return np.where(x == 0, 0, 1 / np.where(x == 0, 1, x)).astype(np.float32)


def quantize(w: np.ndarray, kind: str) -> np.ndarray:
    """float weights (..., n) with n a multiple of the block -> raw blocks, row after row."""
    block = BLOCKS[kind][0]
    x = np.asarray(w, np.float32).reshape(-1, block)
    f16 = np.float16
    if kind in ("Q4_0", "Q5_0", "Q8_0"):
        levels = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 127}[kind]
        amax = np.abs(x).max(1)
        d = (amax / levels).astype(f16)
        q = np.rint(x * _safe_inv(d.astype(np.float32))[:, None])
        if kind == "Q8_0":
            return pack({"d": d, "q": np.clip(q, -127, 127).astype(np.int8)}, kind)
        q = np.clip(q + levels, 0, 2 * levels - 1).astype(np.uint8)
        return pack({"d": d, "q": q}, kind)
    if kind in ("Q4_1", "Q5_1"):
        top = 15 if kind == "Q4_1" else 31
        lo, hi = x.min(1), x.max(1)
        d, m = ((hi - lo) / top).astype(f16), lo.astype(f16)
        q = np.rint((x - m.astype(np.float32)[:, None]) * _safe_inv(d.astype(np.float32))[:, None])
        return pack({"d": d, "m": m, "q": np.clip(q, 0, top).astype(np.uint8)}, kind)
    if kind in ("Q4_K", "Q5_K"):
        top = 15 if kind == "Q4_K" else 31
        sub = x.reshape(len(x), 8, 32)
        lo = np.minimum(sub.min(2), 0)
        scale = (sub.max(2) - lo) / top
        d = (scale.max(1) / 63).astype(f16)
        dmin = (-lo.min(1) / 63).astype(f16)
        sc = np.clip(np.rint(scale * _safe_inv(d.astype(np.float32))[:, None]), 0, 63)
        mn = np.clip(np.rint(-lo * _safe_inv(dmin.astype(np.float32))[:, None]), 0, 63)
        eff_scale = d.astype(np.float32)[:, None] * sc
        eff_min = dmin.astype(np.float32)[:, None] * mn
        q = np.rint((sub + eff_min[:, :, None]) * _safe_inv(eff_scale)[:, :, None])
        c = {"d": d, "dmin": dmin, "sc": sc.astype(np.uint8), "mn": mn.astype(np.uint8),
             "q": np.clip(q, 0, top).astype(np.uint8).reshape(len(x), 256)}
        return pack(c, kind)
    if kind == "Q6_K":
        sub = x.reshape(len(x), 16, 16)
        scale = np.abs(sub).max(2) / 31
        d = (scale.max(1) / 127).astype(f16)
        sc = np.clip(np.rint(scale * _safe_inv(d.astype(np.float32))[:, None]), -128, 127)
        eff = d.astype(np.float32)[:, None] * sc
        q = np.clip(np.rint(sub * _safe_inv(eff)[:, :, None]) + 32, 0, 63)
        return pack({"d": d, "sc": sc.astype(np.int8),
                     "q": q.astype(np.uint8).reshape(len(x), 256)}, kind)
    raise ValueError(f"unknown block type {kind}")


# -- NF4 with double quantization ---------------------------------------------------------

_NF4_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2


def nf4_quantize(w: np.ndarray) -> dict:
    """float weights (rows, cols), cols a multiple of 64 -> {"codes": uint8 (rows, cols),
    "absmax_q": int8 (rows, cols/64), "absmax_scale": float32 (ceil(blocks/256),),
    "absmax_offset": float32 (1,)}. Codes are chosen against the double-quantized absmax,
    the scale they will be multiplied by."""
    w = np.asarray(w, np.float32)
    rows, cols = w.shape
    if cols % NF4_BLOCK:
        raise ValueError(f"NF4 needs the input size to be a multiple of {NF4_BLOCK}, got {cols}")
    blocks = w.reshape(-1, NF4_BLOCK)
    absmax = np.abs(blocks).max(1)
    offset = np.float32(absmax.mean(dtype=np.float64))
    centered = absmax - offset
    n_sb = -(-len(absmax) // NF4_DQ_BLOCK)
    padded = np.zeros(n_sb * NF4_DQ_BLOCK, np.float32)
    padded[:len(centered)] = centered
    scale = (np.abs(padded.reshape(n_sb, -1)).max(1) / 127).astype(np.float32)
    scale[scale == 0] = 1.0
    q8 = np.clip(np.rint(padded.reshape(n_sb, -1) / scale[:, None]), -127, 127)
    q8 = q8.astype(np.int8).reshape(-1)[:len(absmax)]
    parts = {"absmax_q": q8, "absmax_scale": scale, "absmax_offset": np.array([offset])}
    amax = nf4_absmax(parts)
    x = blocks * _safe_inv(amax)[:, None]
    codes = np.searchsorted(_NF4_MIDPOINTS, x, side="left").astype(np.uint8)
    return {"codes": codes.reshape(rows, cols), "absmax_q": q8.reshape(rows, cols // NF4_BLOCK),
            "absmax_scale": scale, "absmax_offset": np.array([offset], np.float32)}


def nf4_absmax(p: dict) -> np.ndarray:
    """The double-quantized absmax of every block of 64 (flat, float32)."""
    q8 = np.asarray(p["absmax_q"]).reshape(-1).astype(np.float32)
    scale = np.asarray(p["absmax_scale"], np.float32)[np.arange(len(q8)) // NF4_DQ_BLOCK]
    return q8 * scale + np.float32(np.asarray(p["absmax_offset"]).reshape(-1)[0])


def nf4_dequantize(p: dict) -> np.ndarray:
    codes = np.asarray(p["codes"])
    rows, cols = codes.shape
    vals = NF4[codes].reshape(-1, NF4_BLOCK) * nf4_absmax(p)[:, None]
    return vals.reshape(rows, cols)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes (rows, cols) in 0..15 -> uint32 (rows, cols/8), element i of a word in
    bits [4i, 4i+4) (MLX's 4-bit order)."""
    c = np.asarray(codes, np.uint32).reshape(codes.shape[0], -1, 8)
    return (c << (4 * np.arange(8, dtype=np.uint32))).sum(2, dtype=np.uint32)


def unpack_nibbles(words: np.ndarray) -> np.ndarray:
    w = np.asarray(words, np.uint32)
    return ((w[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 15).astype(np.uint8) \
        .reshape(w.shape[0], -1)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (rows, cols) -> uint32 (rows, cols*bits/32): one little-endian bit
    stream per row, value i in bits [bits*i, bits*(i+1)) (MLX's affine packing)."""
    q = np.asarray(q, np.uint8)
    rows = q.shape[0]
    stream = ((q[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(rows, -1)
    return np.packbits(stream, axis=1, bitorder="little").view("<u4").astype(np.uint32)


def unpack_bits(words: np.ndarray, bits: int) -> np.ndarray:
    w = np.ascontiguousarray(words, "<u4")
    stream = np.unpackbits(w.view(np.uint8), axis=1, bitorder="little")
    stream = stream.reshape(w.shape[0], -1, bits)
    return (stream << np.arange(bits, dtype=np.uint8)).sum(2, dtype=np.uint8)
