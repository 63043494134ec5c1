"""Base + adapter merged into one GGUF file (f32, f16 or q8_0), from a GGUF base.

The new file keeps the base's metadata (architecture, hyperparameters, tokenizer, chat
template) with their GGUF types, and its tensors in the same order and names. Each tensor
is decoded (gguf-py's dequantizers), the adapter merged into the weights it adapts (in
the file's own row order: llama.cpp's Q/K interleave for the llama family; LoRA adds its
change, DoRA rescales each row of W + change to its magnitude, a full fine-tune replaces
the blocks' tensors with its own, norms stored as llama.cpp stores them), and
re-encoded: 2-D weights in the chosen type (q8_0 falls back to f16 for rows that are not
a multiple of its 32-value block, as llama.cpp's converter does), 1-D tensors (norms,
biases) in f32. Tensors are written one at a time, so the dense model never exists whole
in memory.

Without a LoRA this writes a dequantized copy of the base (what the tests compare
llama.cpp against: its quantized dot products add noise that would hide real errors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from mlxtune.export.lora import ExportError, Lora, check_shapes, gguf_tensor_name, to_gguf_rows

_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}   # gguf.LlamaFileType: ALL_F32, MOSTLY_F16/Q8_0
# Reader bookkeeping, not metadata; the writer sets these itself.
_SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type")


def _target_type(shape: tuple, outtype: str):
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2 or outtype == "f32":
        return T.F32
    if outtype == "q8_0" and shape[-1] % 32 == 0:
        return T.Q8_0
    return T.F16


def _nbytes(shape: tuple, qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _decode(f, t) -> np.ndarray:
    """A tensor of the mapped base file as float32, rows first."""
    from gguf.quants import dequantize

    raw = f.data(t)
    try:
        return dequantize(raw.reshape(int(np.prod(t.shape[:-1])), -1), t.type) \
            .reshape(t.shape).astype(np.float32, copy=False)
    except NotImplementedError:
        raise ExportError(f"{f.path}: tensor {t.name} is stored as {t.type.name}, which "
                          "cannot be decoded here (gguf-py has no dequantizer for it)")


def _encode(x: np.ndarray, qtype) -> np.ndarray:
    from gguf.quants import quantize

    return np.ascontiguousarray(quantize(np.ascontiguousarray(x, np.float32), qtype))


def _dora_rows(x: np.ndarray, delta: np.ndarray, m: np.ndarray) -> np.ndarray:
    """DoRA's merged weight from the base `x` and LoRA's change, rows in any one order
    (the magnitudes `m` in the same order)."""
    v = x + delta
    norm = np.sqrt((v.astype(np.float64) ** 2).sum(axis=1))
    return (v * (m / norm)[:, None]).astype(np.float32)


def deltas(lora: Lora) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """GGUF tensor name -> a function from the base tensor (file row order) to the merged
    one."""
    base = lora.base
    out = {}
    if lora.kind == "full":
        from mlxtune.export.lora import gguf_param_name, to_gguf_value

        for name, w in lora.weights.items():
            out[gguf_param_name(name, base)] = \
                (lambda x, name=name, w=w: to_gguf_value(w, name, base).reshape(x.shape))
        return out
    for (layer, key) in lora.pairs:
        name = gguf_tensor_name(layer, key, base)
        if lora.kind == "dora":
            out[name] = (lambda x, layer=layer, key=key: _dora_rows(
                x, to_gguf_rows(lora.delta(layer, key), key, base),
                to_gguf_rows(lora.magnitudes[(layer, key)], key, base)))
        else:
            out[name] = (lambda x, layer=layer, key=key:
                         x + to_gguf_rows(lora.delta(layer, key), key, base))
    return out


def writer_with_metadata(base_path: Path, out: Path, changed: dict | None = None):
    """A GGUFWriter for `out` holding base_path's metadata with its GGUF types (the
    tokenizer, template, hyperparameters), each key in `changed` given its new value;
    the file type, tensors and data are the caller's to add."""
    import gguf

    reader = gguf.GGUFReader(str(base_path))
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(out), arch)
    for key, field in reader.fields.items():
        if key.startswith(_SKIP_KEYS):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        if main == gguf.GGUFValueType.ARRAY and len(field.types) > 2:
            raise ExportError(f"{base_path}: metadata {key} is a nested array, which this "
                              "exporter cannot copy")
        value = (changed or {}).get(key, field.contents())
        writer.add_key_value(key, value, main, sub)
    return writer


def write_merged(base_path: Path, out: Path, outtype: str = "f16",
                 changes: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None) -> None:
    """Write base_path's model to `out` in `outtype`, each named tensor replaced by what
    its function in `changes` makes of it (None: a plain re-encoding of the base)."""
    import gguf

    from mlxtune.models import gguf_file

    changes = changes or {}
    f = gguf_file.read(base_path)
    unknown = sorted(set(changes) - {t.name for t in f.tensors})
    if unknown:
        raise ExportError(f"{base_path}: no tensor {unknown[0]} to merge the adapter into")
    writer = writer_with_metadata(base_path, out)
    writer.add_file_type(_FILE_TYPES[outtype])
    plan = []
    for t in f.tensors:
        qtype = _target_type(t.shape, outtype)
        plan.append((t, qtype))
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, qtype),
                               raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t, qtype in plan:
        x = _decode(f, t)
        if t.name in changes:
            x = changes[t.name](x)
        writer.write_tensor_data(_encode(x, qtype))
    writer.close()


def write(lora: Lora, path: Path, outtype: str = "f16") -> None:
    if not lora.base.is_gguf:
        raise ExportError(f"gguf-fused needs a GGUF base (this run's base is "
                          f"{lora.base.given}, a {lora.base.kind} model): export --to "
                          "mlx-fused and convert that folder with llama.cpp's "
                          "convert_hf_to_gguf.py")
    if lora.is_adapter:
        check_shapes(lora)
    write_merged(Path(lora.base.location), path, outtype, deltas(lora))
