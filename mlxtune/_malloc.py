"""Keep freed host memory for reuse: glibc's malloc settings for MLX's CPU buffers (Linux).

MLX's CPU allocator takes every buffer from malloc and gives it back with free. glibc
serves large requests with fresh mmap'd pages (above a threshold it moves around at run
time) and hands freed memory back to the kernel, so a training step that frees and
re-allocates its activations page-faults them in again every step: measured on
SmolLM2-135M at 4 x 336 tokens, ~200,000 minor faults (0.8 GB of zeroed pages) a step,
and a new batch shape, whose buffer sizes differ, ~1 GB. Fixing the mmap threshold at its
maximum (32 MB: smaller buffers come from the heap) and never trimming the heap took that
to 0 after the first step (docs/performance.md).

The cost is that memory freed below 32 MB stays with the process instead of going back to
the system: the process keeps the heap of its largest step. MLX's own accounting
(mx.get_peak_memory, the memory planner) is unchanged.
MLXTUNE_MALLOC=0 leaves glibc's defaults. Other C libraries and platforms: nothing done.
"""

import ctypes
import os
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# Trimming off (-1, glibc's documented value for it): with a trim threshold of 2 GB, the
# longest batches (SmolLM2 at 4 x 1,024 tokens, a 6.2 GB step) still freed more than that
# at the top of the heap at the end of every step and faulted it in again: 1.29 million
# minor faults a step, 24.3 s; without trimming 0-25,000 faults, 18.5-19.8 s.
SETTINGS = {_M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: -1, _M_TOP_PAD: 64 * 2**20}

state = {"tuned": False, "reason": ""}


def tune() -> None:
    if state["tuned"] or state["reason"]:
        return
    if not sys.platform.startswith("linux"):
        state["reason"] = "not Linux"
        return
    if os.environ.get("MLXTUNE_MALLOC", "1") == "0":
        state["reason"] = "disabled by MLXTUNE_MALLOC=0"
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library Python itself runs on
    except (OSError, AttributeError):
        state["reason"] = "no glibc mallopt"
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Environment settings (MALLOC_MMAP_THRESHOLD_ and friends) are the user's: keep them.
    env = {_M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_", _M_TRIM_THRESHOLD:
           "MALLOC_TRIM_THRESHOLD_", _M_TOP_PAD: "MALLOC_TOP_PAD_"}
    ok = all(mallopt(param, value) == 1 for param, value in SETTINGS.items()
             if env[param] not in os.environ)
    state["tuned"] = ok
    state["reason"] = "" if ok else "mallopt refused a setting"
