"""exp, softmax and SwiGLU for MLX's CPU backend, from ops that `mx.compile` fuses.

On the CPU backend MLX evaluates `exp` (and `sigmoid` and `softmax`, built on it) one
element at a time: ~12-15 ns an element here, against ~0.3 ns for a multiply. A training
step takes an exponential of every attention score and of every MLP unit (SiLU), so on
this backend those cost as much as the matmuls around them.

`exp` here is the textbook range reduction, x = n ln 2 + r with n = round(x / ln 2), a
polynomial for e^r (Cephes' expf coefficients, evaluated in Estrin's scheme) and 2^n
written into the exponent bits: multiplies, adds, a rounding and a shift, which
`mx.compile` fuses into loops the C++ compiler vectorises. The ln 2 of the reduction is
split in two (Cody-Waite): r uses the high part, exactly, and the low part's
e^(-n ln2_lo) ~ 1 - n ln2_lo is a factor at the end. Measured here: ~3.5 ns an element
against ~12 ns, within 2 float32 ulp of the exact value over the whole range (MLX's own
CPU `exp`: up to 64 ulp; tests/test_fastmath.py against numpy). Results below the
smallest normal float32 are 0, and from 88.38 (where 2^n leaves the float range) inf.

Two constraints of MLX's compiler shape the code: a fused kernel is at most 11 ops deep,
so `exp` is two kernels (`_exp_parts`, then `_exp_finish`); and `mx.view` (the bits of
2^n as a float) cannot be fused, so it sits between them. Each call holds two temporaries
of the input's size; that is why the loss over the vocabulary (the largest array of a
step) keeps MLX's ops, and only the per-block attention scores and the MLP activations
use these.

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

from mlxtune import backend, routing

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125  # 12 significant bits: n * _LN2_HI is exact for |n| < 2^12
_LN2_LO = 1.428606765330187e-06  # ln 2 - _LN2_HI
# e^r = 1 + r + r^2 P(r) on |r| <= ln 2 / 2 (Cephes expf).
_P = [5.0000001201e-1, 1.6666665459e-1, 4.1665795894e-2, 8.3334519073e-3,
      1.3981999507e-3, 1.9875691500e-4]
_OVERFLOW = 88.37626  # n = 128 from here: 2^n is not a float32
_UNDERFLOW = -87.33654  # e^x below the smallest normal float32


def _exp_parts(x: mx.array):
    """e^r and the exponent bits of 2^n (11 ops deep: one fused kernel)."""
    n = mx.round(x * _LOG2E)
    r = x - n * _LN2_HI
    r2 = r * r
    r4 = r2 * r2
    p = ((_P[0] + _P[1] * r) + r2 * (_P[2] + _P[3] * r)) + r4 * (_P[4] + _P[5] * r)
    return p * r2 + (r + 1.0), mx.left_shift(n.astype(mx.int32) + 127, 23)


def _exp_finish(x: mx.array, e_r: mx.array, bits: mx.array) -> mx.array:
    n = mx.round(x * _LOG2E)
    y = (e_r - e_r * (n * _LN2_LO)) * mx.view(bits, mx.float32)
    y = mx.where(x >= _OVERFLOW, mx.array(float("inf"), mx.float32), y)
    return mx.where(x < _UNDERFLOW, mx.array(0.0, mx.float32), y)


def _exp_ops(x: mx.array) -> mx.array:  # float32 x; for use inside compiled functions
    return _exp_finish(x, *_exp_parts(x))


_exp32 = mx.compile(_exp_ops)


def exp(x: mx.array) -> mx.array:
    """e^x computed in float32; the result in x's floating dtype."""
    if x.dtype == mx.float32:
        return _exp32(x)
    return _exp32(x.astype(mx.float32)).astype(x.dtype)


def enabled() -> bool:
    """Whether these forms are used: on the CPU backend (elsewhere MLX's own ops are
    faster), unless MLXTUNE_FASTMATH=0 asks for MLX's ops (to compare, and for the memory
    planner's calibration, which measures the graph that Metal and CUDA run)."""
    return backend.name() == "cpu" and os.environ.get("MLXTUNE_FASTMATH", "1") != "0"


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
    return 1 / (1 + _exp_ops(-g))


@mx.compile
def _swiglu_forward(gate: mx.array, x: mx.array) -> mx.array:
    g = gate.astype(mx.float32)
    return (g * _sigmoid_ops(g)).astype(gate.dtype) * x


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
