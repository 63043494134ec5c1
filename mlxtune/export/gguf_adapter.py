"""A LoRA adapter as llama.cpp reads it (llama-server --lora, Ollama's ADAPTER).

What llama.cpp checks when it loads one (src/llama-adapter.cpp): `general.type` is
"adapter", `adapter.type` is "lora", `general.architecture` equals the base's; tensors come
in pairs `<base tensor name>.lora_a` / `.lora_b`; for a base weight with GGML shape
ne = [in, out], lora_a has ne = [in, r] and lora_b ne = [r, out] (numpy: r x in and
out x r). It applies scale = alpha / r with `adapter.lora.alpha` (float32) and r read from
lora_b, so alpha / r must equal our scale (rsLoRA's alpha / sqrt(r) is written as
scale * r). DoRA has no place in this format: `write` refuses it. For the llama family the base's Q and K rows
are in llama.cpp's interleaved order, so lora_b's rows are put in that order too
(P(BA) = (PB)A); lora_a is independent of the row order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxtune.export.lora import ExportError, Lora, check_shapes, gguf_tensor_name, to_gguf_rows


def tensors(lora: Lora, dtype=np.float32) -> list[tuple[str, np.ndarray]]:
    """(name, array) in file order: per adapted weight, lora_a (r x in) then lora_b (out x r)."""
    out = []
    for (layer, key), (a, b) in sorted(lora.pairs.items()):
        name = gguf_tensor_name(layer, key, lora.base)
        out.append((f"{name}.lora_a", np.ascontiguousarray(a.T, dtype)))
        out.append((f"{name}.lora_b", np.ascontiguousarray(to_gguf_rows(b.T, key, lora.base),
                                                           dtype)))
    return out


def write(lora: Lora, path: Path, outtype: str = "f32") -> None:
    import gguf

    if lora.kind != "lora":
        what = "a DoRA adapter" if lora.kind == "dora" else "a full fine-tune"
        raise ExportError(f"{lora.adapter_dir}: {what} cannot be written as a GGUF LoRA "
                          "adapter (llama.cpp's adapters hold only A and B); export --to "
                          "gguf-fused for one GGUF model with it merged")
    check_shapes(lora)
    writer = gguf.GGUFWriter(str(path), lora.base.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora.scale * lora.rank))
    writer.add_name(f"{lora.run_dir.name} LoRA")
    dtype = np.float16 if outtype == "f16" else np.float32
    for name, array in tensors(lora, dtype):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
