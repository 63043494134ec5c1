"""Compile and run mlxtune's Metal and CUDA kernels on the CPU (C++ and tests/shim/*.h).

The kernel text is assembled the way mx.fast.metal_kernel / mx.fast.cuda_kernel assemble
it (MLX 0.32: mlx/backend/metal/custom_kernel.cpp, mlx/backend/cuda/custom_kernel.cpp):
our header, then a generated signature (inputs, outputs, then the thread attributes the
body names, for Metal; template arguments as a template for Metal, as constexpr/using
lines in the body for CUDA), then the body from mlxtune.quant.kernels.spec. The shim
headers stand in for MLX's own preamble.

Metal text is compiled by clang++ with Metal's address spaces kept (`device`, `constant`,
`threadgroup` as distinct clang address spaces, `thread` the generic one: see
shim/metal_shim.h), so a pointer handed to a parameter of another address space is a
compile error, as in Metal. half and bfloat16 are clang's _Float16 and __bf16, which
x86-64 has from clang 17 on; `metal_compiler()` picks a clang++ that has them. CUDA has
one generic address space: its text compiles with g++ (or clang++). What this can and
cannot show: docs/kernels.md.

`run` takes and returns numpy arrays (bfloat16 as 2-byte void arrays of its bits, see
`from_mlx`); `run_launch` is a runner for mlxtune.quant.kernels (`use_runner`): it runs
a `Launch` of MLX arrays and returns an MLX array.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SHIM = Path(__file__).parent / "shim"
CACHE = Path(tempfile.gettempdir()) / f"mlxtune-kernel-shim-{os.getuid()}"
DTYPES = ("float32", "float16", "bfloat16")

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
               "uint32": "uint32_t", "int8": "int8_t", "uint8": "uint8_t", "int32": "int32_t",
               "uint16": "uint16_t"}
CUDA_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16",
              "uint32": "uint32_t", "int8": "int8_t", "uint8": "uint8_t", "int32": "int32_t",
              "uint16": "uint16_t"}

# A translation unit the Metal shim needs to compile: address spaces, _Float16 and __bf16
# as arithmetic types, and a conversion from a `device` lvalue of each.
_PROBE = """
#define device __attribute__((address_space(1)))
template <typename T> void k(const device T* x, device T* y) { y[0] = T(float(x[0]) * 2.0f); }
template void k<_Float16>(const device _Float16*, device _Float16*);
template void k<__bf16>(const device __bf16*, device __bf16*);
"""


def _compiles(cxx: str, text: str) -> bool:
    try:
        done = subprocess.run([cxx, "-std=c++17", "-x", "c++", "-fsyntax-only", "-"],
                              input=text, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@functools.cache
def metal_compiler() -> str | None:
    """A clang++ that compiles the Metal shim (address spaces, _Float16, __bf16), or None:
    $MLXTUNE_SHIM_CLANG, else clang++-30 ... clang++-17, else clang++."""
    if platform.system() != "Linux":
        return None   # the coroutine runtime (ucontext) is tried on Linux only
    names = [os.environ.get("MLXTUNE_SHIM_CLANG", "")]
    names += [f"clang++-{v}" for v in range(30, 16, -1)] + ["clang++"]
    for name in filter(None, names):
        path = shutil.which(name)
        if path and _compiles(path, _PROBE):
            return path
    return None


def metal_problem() -> str | None:
    """Why Metal sources cannot run through the shim here (None: they can)."""
    if platform.system() != "Linux":
        return f"the C++ shim runs on Linux only (ucontext coroutines); this is {platform.system()}"
    if metal_compiler():
        return None
    found = shutil.which("clang++")
    if not found:
        return ("no clang++ (the Metal shim needs clang's address spaces; "
                "scripts/setup.sh installs it)")
    return (f"{found} lacks _Float16 / __bf16 on {platform.machine()} (clang 17+ has them; "
            "scripts/setup.sh installs one)")


@functools.cache
def cuda_compiler() -> str | None:
    """g++ (or $CXX, or clang++) for the CUDA shim, which needs _Float16."""
    if platform.system() != "Linux":
        return None
    for name in filter(None, [os.environ.get("CXX", ""), "g++", metal_compiler(), "clang++"]):
        path = shutil.which(name)
        if path and _compiles(path, "_Float16 h(float f) { return (_Float16)f; }"):
            return path
    return None


def cuda_problem() -> str | None:
    if platform.system() != "Linux":
        return f"the C++ shim runs on Linux only (ucontext coroutines); this is {platform.system()}"
    return None if cuda_compiler() else "no C++ compiler with _Float16 (g++ 12+ or clang++ 15+)"


def compiler(backend: str = "metal") -> str | None:
    return metal_compiler() if backend == "metal" else cuda_compiler()


def problem(backend: str) -> str | None:
    return metal_problem() if backend == "metal" else cuda_problem()


# -- numpy <-> MLX, bfloat16 as its bits -------------------------------------------------

BF16 = np.dtype("V2")


def dtype_name(a: np.ndarray) -> str:
    return "bfloat16" if a.dtype == BF16 else a.dtype.name


def bf16_from_float32(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even) as a V2 array."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return bits.view(BF16)


def bf16_to_float32(b: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(b).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def from_mlx(a) -> np.ndarray:
    import mlx.core as mx

    if a.dtype == mx.bfloat16:
        return np.array(mx.view(a, mx.uint16)).view(BF16)
    return np.array(a)


def to_mlx(a: np.ndarray):
    import mlx.core as mx

    if a.dtype == BF16:
        return mx.view(mx.array(a.view(np.uint16)), mx.bfloat16)
    return mx.array(a)


def _template_value(v, types) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return types[v]


def metal_source(spec, inputs: list[np.ndarray], template: list):
    """(function name, text, attributes, parameter types) of the kernel as
    mx.fast.metal_kernel writes it."""
    tdef = "<" + ", ".join(_template_value(v, METAL_TYPES) for _, v in template) + ">"
    name = "custom_kernel_" + spec.name + re.sub(r"<|>|(, )", "_", tdef)[:-1]
    attrs = [(a, t) for a, t in METAL_ATTRIBUTES if a in spec.source]
    text = spec.header
    kinds = {bool: "bool", int: "int"}
    text += "template <" + ", ".join(f"{kinds.get(type(v), 'typename')} {k}"
                                     for k, v in template) + ">\n"
    text += f"[[kernel]] void {name}(\n"
    params = []
    for index, (n, a) in enumerate(zip(spec.input_names, inputs)):
        # MLX binds inputs of fewer than 8 elements in the constant address space
        location = "constant" if a.size < 8 else "device"
        ref = "&" if a.ndim == 0 else "*"
        params.append((f"const {location} {METAL_TYPES[dtype_name(a)]}*", ref == "&"))
        text += f"  const {location} {METAL_TYPES[dtype_name(a)]}{ref} {n} [[buffer({index})]],\n"
    out_type = METAL_TYPES[template[0][1]]
    params.append((f"device {out_type}*", False))
    text += f"  device {out_type}* y [[buffer({len(inputs)})]]"
    text += ",\n" if attrs else ") {\n"
    text += ",\n".join(f"  {t} {a} [[{a}]]" for a, t in attrs) + (") {\n" if attrs else "")
    text += spec.source + "\n}\n"
    # MLX writes `template [[host_name("NAME")]] [[kernel]] decltype(...) NAME<...>;`,
    # an attribute list clang refuses in an explicit instantiation: written without it.
    text += f"\ntemplate decltype({name}{tdef}) {name}{tdef};\n"
    return name + tdef, text, attrs, params


def cuda_source(spec, inputs: list[np.ndarray], template: list):
    """(function name, text, attributes, parameter types) of the kernel as
    mx.fast.cuda_kernel writes it."""
    name = "custom_kernel_" + spec.name
    text = spec.header + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    text += f"__global__ void {name}(\n"
    params = []
    for n, a in zip(spec.input_names, inputs):
        params.append((f"const {CUDA_TYPES[dtype_name(a)]}*", False))
        text += f"    const {CUDA_TYPES[dtype_name(a)]}* {n},\n"
    params.append((f"{CUDA_TYPES[template[0][1]]}*", False))
    text += f"    {CUDA_TYPES[template[0][1]]}* y) {{\n"
    for k, v in template:
        if isinstance(v, bool):
            text += f"  constexpr bool {k} = {'true' if v else 'false'};\n"
        elif isinstance(v, int):
            text += f"  constexpr int {k} = {v};\n"
        else:
            text += f"  using {k} = {CUDA_TYPES[v]};\n"
    text += "\n" + spec.source + "\n}\n\n} // namespace mlx::core::cu\n"
    return "mlx::core::cu::" + name, text, [], params


def _driver(backend: str, fn: str, params, attrs) -> str:
    # Each buffer is cast to the exact parameter type (address space included) the
    # signature declares: the driver itself crosses no address space.
    args = [f"*({t})buffers[{i}]" if ref else f"({t})buffers[{i}]"
            for i, (t, ref) in enumerate(params)]
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


class CompileError(RuntimeError):
    """The kernel text did not compile (the compiler's messages follow)."""


def text(backend: str, spec, inputs: list[np.ndarray], template: list) -> str:
    """The whole translation unit: shim header, kernel as MLX writes it, driver."""
    source = metal_source if backend == "metal" else cuda_source
    fn, body, attrs, params = source(spec, inputs, template)
    shim = "metal_shim.h" if backend == "metal" else "cuda_shim.h"
    return f'#include "{shim}"\n' + body + _driver(backend, fn, params, attrs)


def compile_text(backend: str, full: str, name: str = "kernel") -> Path:
    """Compile a translation unit into a shared library (cached by its text's hash)."""
    cxx = compiler(backend)
    if cxx is None:
        raise RuntimeError(f"cannot compile {backend} kernels here: {problem(backend)}")
    key = hashlib.sha256((cxx + full).encode()).hexdigest()[:20]
    CACHE.mkdir(parents=True, exist_ok=True)
    lib = CACHE / f"{name}-{key}.so"
    if not lib.exists():
        src = CACHE / f"{name}-{key}.cpp"
        src.write_text(full)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp.so")
        cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wno-attributes",
               f"-I{SHIM}", str(src), "-o", str(tmp)]
        if "clang" in Path(cxx).name:
            cmd.insert(-3, "-Wno-unknown-attributes")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            tmp.unlink(missing_ok=True)
            raise CompileError(f"compiling {src} with {Path(cxx).name} failed:\n"
                               f"{done.stderr[-4000:]}")
        tmp.replace(lib)
    return lib


def build(backend: str, spec, inputs: list[np.ndarray], template: list):
    """The compiled kernel (a ctypes function), and its text."""
    full = text(backend, spec, inputs, template)
    lib = compile_text(backend, full, spec.name)
    run = ctypes.CDLL(str(lib)).shim_run
    run.restype = ctypes.c_int
    return run, full


ERRORS = {1: "a barrier not reached by every live thread", 2: "a SIMD operation not reached "
          "by every live lane (divergence)", 3: "a barrier reached after threads returned",
          4: "grid not a multiple of the threadgroup"}
_OUT = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def run(backend: str, spec, inputs: list[np.ndarray], template: list, grid, threadgroup,
        out_shape) -> np.ndarray:
    """Run the kernel on numpy inputs; returns the output array y (template[0] is its
    dtype; bfloat16 comes back as V2 bits, see bf16_to_float32)."""
    inputs = [np.ascontiguousarray(a) for a in inputs]
    fn, _ = build(backend, spec, inputs, template)
    out_dtype = template[0][1]
    out = np.full(out_shape, 0xFFFF if out_dtype == "bfloat16" else np.nan,  # unwritten: NaN
                  _OUT[out_dtype])
    buffers = (ctypes.c_void_p * (len(inputs) + 1))(
        *[a.ctypes.data for a in inputs], out.ctypes.data)
    err = fn(buffers, *grid, *threadgroup)
    if err:
        raise RuntimeError(f"{spec.name}: {ERRORS.get(err, err)}")
    return out.view(BF16) if out_dtype == "bfloat16" else out


def template_names(template: list) -> list:
    """mlxtune's template (with MLX dtypes) -> the shim's (dtype names)."""
    return [(k, v if isinstance(v, (bool, int)) else str(v).split(".")[-1]) for k, v in template]


def run_launch(backend: str, spec, launch, dtype):
    """A runner for mlxtune.quant.kernels: the launch's kernel through the shim, as an MLX
    array of `dtype`."""
    inputs = [from_mlx(a) for a in launch.inputs]
    out = run(backend, spec, inputs, template_names(launch.template), launch.grid,
              launch.threadgroup, launch.output_shape)
    return to_mlx(out).astype(dtype)
