"""MLX's evaluation order on the CPU profile: depth-first.

MLX (0.21 and later) orders each evaluation breadth-first from the outputs, going deeper
once more than MLX_BFS_MAX_WIDTH arrays (default 20) wait at one level: on a GPU that
keeps the command encoder fed. Under gradient checkpointing it also schedules a block's
recomputation, which needs only the block's saved input, long before that block's
backward uses it, so several blocks' recomputed activations are alive at once, more the
deeper the model: measured here on Llama-3.2-1B's shape, 1 x 2,048 tokens, checkpointed,
4 and 10 blocks within 0.6% of the plan, 13 blocks +0.32 GB over it, 16 blocks +0.8 GB;
16 blocks at 1,024 tokens 6.64 GB, and 5.70 GB depth-first (docs/memory.md). A CPU runs
one operation at a time and gains nothing from the breadth, so the CPU profile evaluates
depth-first (MLX_BFS_MAX_WIDTH=1): each block is recomputed when its backward needs it,
and the peak follows the program's order, which the memory planner counts.

MLX reads the variable once, at a process's first evaluation: `import mlxtune` sets it
before that, unless it is already set (the user's value is kept; the planner's CPU counts
assume 1). The GPU profile (and a GPU backend) keeps MLX's default, as on a Mac.
"""

import os

VARIABLE = "MLX_BFS_MAX_WIDTH"
DEPTH_FIRST = "1"

state = {"set": False, "reason": ""}


def _positive(value: str) -> bool:
    try:
        return int(value) >= 1
    except ValueError:
        return False


def depth_first_on_the_cpu() -> None:
    given = os.environ.get(VARIABLE)
    if given is not None and _positive(given):
        state["reason"] = f"{VARIABLE}={given} set by the environment"
        return
    # MLX reads an empty or non-positive width as 0 and never finishes an evaluation
    if given is not None:
        os.environ.pop(VARIABLE)
        state["reason"] = f"{VARIABLE}={given!r} is not a positive integer: not used"
    if os.environ.get("MLXTUNE_PROFILE", "").strip().lower() == "gpu":
        state["reason"] = "GPU profile: MLX's default order, as on a GPU"
        return
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        state["reason"] = "GPU backend: MLX's default order"
        return
    os.environ[VARIABLE] = DEPTH_FIRST
    state["set"] = True


def status_line() -> str:
    """`mlxtune doctor`'s line: the order this process evaluates in."""
    width = os.environ.get(VARIABLE)
    if state["set"]:
        return f"depth-first ({VARIABLE}={DEPTH_FIRST}: the CPU profile's order)"
    if width is not None:
        return f"{VARIABLE}={width} ({state['reason']})"
    return f"MLX's default, breadth-first up to 20 arrays wide ({state['reason']})"
