"""The memory planner: will a configuration fit on a 32, 64 or 128 GB Mac, or here?

    plan = memory.plan(cfg)            # an mlxtune.config.Config
    plan.to_dict()                     # what `mlxtune plan --json` prints

Before anything is loaded it reads the model's shape (mlxtune.memory.shapes: config.json,
a GGUF header, or the catalogue), lists the base's weights as they will sit in memory
(weights, storage), estimates a training step's peak item by item (estimate) and judges
it against each machine's usable memory (tiers), with the nearest change of a knob that
makes a `tight` or `no` plan fit (hints). A data-parallel run is planned per rank: each of
`ranks` processes holds the whole model and 1/ranks of every batch.

The tiers are Macs: the compute dtype there is the config's model.dtype, bfloat16 for
`auto`. "This machine" is planned for the backend MLX runs on here (on the CPU backend,
mlxtune computes in float32 for `auto`). No UI imports here (the TUI and CLI sit on top).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from mlxtune.errors import MlxtuneError
from mlxtune.memory import tiers as tiers_mod
from mlxtune.memory.estimate import Breakdown, describe_assumptions, estimate, workload
from mlxtune.memory.shapes import ModelShape, resolve as resolve_shape
from mlxtune.memory.tiers import Machine

__all__ = ["Plan", "Fit", "Hint", "MemoryPlanError", "plan", "estimate_config", "guard",
           "resolve_shape"]


class MemoryPlanError(MlxtuneError):
    """A configuration predicted not to fit this machine (mlxtune run's guard)."""
    exit_code = 2


@dataclass(frozen=True)
class Hint:
    key: str                 # the knob, as a --set key ("train.grad_checkpoint", ...)
    value: object
    peak_gb: float
    text: str


@dataclass
class Fit:
    machine: Machine
    breakdown: Breakdown
    verdict: str
    hints: list[Hint] = field(default_factory=list)

    @property
    def peak_gb(self) -> float:
        return self.breakdown.peak / 1e9

    @property
    def hint(self) -> Hint | None:
        return self.hints[0] if self.hints else None

    def to_dict(self) -> dict:
        return {"usable_gb": round(self.machine.usable_gb, 2), "rule": self.machine.rule,
                "backend": self.machine.backend, "peak_gb": round(self.peak_gb, 3),
                "verdict": self.verdict,
                "hint": self.hint.text if self.hint else None,
                "hints": [{"set": f"{h.key}={_yaml(h.value)}", "peak_gb": round(h.peak_gb, 3),
                           "text": h.text} for h in self.hints]}


@dataclass
class Plan:
    shape: ModelShape
    ranks: int
    tiers: list[Fit]         # the 32 / 64 / 128 GB Macs
    here: Fit                # this machine

    @property
    def mac(self) -> Breakdown:
        return self.tiers[0].breakdown

    @property
    def peak_gb(self) -> float:
        """Predicted peak of a training step on a Mac (the tiers' estimate), per rank."""
        return self.mac.peak / 1e9

    def to_dict(self) -> dict:
        mac = self.mac
        out = {
            "model": {"name": self.shape.name, "model_type": self.shape.model_type,
                      "parameters": self.shape.parameters(), "source": self.shape.source},
            "ranks": self.ranks,
            "per_rank": True,
            "compute_dtype": mac.workload.dtype,
            "peak_gb": round(self.peak_gb, 3),
            "breakdown": mac.gb(),
            "tiers": {f.machine.name: f.verdict for f in self.tiers},
            "tier_details": {f.machine.name: f.to_dict() for f in self.tiers},
            "this_machine": {**self.here.to_dict(),
                             "compute_dtype": self.here.breakdown.workload.dtype,
                             "kernels": self.here.breakdown.workload.kernels,
                             "breakdown": self.here.breakdown.gb()},
            "assumptions": describe_assumptions(mac.workload),
        }
        if mac.reference_pass is not None:
            out["reference_pass_gb"] = round(mac.reference_pass / 1e9, 3)
        if mac.rollout is not None:
            out["rollout_gb"] = round(mac.rollout / 1e9, 3)
            out["this_machine"]["rollout_gb"] = round(self.here.breakdown.rollout / 1e9, 3)
        return out


def estimate_config(cfg, backend: str, ranks: int = 1, attention: str = "materialised",
                    shape: ModelShape | None = None) -> Breakdown:
    """The breakdown of one rank's training step of `cfg` on `backend`."""
    shape = shape or resolve_shape(cfg.model)
    return estimate(workload(cfg, shape, backend, ranks, attention))


def fit(cfg, machine: Machine, shape: ModelShape, ranks: int = 1,
        attention: str = "materialised", with_hints: bool = True) -> Fit:
    b = estimate(workload(cfg, shape, machine.backend, ranks, attention))
    v = tiers_mod.verdict(b.peak, machine.usable_bytes)
    out = Fit(machine, b, v)
    if with_hints and v != "fits":
        from mlxtune.memory.hints import nearest

        out.hints = nearest(cfg, machine, shape, ranks, attention)
    return out


def plan(cfg, ranks: int = 1, usable_gb: float | None = None,
         attention: str = "materialised", shape: ModelShape | None = None) -> Plan:
    """Plan `cfg` (an mlxtune Config) for the 32 / 64 / 128 GB tiers and this machine
    (`usable_gb` overrides this machine's usable memory)."""
    shape = shape or resolve_shape(cfg.model)
    results = [fit(cfg, m, shape, ranks, attention) for m in tiers_mod.tiers()]
    here = fit(cfg, tiers_mod.this_machine(usable_gb), shape, ranks, attention)
    return Plan(shape, ranks, results, here)


def guard(cfg, ranks: int = 1, usable_gb: float | None = None, hints: bool = True) -> Fit:
    """mlxtune run's check: the plan for this machine, or MemoryPlanError when the
    predicted peak, raised by the planner's margin (calibration.GUARD_MARGIN: the largest
    under-prediction measured on held-out configurations of these kernels), exceeds what
    this machine lets MLX use."""
    from mlxtune.memory.calibration import GUARD_MARGIN

    shape = resolve_shape(cfg.model)
    here = fit(cfg, tiers_mod.this_machine(usable_gb), shape, ranks, with_hints=hints)
    margin = GUARD_MARGIN.get(here.breakdown.workload.kernels, 0.0)
    guarded = here.peak_gb * (1 + margin)
    if here.verdict == "no" or guarded > here.machine.usable_gb:
        hint = f"; {here.hint.text}" if here.hint else ""
        raise MemoryPlanError(
            f"{cfg.source or '<config>'}: predicted peak {here.peak_gb:.1f} GB per rank "
            f"({guarded:.1f} GB with the planner's {margin:.0%} margin) exceeds this "
            f"machine's {here.machine.usable_gb:.1f} GB ({here.machine.rule}){hint}; "
            "see `mlxtune plan`, or run with --ignore-memory-plan to try anyway")
    return here


def with_changes(cfg, changes: dict):
    """A copy of `cfg` with dotted keys set (for hints and the TUI)."""
    out = copy.deepcopy(cfg)
    for key, value in changes.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, last, value)
    return out


def _yaml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        import json

        return json.dumps(value)
    return str(value)
