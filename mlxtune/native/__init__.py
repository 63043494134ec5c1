"""mlxtune's C++ primitives for MLX's CPU backend, built on this machine and cached.

Two MLX primitives, each with its backward pass:
- `attention.cpp`, causal attention: per query block two sgemm calls through the BLAS MLX
  uses and one vectorised pass for mask, max, exp and sum in between, heads spread over
  the BLAS's threads, the backward pass recomputing the probabilities from the saved
  log-sum-exp. It replaces mlxtune.attention's composed blockwise form on the CPU backend
  (4-5x faster forward, ~2.4x forward + backward at L = 1024 here; docs/performance.md).
- `cross_entropy.cpp`, the output head and the cross-entropy over the vocabulary at the
  loss-bearing positions only, a chunk of positions at a time through one scratch buffer,
  its gradient with respect to the hidden states computed beside the loss (mlxtune.forward
  uses it on the CPU backend).
`common.h` holds what they share; `module.cpp` makes them one extension module.

The extension is compiled against the installed MLX's headers and library with nanobind
(the same nanobind ABI and domain as mlx.core, so that it takes and returns mx.array) and
with -march=native, so it is built per machine: `python -m mlxtune.native` (scripts/setup.sh
runs it) or, failing that, on first use. The result is cached under
$XDG_CACHE_HOME/mlxtune/native (MLXTUNE_NATIVE_CACHE overrides) in a folder named by a key:
the sources' hash, the MLX, nanobind and Python versions, the compiler's path and its own
`--version` line, the flags and the CPU's features. A failed build is remembered in that
folder (build.log, the compiler's output) so that each run does not compile again, and it
is retried as soon as any part of the key changes: an MLX, nanobind or compiler upgrade
builds afresh. `python -m mlxtune.native --force` retries under the same key.

Whenever the extension cannot be had (not Linux, no C++ compiler, no nanobind, a build or
load failure, MLXTUNE_NATIVE=0) `load()` returns None, `state["reason"]` says why and
callers keep MLX's own ops. `status_line()` says in one line which path runs and why
(`mlxtune run` and `mlxtune doctor` print it).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

NAME = "_cpu_kernels"
HERE = Path(__file__).parent
SOURCES = [HERE / "attention.cpp", HERE / "cross_entropy.cpp", HERE / "module.cpp"]
HEADERS = [HERE / "common.h"]
FLAGS = ["-O3", "-march=native", "-std=c++20", "-fPIC", "-fvisibility=hidden",
         "-DNB_DOMAIN=mlx", "-DNB_COMPACT_ASSERTIONS"]


def _flags() -> list[str]:
    """FLAGS, with -march from MLXTUNE_NATIVE_MARCH where set (e.g. x86-64-v2, haswell:
    another CPU's vector width and so its rounding, for testing tolerances)."""
    march = os.environ.get("MLXTUNE_NATIVE_MARCH", "").strip()
    return [f"-march={march}" if f == "-march=native" and march else f for f in FLAGS]

# What happened, for status_line(), `mlxtune doctor` and the tests: loaded (a path) or a
# reason; after a failed build also its first error line and the log's path.
state: dict = {"loaded": None, "reason": "", "build_error": "", "log": ""}
_module = None
_settled = False  # load() has succeeded or failed for good in this process


class BuildError(RuntimeError):
    """A build that failed: `first_line` is the compiler's first error line, `log` the
    path of its whole output (empty where nothing was compiled)."""

    def __init__(self, message: str, first_line: str = "", log: str = ""):
        super().__init__(message)
        self.first_line, self.log = first_line, log


def disabled() -> bool:
    return os.environ.get("MLXTUNE_NATIVE", "").lower() in ("0", "off", "false", "no")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


_identities: dict = {}


def _compiler_identity(cxx: str | None) -> str:
    """The compiler's own first `--version` line ("g++ (Debian 12.2.0-14) 12.2.0"): an
    upgrade in place keeps the path, so the path alone would not retry a failed build."""
    if not cxx:
        return ""
    if cxx not in _identities:
        try:
            out = subprocess.run([cxx, "--version"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, timeout=30).stdout
            _identities[cxx] = (out.strip().splitlines() or [""])[0]
        except (OSError, subprocess.SubprocessError) as e:
            _identities[cxx] = f"unknown ({type(e).__name__})"
    return _identities[cxx]


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    if os.environ.get("MLXTUNE_NATIVE_CACHE"):
        return Path(os.environ["MLXTUNE_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlxtune" / "native"


def key_parts() -> dict:
    """What the cached build (or the record of a failed one) is keyed on."""
    sources = hashlib.sha256()
    for path in SOURCES + HEADERS:
        sources.update(path.read_bytes())
    cxx = _compiler()
    return {"sources": sources.hexdigest()[:16], "mlx": importlib.metadata.version("mlx"),
            "nanobind": _nanobind_version(), "python": sys.version,
            "machine": platform.machine(), "cpu": _cpu_features(), "flags": " ".join(_flags()),
            "compiler": cxx or "", "compiler_version": _compiler_identity(cxx)}


def _key() -> str:
    h = hashlib.sha256()
    for name, part in key_parts().items():
        h.update(f"{name}={part}\n".encode())
    return h.hexdigest()[:16]


def _nanobind_version() -> str:
    try:
        return importlib.metadata.version("nanobind")
    except importlib.metadata.PackageNotFoundError:
        return ""


def module_path() -> Path:
    return cache_dir() / _key() / (NAME + importlib.machinery.EXTENSION_SUFFIXES[0])


def _unavailable() -> str | None:
    """Why the extension cannot be built here at all, or None."""
    if not sys.platform.startswith("linux"):
        return "built on Linux only (Metal and CUDA have MLX's fused attention)"
    missing = [p.name for p in SOURCES + HEADERS if not p.exists()]
    if missing:
        return f"source {', '.join(missing)} missing"
    if _compiler() is None:
        return "no C++ compiler (install g++)"
    if not _nanobind_version():
        return "nanobind not installed (pip install nanobind)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "Python's C headers missing (Debian/Ubuntu: apt-get install python3-dev)"
    return None


def build(force: bool = False, log=None) -> Path:
    """Compile the extension into the cache (once per key; concurrent callers wait for one
    build) and return its path. Raises BuildError with the compiler's output."""
    import mlx
    import nanobind

    reason = _unavailable()
    if reason:
        raise BuildError(reason)
    target = module_path()
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        failed = folder / "build.log"
        if target.exists() and not force:
            return target
        if failed.exists() and not force:
            # Remembered under this key only: another MLX, nanobind or compiler is another
            # key, and so another try.
            first = first_error_line(failed.read_text(errors="replace"))
            raise BuildError(f"an earlier build failed ({first}); see {failed}", first,
                             str(failed))
        if log:
            log(f"building mlxtune's CPU kernels into {folder} (once, ~20-60 s)")
        mlx_dir = Path(mlx.__path__[0])
        nb_dir = Path(nanobind.source_dir()).parent
        includes = [f"-I{nb_dir / 'include'}", f"-I{nb_dir / 'ext' / 'robin_map' / 'include'}",
                    f"-I{sysconfig.get_paths()['include']}", f"-I{mlx_dir / 'include'}"]
        cxx = _compiler()
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            objects = [Path(tmp) / "nanobind.o"] + [Path(tmp) / (p.stem + ".o") for p in SOURCES]
            jobs = [[cxx, *_flags(), "-fno-strict-aliasing", *includes, "-c",
                     str(Path(nanobind.source_dir()) / "nb_combined.cpp"), "-o",
                     str(objects[0])]]
            jobs += [[cxx, *_flags(), "-fopenmp-simd", *includes, "-c", str(source), "-o",
                      str(obj)] for source, obj in zip(SOURCES, objects[1:])]
            # The objects compile at once (each takes a core for ~10 s).
            procs = [subprocess.Popen(job, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True) for job in jobs]
            outputs = [p.communicate()[0] for p in procs]
            link = [cxx, "-shared", "-pthread", *map(str, objects), f"-L{mlx_dir / 'lib'}",
                    "-lmlx", f"-Wl,-rpath,{mlx_dir / 'lib'}", "-o", str(Path(tmp) / target.name)]
            if all(p.returncode == 0 for p in procs):
                done = subprocess.run(link, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
                outputs.append(done.stdout)
                ok = done.returncode == 0
            else:
                ok = False
            if not ok:
                text = "\n\n".join(" ".join(cmd) + "\n" + out
                                    for cmd, out in zip(jobs + [link], outputs))
                failed.write_text(
                    "".join(f"# {k}: {v}\n" for k, v in key_parts().items()) + "\n" + text)
                first = first_error_line("\n".join(outputs))
                raise BuildError(f"compiling mlxtune's CPU kernels failed ({first}); see "
                                 f"{failed}", first, str(failed))
            os.replace(Path(tmp) / target.name, target)  # atomic: readers see all or nothing
            failed.unlink(missing_ok=True)
    return target


def first_error_line(output: str) -> str:
    """The compiler's first error line ("attention.cpp:12:3: error: ..."), else its first
    line, else "no output"."""
    lines = [line.strip() for line in output.splitlines()
             if line.strip() and not line.startswith("# ")]
    for line in lines:
        if "error" in line.lower() or "fatal" in line.lower():
            return line[:300]
    return lines[0][:300] if lines else "no output"


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _smoke_test(module) -> None:
    """One tiny call: a nanobind ABI or domain mismatch with mlx.core shows only here
    (a TypeError for every mx.array argument)."""
    import mlx.core as mx

    q = mx.array([[[[1.0], [2.0]]]])
    out = module.causal_attention(q, q, q, 1.0, None)
    # query 0 sees key 0 alone; query 1 mixes values 1 and 2 by softmax(2, 4)
    expected = [1.0, (1.0 * 2.718281828 ** 2 + 2.0 * 2.718281828 ** 4)
                / (2.718281828 ** 2 + 2.718281828 ** 4)]
    got = out.reshape(-1).tolist()
    if any(abs(a - b) > 1e-4 for a, b in zip(got, expected)):
        raise RuntimeError(f"smoke test: got {got}, expected {expected}")


def load(build_if_missing: bool = True):
    """The extension module, or None (state["reason"] says why). Builds it on first use
    unless build_if_missing is False; tries once per process."""
    global _module, _settled
    if disabled():
        state["reason"] = "disabled by MLXTUNE_NATIVE=0"
        return None  # the variable is read on every call
    if _settled:
        return _module
    reason = _unavailable()
    if reason:
        state["reason"], _settled = reason, True
        return None
    try:
        path = module_path()
        if not path.exists():
            failed = path.parent / "build.log"
            if not build_if_missing and not failed.exists():
                state["reason"] = "not built yet (python -m mlxtune.native builds it)"
                return None
            path = build()  # a failure recorded under this key raises at once
        module = _import(path)
        _smoke_test(module)
    except BuildError as e:
        state.update(reason=str(e), build_error=e.first_line or str(e), log=e.log)
        _settled = True
        return None
    except Exception as e:  # any failure means MLX's own ops, said by status_line()
        state["reason"], _settled = f"{type(e).__name__}: {e}", True
        return None
    _module, _settled = module, True
    state.update(reason="", build_error="", log="", loaded=str(path))
    return _module


def expected() -> bool:
    """Whether a run here would compute with the extension, decided without building or
    loading it (the memory planner's question): not disabled, buildable here, and built
    or not yet tried under this key (a failed build is remembered and not retried)."""
    if disabled():
        return False
    if _settled:
        return _module is not None
    if _unavailable():
        return False
    path = module_path()
    return path.exists() or not (path.parent / "build.log").exists()


def reset() -> None:
    """Forget this process's outcome, so that the next load() looks again (tests)."""
    global _module, _settled
    _module, _settled = None, False
    state.update(loaded=None, reason="", build_error="", log="")


def describe() -> str:
    load(build_if_missing=False)
    if state["loaded"]:
        return f"CPU attention and cross-entropy kernels ({state['loaded']})"
    return f"MLX's ops ({state['reason']})"


def status_line(build: bool = True) -> str:
    """One line on which CPU kernels a run uses and why, e.g.
    "CPU kernels: native (/root/.cache/mlxtune/native/<key>/_cpu_kernels....so)" or
    "CPU kernels: MLX's ops (native build failed: <first error line>; log at <path>)".
    Builds the extension first if it is missing and build is true (as the first step of a
    run would)."""
    from mlxtune import backend

    try:
        gpu = backend.gpu_profile()
    except ValueError:  # a bad MLXTUNE_PROFILE: the run itself says so
        gpu = False
    if gpu:
        where = "MLXTUNE_PROFILE=gpu" if backend.name() == "cpu" else f"{backend.name()} backend"
        return f"CPU kernels: not used ({where}: MLX's fused kernels)"
    if disabled():
        return "CPU kernels: MLX's ops (MLXTUNE_NATIVE=0)"
    load(build_if_missing=build)
    if state["loaded"]:
        return f"CPU kernels: native ({state['loaded']})"
    if state["build_error"]:
        return (f"CPU kernels: MLX's ops (native build failed: {state['build_error']}; "
                f"log at {state['log'] or 'none'})")
    return f"CPU kernels: MLX's ops ({state['reason']})"
