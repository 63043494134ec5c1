"""exp, softmax and SwiGLU for MLX's CPU backend, from ops that `mx.compile` fuses.

On the CPU backend MLX evaluates `exp` (and `sigmoid` and `softmax`, built on it) one
element at a time: 12-25 ns an element on these machines, against ~0.5 ns for a multiply. A training
step takes an exponential of every attention score and of every MLP unit (SiLU), so on
this backend those cost as much as the matmuls around them.

`exp` here is the textbook range reduction, x = n ln 2 + r with n = round(x / ln 2), a
polynomial for e^r (Cephes' expf coefficients, evaluated in Estrin's scheme) and 2^n
written into the exponent bits: multiplies, adds and integer bit operations, which
`mx.compile` fuses into loops the C++ compiler vectorises. Three things keep every loop
vectorisable, because one scalar-only operation makes its whole fused kernel scalar (the
x86 wheel's kernels are plain loops left to the compiler's auto-vectoriser):
- n is rounded by adding and subtracting 1.5 * 2^23 (the float adds round to nearest),
  not by `mx.round` (a libm call per element on baseline x86-64); the same sum's bits
  hold n + 0x4B400000, so 2^n's exponent needs no float-to-int conversion;
- the input is clamped to [-104, 104] on its bits as integers (an order-preserving
  integer key; NaN kept), not by `mx.maximum` / `mx.minimum` / `mx.where`, whose CPU
  forms branch per element on NaN;
- 2^n's biased exponent is clamped to [0, 255] in integers: 0 below the smallest normal
  float32 (the result 0), 255 from x = 88.38 (inf).
The ln 2 of the reduction is split in two (Cody-Waite): n * ln2_hi is exact for |n| < 2^12.
Measured here: ~4 ns an element, against ~11 ns for the same polynomial rounded by
`mx.round` with its limits by `mx.where`, and ~25 ns for MLX's own CPU `exp`; within 2 float32 ulp
of the exact value over the whole range (MLX's: up to 64 ulp; tests/test_fastmath.py
against numpy).

`mx.view` (the bits of a float as an integer, and back) cannot be fused, so `exp` is
four kernels, and none of it is differentiable: softmax and SwiGLU here, and the losses of
mlxtune.forward, call it inside `mx.custom_function`s with their own backward passes.
Each kernel holds a temporary of the input's size, which is why the loss over the
vocabulary (the largest array of a step) runs it in small chunks (mlxtune.forward).

- `softmax`: the backward pass uses the probabilities, as MLX's softmax does;
- `swiglu`: SiLU(gate) * x, mlx_lm's MLP activation, with the sigmoid recomputed in the
  backward pass (cheap now; saving it would hold another [tokens x hidden] array).

`install(model)` routes mlx_lm's `swiglu` through `swiglu` on the CPU backend (the name is
replaced in the model's own module by mlxtune.routing, as for the attention; the decision
is taken per call); mlxtune.attention calls `softmax` itself. Other backends keep MLX's ops:
their `exp` is a vectorised GPU kernel already. MLXTUNE_FASTMATH=0 keeps MLX's ops on the
CPU too.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxtune import backend, routing

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125  # 12 significant bits: n * _LN2_HI is exact for |n| < 2^12
_LN2_LO = 1.428606765330187e-06  # ln 2 - _LN2_HI
# e^r = 1 + r + r^2 P(r) on |r| <= ln 2 / 2 (Cephes expf).
_P = [5.0000001201e-1, 1.6666665459e-1, 4.1665795894e-2, 8.3334519073e-3,
      1.3981999507e-3, 1.9875691500e-4]
_SHIFTER = 12582912.0  # 1.5 * 2^23: x + it - it rounds x to an integer for |x| < 2^22
_SHIFTER_BITS = 0x4B400000  # its float32 bits: the bits of _SHIFTER + n are these + n
_LIMIT = 104.0  # |x| beyond this: e^x is 0 or inf in float32 either way


def _order_key(bits: mx.array) -> mx.array:
    """float32 bits as int32 -> an int32 ordered as the floats are (its own inverse)."""
    return mx.bitwise_xor(bits, mx.bitwise_and(mx.right_shift(bits, 31), 0x7FFFFFFF))


_KEY_LO = int(np.array(-_LIMIT, np.float32).view(np.int32)) ^ 0x7FFFFFFF
_KEY_HI = int(np.array(_LIMIT, np.float32).view(np.int32))


def _clamp_to_limit(x: mx.array, negate: bool) -> mx.array:
    """x (or -x) clamped to [-_LIMIT, _LIMIT], NaN kept, in integer operations only (the
    negation too: a float negation before `mx.view` would be a pass of its own)."""
    bits = mx.view(x, mx.int32)
    if negate:
        bits = mx.bitwise_xor(bits, -0x80000000)
    clamped = _order_key(mx.minimum(mx.maximum(_order_key(bits), _KEY_LO), _KEY_HI))
    nan = mx.right_shift(0x7F800000 - mx.bitwise_and(bits, 0x7FFFFFFF), 31)  # -1 if NaN
    return mx.view(mx.bitwise_xor(clamped, mx.bitwise_and(mx.bitwise_xor(clamped, bits),
                                                          nan)), mx.float32)


def _exp_ops(x: mx.array, negate: bool = False) -> mx.array:
    """e^x (e^-x with negate) of float32 x; for use inside compiled functions."""
    x = _clamp_to_limit(x, negate)
    shifted = x * _LOG2E + _SHIFTER
    n = shifted - _SHIFTER
    r = (x - n * _LN2_HI) - n * _LN2_LO
    r2 = r * r
    r4 = r2 * r2
    p = ((_P[0] + _P[1] * r) + r2 * (_P[2] + _P[3] * r)) + r4 * (_P[4] + _P[5] * r)
    e_r = p * r2 + (r + 1.0)
    biased = mx.view(shifted, mx.int32) + (127 - _SHIFTER_BITS)  # n + 127
    biased = mx.minimum(mx.maximum(biased, 0), 255)
    return _fence(e_r * mx.view(mx.left_shift(biased, 23), mx.float32))


def _fence(x: mx.array) -> mx.array:
    """x, through two no-copy views that `mx.compile` cannot fuse across. The result is
    written out before its consumers run: without it a consumer's ops join the last
    kernel, which then passes MLX's fusion depth, and the ops split off at that limit leave
    a broadcast constant as an input, which makes the whole kernel a strided one (measured:
    SiLU(g) * x at 10.9 ns an element with, 3.6 without)."""
    return mx.view(mx.view(x, mx.int32), mx.float32)


_exp32 = mx.compile(_exp_ops)


def exp(x: mx.array) -> mx.array:
    """e^x computed in float32; the result in x's floating dtype."""
    if x.dtype == mx.float32:
        return _exp32(x)
    return _exp32(x.astype(mx.float32)).astype(x.dtype)


def enabled() -> bool:
    """Whether these forms are used: on the CPU profile (elsewhere MLX's own ops are
    faster; the GPU profile keeps MLX's ops as a GPU would), unless MLXTUNE_FASTMATH=0 asks
    for MLX's ops (to compare, and for the memory planner's calibration, which measures the
    graph that Metal and CUDA run)."""
    return backend.profile() == "cpu" and os.environ.get("MLXTUNE_FASTMATH", "1") != "0"


# ------------------------------------------------------------------------------ softmax

@mx.compile
def _softmax_last(x: mx.array) -> mx.array:
    e = _exp_ops(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@mx.compile
def _softmax_backward(p: mx.array, cotangent: mx.array) -> mx.array:
    return p * (cotangent - (cotangent * p).sum(axis=-1, keepdims=True))


@mx.custom_function
def _softmax32(x: mx.array) -> mx.array:
    return _softmax_last(x)


@_softmax32.vjp
def _softmax32_vjp(_primals, cotangent, output):
    return _softmax_backward(output, cotangent)


def softmax(x: mx.array) -> mx.array:
    """softmax over the last axis of float32 x (MLX's precise softmax off the CPU)."""
    if not enabled():
        return mx.softmax(x, axis=-1, precise=True)
    return _softmax32(x)


# ------------------------------------------------------------------------------- SwiGLU

def _sigmoid_ops(g: mx.array) -> mx.array:
    # 1 / (1 + e^-g): e^-g is 0 for g > 87.3 (sigmoid 1) and inf for g < -88.4 (0).
    return 1 / (1 + _exp_ops(g, negate=True))


@mx.compile
def _swiglu_forward(gate: mx.array, x: mx.array) -> mx.array:
    g = gate.astype(mx.float32)
    return (g / (1 + _exp_ops(g, negate=True))).astype(gate.dtype) * x


@mx.compile
def _swiglu_backward(gate: mx.array, x: mx.array, cotangent: mx.array):
    g = gate.astype(mx.float32)
    s = _sigmoid_ops(g)
    c = cotangent.astype(mx.float32)
    silu = g * s
    d_gate = c * x.astype(mx.float32) * (s + silu * (1 - s))
    return d_gate.astype(gate.dtype), (c * silu).astype(x.dtype)


@mx.custom_function
def _swiglu(gate: mx.array, x: mx.array) -> mx.array:
    return _swiglu_forward(gate, x)


@_swiglu.vjp
def _swiglu_vjp(primals, cotangent, _output):
    return _swiglu_backward(*primals, cotangent)


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """SiLU(gate) * x, as mlx_lm.models.activations.swiglu, the sigmoid in float32."""
    return _swiglu(gate, x)


def _routed(original):
    def routed_swiglu(gate, x):
        if enabled() and gate.dtype in (mx.float32, mx.bfloat16, mx.float16):
            return _swiglu(gate, x)
        return original(gate, x)

    return routed_swiglu


def install(model: nn.Module) -> bool:
    """Route the model module's `swiglu` (mlx_lm's MLP activation) through `swiglu` on the
    CPU backend, decided per call. Returns whether the module uses it."""
    return routing.route(model, "swiglu", _routed)
