"""Quantization formats: our numpy references against gguf-py's dequantizers (bit for bit),
the MLX layouts against the references, and NF4 against its definition."""

from statistics import NormalDist

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from mlxtune.quant import formats as F
from mlxtune.quant import layouts

TYPES = list(F.BLOCKS)


@pytest.fixture(autouse=True)
def on_the_cpu():
    """Bit-for-bit claims are about the CPU path (GPU compilers may contract a*b+c)."""
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)


def random_blocks(kind: str, n: int = 64, seed: int = 0) -> np.ndarray:
    """Random bytes everywhere (every code, scale and min bit pattern), with the float16
    fields replaced by finite values of mixed sign and magnitude."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, F.BLOCKS[kind][1]), dtype=np.uint8)
    c = F.unpack(raw, kind)
    for key in ("d", "m", "dmin"):
        if key in c:
            c[key] = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 1, n)).astype(np.float16)
    return F.pack(c, kind)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("kind", TYPES)
def test_dequantize_matches_gguf_bit_for_bit(kind):
    raw = random_blocks(kind)
    ours = F.dequantize(F.unpack(raw, kind), kind)
    theirs = gguf_dequantize(raw, getattr(T, kind)).reshape(ours.shape)
    np.testing.assert_array_equal(bits(ours), bits(theirs))


@pytest.mark.parametrize("kind", TYPES)
def test_pack_inverts_unpack(kind):
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(40, F.BLOCKS[kind][1]), dtype=np.uint8)  # any bytes
    np.testing.assert_array_equal(F.pack(F.unpack(raw, kind), kind), raw)


@pytest.mark.parametrize("kind", TYPES)
def test_quantizer_round_trips_within_a_step(kind):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 512)).astype(np.float32)
    raw = F.quantize(w, kind)
    back = gguf_dequantize(raw, getattr(T, kind)).reshape(w.shape)
    levels = {"Q4_0": 15, "Q4_1": 15, "Q5_0": 31, "Q5_1": 31, "Q8_0": 254, "Q4_K": 15,
              "Q5_K": 31, "Q6_K": 63}[kind]
    # error within ~one quantization step of the block's range (K-quants: 6-bit scales)
    step = (w.max() - w.min()) / levels
    assert np.abs(back - w).max() < 1.5 * step
    assert np.sqrt(np.mean((back - w) ** 2)) < 0.5 * step


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_our_blocks_agree_with_gguf_quantize_layout(kind):
    """gguf-py's own quantizer's output decodes identically through our unpack."""
    rng = np.random.default_rng(3)
    raw = gguf_quantize(rng.standard_normal((4, 256)).astype(np.float32), getattr(T, kind))
    raw = raw.reshape(-1, F.BLOCKS[kind][1])
    np.testing.assert_array_equal(
        bits(F.dequantize(F.unpack(raw, kind), kind).reshape(-1)),
        bits(gguf_dequantize(raw, getattr(T, kind)).reshape(-1)))


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16"])
def test_dense_types(kind):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 64)).astype(np.float32)
    raw = gguf_quantize(w, getattr(T, kind)) if kind == "BF16" else w.astype(F.DENSE[kind])
    raw = np.ascontiguousarray(raw).view(np.uint8)
    theirs = gguf_dequantize(raw.view(F.DENSE[kind]) if kind != "BF16" else raw,
                             getattr(T, kind)).reshape(w.shape)
    np.testing.assert_array_equal(bits(F.dequantize_raw(raw, kind, w.shape)), bits(theirs))


# -- MLX layouts --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(layouts.AFFINE_TYPES))
def test_affine_layout_is_exact_with_mlx_dequantize(kind):
    rows, cols = 6, 512
    raw = random_blocks(kind, rows * cols // F.BLOCKS[kind][0], seed=5)
    arrays, q = layouts.gguf_affine(raw, kind, (rows, cols))
    # In float32, as on the CPU backend (cast_floats; with float16 scales MLX computes in
    # float16).
    got = mx.dequantize(mx.array(arrays["weight"]), mx.array(arrays["scales"], mx.float32),
                        mx.array(arrays["biases"], mx.float32), group_size=q["group_size"],
                        bits=q["bits"])
    ref = gguf_dequantize(raw, getattr(T, kind)).reshape(rows, cols)
    # Equal as numbers; scale*q + bias gives +0.0 where ggml's d*(q-8) gives -0.0.
    np.testing.assert_array_equal(np.array(got), ref)
    expected = np.float32 if kind.endswith("_K") else np.float16
    assert arrays["scales"].dtype == expected and arrays["biases"].dtype == expected


def test_q6_k_layout_mlx_dequantize_bit_for_bit_and_back():
    rows, cols = 5, 768
    raw = random_blocks("Q6_K", rows * cols // 256, seed=6)
    arrays = layouts.gguf_q6_k(raw, (rows, cols))
    got = layouts.dequantize("q6_k", {k: mx.array(v) for k, v in arrays.items()})
    ref = gguf_dequantize(raw, T.Q6_K).reshape(rows, cols)
    np.testing.assert_array_equal(bits(np.array(got)), bits(ref))
    np.testing.assert_array_equal(layouts.q6_k_to_gguf(arrays), raw.reshape(rows, -1))
    assert sum(v.nbytes for v in arrays.values()) == raw.nbytes   # same 6.5625 bits/weight


# -- NF4 ----------------------------------------------------------------------------------

def test_nf4_levels_are_normal_quantiles():
    """QLoRA's construction: 8 positive and 7 negative quantiles of N(0,1) between
    offset = 0.5*(1/(2*15) + 1/(2*16)) and 1 - offset... as in the paper's appendix:
    quantiles at evenly spaced probabilities from 0.9677 down to 0.5, normalized."""
    offset = 0.9677083
    n = NormalDist()
    pos = [n.inv_cdf(offset + (0.5 - offset) * i / 8) for i in range(8)]
    neg = [-n.inv_cdf(offset + (0.5 - offset) * i / 7) for i in range(7)]
    levels = np.sort(np.array(pos + [0.0] + neg))
    levels /= np.abs(levels).max()
    np.testing.assert_allclose(F.NF4, levels.astype(np.float32), atol=2e-7)


def test_nf4_reference_quantizer():
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((48, 320)) * rng.uniform(0.01, 1, (48, 1))).astype(np.float32)
    p = F.nf4_quantize(w)
    assert p["codes"].dtype == np.uint8 and p["codes"].max() <= 15
    assert p["absmax_q"].shape == (48, 5) and p["absmax_q"].dtype == np.int8
    assert p["absmax_scale"].shape == (1,)      # 240 blocks -> one block of 256
    back = F.nf4_dequantize(p)
    blocks, backb = w.reshape(-1, 64), back.reshape(-1, 64)
    absmax = np.abs(blocks).max(1)
    # double quantization costs little: absmax within 1/254 of the range of |absmax - mean|
    dq = F.nf4_absmax(p)
    assert np.abs(dq - absmax).max() <= np.abs(absmax - absmax.mean()).max() / 254 * 1.001
    # each weight is the nearest level times the (double-quantized) absmax
    x = blocks / dq[:, None]
    nearest = np.abs(x[..., None] - F.NF4).argmin(-1)
    assert (F.NF4[nearest] == F.NF4[p["codes"].reshape(-1, 64)]).mean() > 0.999  # ties aside
    np.testing.assert_array_equal(backb, F.NF4[p["codes"].reshape(-1, 64)] * dq[:, None])
    rel = np.sqrt(((back - w) ** 2).mean(1) / (w ** 2).mean(1))
    assert rel.max() < 0.12    # NF4 on Gaussian weights: ~9% relative RMS error


def test_nf4_zero_and_constant_blocks():
    w = np.zeros((2, 128), np.float32)
    w[1, 64:] = 3.0
    back = F.nf4_dequantize(F.nf4_quantize(w))
    np.testing.assert_allclose(back, w, atol=3.0 / 254 * 1.001)
    assert np.all(back[0] == 0)


def test_nf4_mlx_layout_bit_for_bit():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((40, 448)).astype(np.float32)
    arrays = layouts.nf4_from_dense(w)
    assert arrays["weight"].dtype == np.uint32 and arrays["weight"].shape == (40, 56)
    ref = F.nf4_dequantize(layouts.nf4_to_reference(arrays))
    got = layouts.dequantize("nf4", {k: mx.array(v) for k, v in arrays.items()})
    np.testing.assert_array_equal(bits(np.array(got)), bits(ref))
    np.testing.assert_array_equal(F.unpack_nibbles(arrays["weight"]), F.nf4_quantize(w)["codes"])


@pytest.mark.parametrize("fmt", ["nf4", "q6_k"])
def test_gathered_rows_dequantize_like_the_matrix(fmt):
    rng = np.random.default_rng(9)
    w = rng.standard_normal((300, 256)).astype(np.float32)
    arrays = layouts.nf4_from_dense(w) if fmt == "nf4" else \
        layouts.gguf_q6_k(F.quantize(w, "Q6_K"), w.shape)
    a = {k: mx.array(v) for k, v in arrays.items()}
    ids = mx.array([[0, 299, 17], [150, 150, 3]])
    rows = layouts.dequantize_rows(fmt, layouts.gather_rows(fmt, a, ids))
    full = np.array(layouts.dequantize(fmt, a))
    np.testing.assert_array_equal(np.array(rows), full[np.array(ids)])


def test_pack_bits_is_mlx_order():
    rng = np.random.default_rng(10)
    for b in (2, 3, 4, 5, 6, 8):
        q = rng.integers(0, 2 ** b, size=(3, 64))
        words = F.pack_bits(q, b)
        np.testing.assert_array_equal(F.unpack_bits(words, b), q)
        got = mx.dequantize(mx.array(words), mx.ones((3, 2)), mx.zeros((3, 2)),
                            group_size=32, bits=b)
        np.testing.assert_array_equal(np.array(got), q)
