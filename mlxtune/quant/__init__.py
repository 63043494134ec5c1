"""The quantized base: quantize a dense model on load, and the CPU compute path.

Formats: MLX's affine layout (nn.QuantizedLinear / nn.QuantizedEmbedding, MLX's kernels)
and our own, NF4 and GGUF Q6_K (layers.QuantLinear / QuantEmbedding, our kernels); numpy
references in `formats`, MLX layouts in `layouts`, kernels in `kernels` (docs/kernels.md).

On Metal and CUDA, MLX's own quantized kernels are the fast path and layers stay as they
are. On the CPU backend `mx.quantized_matmul` runs at a few GFLOP/s, while dequantizing a
layer's weight and handing the product to BLAS is ~20x faster (see
shared notes). The custom VJP below recomputes the dequantization in the backward pass, so
no dense copy of a weight outlives its use: that is what keeps QLoRA's memory small.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

from mlxtune.quant.layers import QuantEmbedding, QuantLinear

QUANTIZED_TYPES = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantLinear, QuantEmbedding)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZED_TYPES) for _, m in model.named_modules())


def dense_copy_wanted(setting, quantized: bool, dense_bytes: int,
                      profile: str | None = None) -> bool:
    """eval.dense_base / objective.dense_base: dequantize a quantized base once and compute
    with the dense copy (the same function). True / False as given; auto: on the CPU
    profile (where quantized weights are dequantized for every product anyway) when the
    copy takes under a quarter of the machine's memory. Shared by the runs (`profile`:
    this process's) and the planner (the profile of the machine it plans)."""
    from mlxtune import backend

    if not quantized:
        return False
    if setting is True or setting is False:
        return setting
    if (profile or backend.profile()) != "cpu":
        return False
    return dense_bytes < backend.system_memory_bytes() / 4


def own_formats(model: nn.Module) -> list[str]:
    """Our formats ('nf4', 'q6_k') that `model`'s layers hold, each once: the kernels it
    dispatches to on Metal/CUDA."""
    return sorted({m.format for _, m in model.named_modules()
                   if isinstance(m, (QuantLinear, QuantEmbedding))})


def linear_geometry(linear: nn.Module) -> tuple[int, int, mx.Dtype]:
    """(output dims, input dims, floating dtype) of any linear layer we may wrap."""
    if isinstance(linear, QuantLinear):
        return linear.output_dims, linear.input_dims, linear.dtype
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        return out_dims, in_dims * 32 // linear.bits, linear["scales"].dtype
    return out_dims, in_dims, linear.weight.dtype


def dense_size(layer: nn.Module) -> int:
    """How many weights one of our quantized layers stands for."""
    if isinstance(layer, QuantLinear):
        return layer.input_dims * layer.output_dims
    return layer.num_embeddings * layer.dims


def quantize_nf4(model: nn.Module, embeddings: bool = False) -> int:
    """Replace every linear layer of the transformer blocks whose input size 64 divides by
    its NF4 form (double-quantized). As in QLoRA (bitsandbytes' 4-bit loading), the
    embeddings and the output layer stay in the compute dtype unless `embeddings`.
    Returns how many layers were quantized."""
    from mlx.utils import tree_unflatten

    swaps = []
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.weight.shape[-1] % 64 == 0 and \
                (embeddings or ".layers." in f".{path}"):
            swaps.append((path, QuantLinear.from_linear(m)))
        elif embeddings and isinstance(m, nn.Embedding) and m.weight.shape[-1] % 64 == 0:
            swaps.append((path, QuantEmbedding.from_embedding(m)))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def quantize_dense(model: nn.Module, bits: int, group_size: int) -> int:
    """Quantize every linear and embedding layer whose input size the group size divides
    (MLX affine format). Returns how many layers were quantized."""
    count = 0

    def predicate(_path, module):
        nonlocal count
        if not hasattr(module, "to_quantized"):
            return False
        if module.weight.shape[-1] % group_size != 0:
            return False  # e.g. odd-sized heads; they stay dense
        count += 1
        return True

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    return count


@functools.cache
def _dequantized_matmul(group_size: int, bits: int, mode: str):
    """x @ dequantize(w).T with a backward that re-dequantizes instead of keeping w."""

    def dense(w, scales, biases, dtype, after):
        # Only once `after` exists, or compiled graphs hold every layer's dense weight at
        # once (see layers._cpu_matmul).
        w, scales, biases = mx.depends([w, scales, biases], [after])
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits,
                             mode=mode, dtype=dtype)

    @mx.custom_function
    def matmul(x, w, scales, biases):
        return x @ dense(w, scales, biases, x.dtype, x).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, _output):
        x, w, scales, biases = primals
        # The base is frozen: only x gets a gradient.
        dx = cotangent @ dense(w, scales, biases, cotangent.dtype, cotangent)
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return matmul


class DequantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear (same parameters, same saved layout) computed by
    dequantize-then-BLAS. Installed on the CPU backend by `use_cpu_path`."""

    def __call__(self, x):
        fn = _dequantized_matmul(self.group_size, self.bits, self.mode)
        y = fn(x, self["weight"], self["scales"], self["biases"])
        if "bias" in self:
            y = y + self["bias"]
        return y


class DequantizedEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose tied output projection (`as_linear`) uses BLAS."""

    def as_linear(self, x):
        fn = _dequantized_matmul(self.group_size, self.bits, self.mode)
        return fn(x, self["weight"], self["scales"], self["biases"])


def _swap_classes(model: nn.Module, linear: type, embedding: type, when) -> list:
    """Give MLX's own QuantizedLinear / QuantizedEmbedding layers for which `when(layer)`
    holds the subclass `linear` / `embedding` (same parameters, same saved layout, still
    instances of MLX's classes); returns the layers switched."""
    swapped = []
    for _, m in model.named_modules():
        new = {nn.QuantizedLinear: linear, nn.QuantizedEmbedding: embedding}.get(type(m))
        if new is not None and when(m):
            m.__class__ = new
            swapped.append(m)
    return swapped


def use_cpu_path(model: nn.Module) -> int:
    """Switch quantized layers to the dequantize-then-BLAS path. The layers keep their
    parameters and type (they stay `nn.QuantizedLinear` for every isinstance check); only
    the compute changes. Returns the number of layers switched."""
    return len(_swap_classes(
        model, DequantizedLinear, DequantizedEmbedding,
        lambda m: getattr(m, "mode", "affine") == "affine" and "biases" in m))


def _lossless(src: mx.Dtype, dst: mx.Dtype) -> bool:
    return src == dst or dst == mx.float32


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast every floating-point parameter (weights, norms) to `dtype`; packed integer
    weights are left alone, and so is the packed state of our own formats (its float parts
    are part of the format; those layers compute in `dtype`). The scales and biases of
    MLX's affine layers are part of the quantized weight: they are cast only where that is
    exact (to float32), never rounded (a GGUF's float16 scales through bfloat16 would make
    a model that computes another function than the file llama.cpp serves); such layers
    then compute in the wider dtype and return `dtype` (`keep_compute_dtype`)."""
    from mlx.utils import tree_flatten, tree_unflatten

    for _, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            m.dtype = dtype
    own = {id(m[k]) for _, m in model.named_modules()
           if isinstance(m, (QuantLinear, QuantEmbedding)) for k in m if k != "bias"}
    affine = {id(m[k]) for _, m in model.named_modules()
              if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
              for k in ("scales", "biases") if k in m}

    def cast(p):
        if id(p) in own or not mx.issubdtype(p.dtype, mx.floating):
            return p
        if id(p) in affine and not _lossless(p.dtype, dtype):
            return p
        return p.astype(dtype)

    model.update(tree_unflatten([(k, cast(v)) for k, v in tree_flatten(model.parameters())]))


class ComputeDtypeLinear(nn.QuantizedLinear):
    """A QuantizedLinear (MLX's own kernels, forward and backward) whose scales are wider
    than the compute dtype: MLX computes the product in the wider dtype, and the output is
    returned in the input's dtype, as if the layer computed in it."""

    def __call__(self, x):
        return super().__call__(x).astype(x.dtype)


class ComputeDtypeEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding that returns rows (and, tied, logits) in the compute dtype
    rather than its scales' dtype."""

    def __call__(self, x):
        return super().__call__(x).astype(self.compute_dtype)

    def as_linear(self, x):
        return super().as_linear(x).astype(x.dtype)


def keep_compute_dtype(model: nn.Module, dtype: mx.Dtype) -> int:
    """On the GPU path (MLX's quantized layers as they are), make the affine layers whose
    scales are not in `dtype` return `dtype`. Their type stays a subclass of MLX's, so
    isinstance checks and the saved layout are unchanged. Returns the layers switched."""
    swapped = _swap_classes(model, ComputeDtypeLinear, ComputeDtypeEmbedding,
                            lambda m: m["scales"].dtype != dtype)
    for m in swapped:
        m.compute_dtype = dtype  # what ComputeDtypeEmbedding returns its rows in
    return len(swapped)
