"""Machines to plan for, what each lets a training process use, and the verdicts.

Usable memory. On a Mac the GPU works on memory the kernel wires for it, and macOS caps
that at the Metal device's recommendedMaxWorkingSetSize, which MLX reports as
`max_recommended_working_set_size`: about 2/3 of RAM on Macs with up to 36 GB and 3/4 on
larger ones (e.g. 48 GiB of 64, 96 GiB of 128; newer macOS releases report more, and
`sudo sysctl iogpu.wired_limit_mb=...` raises it). The 32 / 64 / 128 GB tiers use that
rule, with RAM in GiB as Apple sells it (a "32 GB" Mac has 32 GiB = 34.4 GB). For this
machine the planner uses what MLX itself reports: the working-set size where the device
has one (Metal), else MLX's memory limit (`mx.get_memory_limit()`, the limit `mlxtune
doctor` prints; on the CPU backend MLX sets it from the machine's RAM).

Verdicts: `fits` when the predicted peak is at most 90% of the usable memory, `tight` in
the last 10%, `no` above it. GB here are 10^9 bytes, as MLX reports peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30
TIERS_GB = (32, 64, 128)
TIGHT = 0.9  # above this fraction of the usable memory a plan is `tight`


@dataclass(frozen=True)
class Machine:
    name: str            # "32", "64", "128" or "this machine"
    backend: str         # "metal" | "cpu" | "cuda": decides the compute dtype and paths
    usable_bytes: int
    rule: str            # how usable_bytes was found

    @property
    def usable_gb(self) -> float:
        return self.usable_bytes / 1e9


def wired_fraction(ram_gib: float) -> float:
    """macOS's default GPU working set as a fraction of RAM (see the module docstring)."""
    return 2 / 3 if ram_gib <= 36 else 3 / 4


def mac_tier(ram_gib: int) -> Machine:
    frac = wired_fraction(ram_gib)
    usable = int(ram_gib * GIB * frac)
    return Machine(str(ram_gib), "metal", usable,
                   f"{'2/3' if frac < 0.7 else '3/4'} of {ram_gib} GiB (macOS GPU working set)")


def tiers() -> list[Machine]:
    return [mac_tier(g) for g in TIERS_GB]


def this_machine(usable_gb: float | None = None) -> Machine:
    """This machine, as MLX sees it; `usable_gb` overrides the usable memory (tests,
    reproducible screenshots)."""
    import mlx.core as mx

    from mlxtune import backend

    name = backend.plan_backend()
    if usable_gb is not None:
        return Machine("this machine", name, int(usable_gb * 1e9), "given")
    info = backend.device_info()
    working_set = info.get("max_recommended_working_set_size")
    if working_set:
        return Machine("this machine", name, int(working_set),
                       "MLX max_recommended_working_set_size")
    limit = mx.get_memory_limit() if hasattr(mx, "get_memory_limit") else 0
    if limit:
        return Machine("this machine", name, int(limit), "MLX memory limit")
    ram = backend.system_memory_bytes()
    return Machine("this machine", name, int(ram * 3 / 4), "3/4 of system memory")


def verdict(peak_bytes: float, usable_bytes: float) -> str:
    if peak_bytes <= TIGHT * usable_bytes:
        return "fits"
    if peak_bytes <= usable_bytes:
        return "tight"
    return "no"
