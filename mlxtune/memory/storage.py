"""How many bytes each weight takes in memory once mlxtune has loaded it.

What counts is the layout in memory after loading (mlxtune.models, mlxtune.quant), not
the file: every floating-point array of the base is cast to the compute dtype
(quant.cast_floats), including the scales and biases of MLX's affine format, while the
packed state of mlxtune's own formats (nf4, q6_k) keeps its own types.

  dense            rows * cols * c                              (c: compute dtype bytes)
  affine b-bit/g   rows * cols * b/8 + 2 * rows * cols/g * c    (MLX affine: uint32 codes,
                                                                 scale + bias per group)
  nf4              rows * cols * (1/2 + 1/64) + 4 * ceil(rows * cols / 64 / 256) + 4
                   (4-bit codes, int8 absmax per 64, float32 scale per 256 absmaxes)
  q6_k             rows * cols * (1/2 + 1/4 + 1/16) + 2 * rows * cols / 256
                   (low 4 bits, high 2 bits, int8 scale per 16, float16 d per 256)

GGUF types map onto these as mlxtune.models.gguf loads them: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0
Q4_K Q5_K -> affine (4, 4, 5, 5, 8, 4, 5 bits, group 32); Q6_K -> q6_k (for linear and
embedding matrices); F32 / F16 / BF16 and every other type -> dense in the compute dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GGUF_AFFINE = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5}
GGUF_OWN = {"Q6_K": "q6_k"}
# GGUF block sizes (elements, bytes), for the on-disk size in descriptions.
GGUF_BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18),
               "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
               "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176),
               "Q6_K": (256, 210), "Q8_K": (256, 292)}


@dataclass(frozen=True)
class Format:
    """A weight's layout in memory: kind 'dense' | 'affine' | 'nf4' | 'q6_k'."""
    kind: str
    bits: int = 0
    group_size: int = 0

    def label(self) -> str:
        if self.kind == "affine":
            return f"affine {self.bits}-bit/g{self.group_size}"
        return self.kind

    @property
    def quantized(self) -> bool:
        return self.kind != "dense"


DENSE = Format("dense")
NF4 = Format("nf4")
Q6_K = Format("q6_k")


def affine(bits: int, group_size: int) -> Format:
    return Format("affine", bits, group_size)


def from_gguf_type(name: str, two_d: bool = True) -> Format:
    """The in-memory format of a GGUF tensor type (see the module docstring)."""
    if name in GGUF_AFFINE and two_d:
        return affine(GGUF_AFFINE[name], 32)
    if name in GGUF_OWN and two_d:
        return Q6_K
    return DENSE


def nbytes(fmt: Format, rows: int, cols: int, compute_bytes: int) -> int:
    """Bytes of a rows x cols weight held in `fmt`, floats in `compute_bytes` each."""
    n = rows * cols
    if fmt.kind == "dense":
        return n * compute_bytes
    if fmt.kind == "affine":
        groups = rows * math.ceil(cols / fmt.group_size)
        return n * fmt.bits // 8 + 2 * groups * compute_bytes
    if fmt.kind == "nf4":
        blocks = n // 64
        return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4
    if fmt.kind == "q6_k":
        return n // 2 + n // 4 + n // 16 + 2 * (n // 256)
    raise ValueError(f"unknown weight format {fmt.kind}")


def bits_per_weight(fmt: Format, compute_bytes: int, cols: int = 4096) -> float:
    """Average bits per weight of a large matrix in `fmt` (for descriptions)."""
    return 8 * nbytes(fmt, 256, cols, compute_bytes) / (256 * cols)


def gguf_file_bytes(type_name: str, n: int) -> int | None:
    block = GGUF_BLOCKS.get(type_name)
    if block is None:
        return None
    return n // block[0] * block[1]
