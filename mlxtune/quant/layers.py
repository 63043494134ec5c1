"""Linear and embedding layers over our own formats (nf4, q6_k), with a custom VJP.

`y = x @ W.T` is computed without ever keeping a dense W: on the CPU backend W is
dequantized (MLX ops) for the product and again for the backward pass, then dropped; on
Metal and CUDA the kernels in kernels/ read the packed weights directly. The base is
frozen, so the backward pass returns a gradient for x only (zeros for the packed arrays,
never evaluated). `with_lora` adds the LoRA term; on GPUs it is fused into the kernel's
epilogue, with its gradients (for x, x@A and B) written out in the VJP.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

from mlxtune.quant import layouts


def _backend() -> str:
    """'cpu' for the dequantize-then-BLAS path (the CPU profile), else 'gpu': our kernels'
    dispatch (on a CPU under the GPU profile, served by their reference at the launch)."""
    from mlxtune import backend

    return backend.profile()


def _packed(layer) -> tuple:
    return tuple(layer[k] for k in layouts.KEYS[layer.format])


@functools.cache
def _cpu_matmul(fmt: str):
    keys = layouts.KEYS[fmt]

    def dense(packed, dtype, after):
        # Dequantize only once `after` exists: under mx.compile the scheduler otherwise
        # computes every layer's dense weight early and keeps them all alive (measured:
        # 24 layers of 1024 x 1024 held ~100 MB more than the dense model at peak).
        packed = mx.depends(list(packed), [after])
        return layouts.dequantize(fmt, dict(zip(keys, packed)), dtype)

    @mx.custom_function
    def matmul(x, *packed):
        return x @ dense(packed, x.dtype, x).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, _output):
        x, *packed = primals
        dx = cotangent @ dense(packed, cotangent.dtype, cotangent)
        return (dx, *[mx.zeros_like(p) for p in packed])

    return matmul


@functools.cache
def _gpu_matmul(fmt: str, lora: bool):
    """x @ W.T (+ scale * xa @ b) through our kernels, with the VJP written out."""
    from mlxtune.quant import kernels

    keys = layouts.KEYS[fmt]

    def flat(a):
        return a.reshape(-1, a.shape[-1])

    if not lora:
        @mx.custom_function
        def matmul(x, *packed):
            y = kernels.matmul(fmt, flat(x), dict(zip(keys, packed)))
            return y.reshape(*x.shape[:-1], y.shape[-1])

        @matmul.vjp
        def matmul_vjp(primals, g, _output):
            x, *packed = primals
            dx = kernels.matmul(fmt, flat(g), dict(zip(keys, packed)), transpose=True)
            return (dx.reshape(x.shape), *[mx.zeros_like(p) for p in packed])

        return matmul

    @mx.custom_function
    def matmul_lora(x, xa, b, scale, *packed):
        y = kernels.matmul(fmt, flat(x), dict(zip(keys, packed)),
                           lora=(flat(xa), b, scale))
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @matmul_lora.vjp
    def matmul_lora_vjp(primals, g, _output):
        x, xa, b, scale, *packed = primals
        g2 = flat(g)
        dx = kernels.matmul(fmt, g2, dict(zip(keys, packed)), transpose=True)
        gs = g2 * scale.astype(g2.dtype)
        dxa = (gs @ b.T).reshape(xa.shape)
        db = flat(xa).T @ gs
        return (dx.reshape(x.shape), dxa, db, mx.zeros_like(scale),
                *[mx.zeros_like(p) for p in packed])

    return matmul_lora


class QuantLinear(nn.Module):
    """A frozen linear layer whose weight is held in one of our formats ('nf4', 'q6_k')."""

    def __init__(self, fmt: str, arrays: dict, input_dims: int, output_dims: int,
                 bias=None):
        super().__init__()
        self.format = fmt
        self.input_dims, self.output_dims = input_dims, output_dims
        self.dtype = mx.float32          # compute dtype, set by quant.cast_floats
        for k in layouts.KEYS[fmt]:
            setattr(self, k, mx.array(arrays[k]))
        if bias is not None:
            self.bias = bias
        self.freeze()

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "nf4") -> "QuantLinear":
        import numpy as np

        if fmt != "nf4":
            raise ValueError(f"quantizing a dense layer to {fmt} is not supported")
        w = np.array(linear.weight.astype(mx.float32))
        bias = linear.bias if "bias" in linear else None
        return cls(fmt, layouts.nf4_from_dense(w), w.shape[1], w.shape[0], bias)

    def dense_weight(self, dtype=mx.float32):
        return layouts.dequantize(self.format, {k: self[k] for k in layouts.KEYS[self.format]},
                                  dtype)

    def _matmul(self, x):
        if _backend() == "cpu":
            return _cpu_matmul(self.format)(x, *_packed(self))
        return _gpu_matmul(self.format, False)(x, *_packed(self))

    def __call__(self, x):
        y = self._matmul(x)
        return y + self["bias"] if "bias" in self else y

    def with_lora(self, x, xa, b, scale: float):
        """self(x) + scale * xa @ b, with xa = x @ A already computed (dropout applied)."""
        if _backend() == "cpu":
            return self(x) + (scale * (xa @ b)).astype(x.dtype)
        fn = _gpu_matmul(self.format, True)
        y = fn(x, xa.astype(x.dtype), b.astype(x.dtype), mx.array([scale], mx.float32),
               *_packed(self))
        return y + self["bias"] if "bias" in self else y

    def _extra_repr(self):
        return f"format={self.format}, input_dims={self.input_dims}, " \
               f"output_dims={self.output_dims}, bias={'bias' in self}"


class QuantEmbedding(nn.Module):
    """A frozen embedding in one of our formats; `as_linear` for tied output layers."""

    def __init__(self, fmt: str, arrays: dict, num_embeddings: int, dims: int):
        super().__init__()
        self.format = fmt
        self.num_embeddings, self.dims = num_embeddings, dims
        self.dtype = mx.float32
        for k in layouts.KEYS[fmt]:
            setattr(self, k, mx.array(arrays[k]))
        self.freeze()

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, fmt: str = "nf4") -> "QuantEmbedding":
        import numpy as np

        w = np.array(emb.weight.astype(mx.float32))
        return cls(fmt, layouts.nf4_from_dense(w), w.shape[0], w.shape[1])

    def __call__(self, ids):
        a = layouts.gather_rows(self.format, {k: self[k] for k in layouts.KEYS[self.format]},
                                ids)
        return layouts.dequantize_rows(self.format, a, self.dtype)

    def as_linear(self, x):
        if _backend() == "cpu":
            return _cpu_matmul(self.format)(x, *_packed(self))
        return _gpu_matmul(self.format, False)(x, *_packed(self))

    def _extra_repr(self):
        return f"format={self.format}, {self.num_embeddings}, {self.dims}"
