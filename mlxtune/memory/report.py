"""A plan as text, for `mlxtune plan` (the TUI draws its own)."""

from __future__ import annotations

from mlxtune.memory.estimate import describe_assumptions, describe_kernels


def _bar(peak: float, usable: float, width: int = 24) -> str:
    frac = peak / usable if usable > 0 else float("inf")
    filled = min(int(round(min(frac, 1.0) * width)), width)
    return "█" * filled + "░" * (width - filled) + (" >" if frac > 1 else "  ")


def text(plan) -> str:
    """`mlxtune plan`'s table: the breakdown on a Mac and here, then one line per tier."""
    mac, here = plan.mac, plan.here.breakdown
    s = plan.shape
    lines = [f"model   {s.describe()}", f"        shape from {s.source}"]
    if plan.ranks > 1:
        lines.append(f"ranks   {plan.ranks} (data parallel): memory per rank, "
                     f"{mac.workload.rows} rows each")
    lines.append("")
    same = here.workload.backend == mac.workload.backend and \
        here.workload.dtype == mac.workload.dtype
    head_mac = f"Mac ({mac.workload.dtype})"
    head_here = f"here ({here.workload.backend}, {here.workload.dtype})"
    lines.append(f"{'GB':<22}{head_mac:>18}" + ("" if same else f"{head_here:>24}"))
    mac_gb, here_gb = mac.gb(), here.gb()
    for item in mac.items:
        a, b = mac_gb.get(item, 0.0), here_gb.get(item, 0.0)
        if not a and not b:
            continue
        lines.append(f"{item:<22}{a:>18.3f}" + ("" if same else f"{b:>24.3f}"))
    lines.append(f"{'peak of a step':<22}{mac.peak / 1e9:>18.3f}"
                 + ("" if same else f"{here.peak / 1e9:>24.3f}"))
    if mac.reference_pass is not None:
        name = "dpo reference pass" if mac.workload.objective == "dpo" else "scoring pass"
        lines.append(f"{name:<22}{mac.reference_pass / 1e9:>18.3f}"
                     + ("" if same else f"{here.reference_pass / 1e9:>24.3f}"))
    if mac.rollout is not None:
        lines.append(f"{'grpo rollout':<22}{mac.rollout / 1e9:>18.3f}"
                     + ("" if same else f"{here.rollout / 1e9:>24.3f}"))
    lines.append("")
    for f in plan.tiers + [plan.here]:
        name = f"{f.machine.name} GB Mac" if f.machine.name.isdigit() else "this machine"
        lines.append(f"{name:<14}{_bar(f.breakdown.peak, f.machine.usable_bytes)} "
                     f"{f.peak_gb:6.1f} of {f.machine.usable_gb:5.1f} GB usable  "
                     f"{f.verdict.upper():<5}" + (f"  {f.hint.text}" if f.hint else ""))
    lines.append("")
    lines.append("assumes: " + "; ".join(describe_assumptions(mac.workload)))
    only_here = [n for n in here.workload.notes if n not in mac.workload.notes]
    if only_here:
        lines.append("this machine: " + "; ".join(only_here))
    lines.append(f"kernels: Mac: {describe_kernels(mac.workload)}; this machine: "
                 f"{describe_kernels(here.workload)}")
    lines.append("usable: " + "; ".join(f"{f.machine.name}: {f.machine.rule}"
                                        for f in plan.tiers + [plan.here]))
    return "\n".join(lines)
