"""Compile and run mlxtune's Metal and CUDA kernels on the CPU (g++ and tests/shim/*.h).

The kernel text is assembled the way mx.fast.metal_kernel / mx.fast.cuda_kernel assemble
it (MLX 0.32: mlx/backend/metal/custom_kernel.cpp, mlx/backend/cuda/custom_kernel.cpp):
our header, then a generated signature (inputs, outputs, then the thread attributes the
body names, for Metal; template arguments as a template for Metal, as constexpr/using
lines in the body for CUDA), then the body from mlxtune.quant.kernels.spec. The shim
headers stand in for MLX's own preamble. What this can and cannot show: docs/kernels.md.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SHIM = Path(__file__).parent / "shim"
CACHE = Path(tempfile.gettempdir()) / f"mlxtune-kernel-shim-{os.getuid()}"

# mx.fast.metal_kernel's attribute table: (name, type), in the order it writes them.
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"), ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"), ("grid_origin", "uint3"), ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"), ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"), ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"), ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"), ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"), ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"), ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"), ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]
# What the shim driver passes for each attribute it supports (C++ expressions).
ATTRIBUTE_VALUES = {
    "simdgroup_index_in_threadgroup": "lid / 32",
    "thread_index_in_simdgroup": "lid % 32",
    "thread_index_in_threadgroup": "lid",
    "thread_position_in_grid": "uint3{g.x * tx + l.x, g.y * ty + l.y, g.z * tz + l.z}",
    "thread_position_in_threadgroup": "uint3{l.x, l.y, l.z}",
    "threadgroup_position_in_grid": "uint3{g.x, g.y, g.z}",
    "threads_per_threadgroup": "uint3{tx, ty, tz}",
    "threads_per_simdgroup": "32u",
    "threadgroups_per_grid": "uint3{gx / tx, gy / ty, gz / tz}",
    "threads_per_grid": "uint3{gx, gy, gz}",
}
METAL_TYPES = {"float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t",
               "uint32": "uint32_t", "int8": "int8_t", "uint8": "uint8_t", "int32": "int32_t"}
CUDA_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16",
              "uint32": "uint32_t", "int8": "int8_t", "uint8": "uint8_t", "int32": "int32_t"}


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++")


def _dtype_name(a: np.ndarray) -> str:
    return "bfloat16" if a.dtype == np.dtype("V2") else a.dtype.name


def _template_value(v, types) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return types[v]


def metal_source(spec, inputs: list[np.ndarray], template: list) -> tuple[str, str]:
    """(function name, text) of the kernel as mx.fast.metal_kernel writes it."""
    tdef = "<" + ", ".join(_template_value(v, METAL_TYPES) for _, v in template) + ">"
    name = "custom_kernel_" + spec.name + re.sub(r"<|>|(, )", "_", tdef)[:-1]
    attrs = [(a, t) for a, t in METAL_ATTRIBUTES if a in spec.source]
    text = spec.header
    kinds = {bool: "bool", int: "int"}
    text += "template <" + ", ".join(f"{kinds.get(type(v), 'typename')} {k}"
                                     for k, v in template) + ">\n"
    text += f"[[kernel]] void {name}(\n"
    index = 0
    for n, a in zip(spec.input_names, inputs):
        location = "constant" if a.size < 8 else "device"
        ref = "&" if a.ndim == 0 else "*"
        text += f"  const {location} {METAL_TYPES[_dtype_name(a)]}{ref} {n} [[buffer({index})]],\n"
        index += 1
    out_type = METAL_TYPES[template[0][1]]
    text += f"  device {out_type}* y [[buffer({index})]]"
    text += ",\n" if attrs else ") {\n"
    text += ",\n".join(f"  {t} {a} [[{a}]]" for a, t in attrs) + (") {\n" if attrs else "")
    text += spec.source + "\n}\n"
    text += f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({name}{tdef}) {name}{tdef};\n'
    return name + tdef, text, attrs


def cuda_source(spec, inputs: list[np.ndarray], template: list) -> tuple[str, str]:
    """(function name, text) of the kernel as mx.fast.cuda_kernel writes it."""
    name = "custom_kernel_" + spec.name
    text = spec.header + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    text += f"__global__ void {name}(\n"
    for n, a in zip(spec.input_names, inputs):
        text += f"    const {CUDA_TYPES[_dtype_name(a)]}* {n},\n"
    text += f"    {CUDA_TYPES[template[0][1]]}* y) {{\n"
    for k, v in template:
        if isinstance(v, bool):
            text += f"  constexpr bool {k} = {'true' if v else 'false'};\n"
        elif isinstance(v, int):
            text += f"  constexpr int {k} = {v};\n"
        else:
            text += f"  using {k} = {CUDA_TYPES[v]};\n"
    text += "\n" + spec.source + "\n}\n\n} // namespace mlx::core::cu\n"
    return "mlx::core::cu::" + name, text, []


def _driver(backend: str, fn: str, inputs, out_dtype: str, attrs) -> str:
    types = METAL_TYPES if backend == "metal" else CUDA_TYPES
    args = [f"(const {types[_dtype_name(a)]}*)buffers[{i}]" for i, a in enumerate(inputs)]
    args.append(f"({types[out_dtype]}*)buffers[{len(inputs)}]")
    args += [ATTRIBUTE_VALUES[a] for a, _ in attrs]
    setup = ("shim::block_dim() = {tx, ty, tz}; shim::block_idx() = g;"
             if backend == "cuda" else "")
    return f"""
extern "C" int shim_run(void** buffers, unsigned gx, unsigned gy, unsigned gz,
                        unsigned tx, unsigned ty, unsigned tz) {{
  return shim::run_grid({{gx, gy, gz}}, {{tx, ty, tz}},
      [&](shim::dim3u g, unsigned lid, shim::dim3u l) {{
        {setup}
        (void)l;
        {fn}({", ".join(args)});
      }});
}}
"""


def build(backend: str, spec, inputs: list[np.ndarray], template: list):
    """The compiled kernel (a ctypes function), cached by the hash of its text."""
    source = metal_source if backend == "metal" else cuda_source
    fn, text, attrs = source(spec, inputs, template)
    shim = "metal_shim.h" if backend == "metal" else "cuda_shim.h"
    full = f'#include "{shim}"\n' + text + _driver(backend, fn, inputs, template[0][1], attrs)
    key = hashlib.sha256(full.encode()).hexdigest()[:20]
    CACHE.mkdir(parents=True, exist_ok=True)
    lib = CACHE / f"{spec.name}-{key}.so"
    if not lib.exists():
        src = CACHE / f"{spec.name}-{key}.cpp"
        src.write_text(full)
        tmp = lib.with_suffix(".tmp.so")
        cmd = [compiler(), "-std=c++17", "-O1", "-shared", "-fPIC", "-Wno-attributes",
               f"-I{SHIM}", str(src), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"compiling {src} failed:\n{done.stderr[-4000:]}")
        tmp.replace(lib)
    run = ctypes.CDLL(str(lib)).shim_run
    run.restype = ctypes.c_int
    return run, full


ERRORS = {1: "a barrier not reached by every live thread", 2: "a SIMD operation not reached "
          "by every live lane (divergence)", 3: "a barrier reached after threads returned",
          4: "grid not a multiple of the threadgroup"}


def run(backend: str, spec, inputs: list[np.ndarray], template: list, grid, threadgroup,
        out_shape) -> np.ndarray:
    """Run the kernel on numpy inputs; returns the output array y."""
    inputs = [np.ascontiguousarray(a) for a in inputs]
    fn, _ = build(backend, spec, inputs, template)
    out_np = {"float32": np.float32, "float16": np.float16}[template[0][1]]
    out = np.full(out_shape, np.nan, out_np)   # unwritten outputs show up as NaN
    buffers = (ctypes.c_void_p * (len(inputs) + 1))(
        *[a.ctypes.data for a in inputs], out.ctypes.data)
    err = fn(buffers, *grid, *threadgroup)
    if err:
        raise RuntimeError(f"{spec.name}: {ERRORS.get(err, err)}")
    return out
