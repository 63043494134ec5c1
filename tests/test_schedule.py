"""The CPU profile evaluates depth-first (mlxtune._schedule): MLX_BFS_MAX_WIDTH is set at
import, before MLX's first evaluation reads it; the GPU profile and a user's value keep
theirs; a value MLX would hang on is dropped."""

import os
import subprocess
import sys

import pytest

PROBE = ("import os, mlxtune; from mlxtune import _schedule; "
         "print(repr(os.environ.get('MLX_BFS_MAX_WIDTH'))); print(_schedule.status_line())")


def probe(**env) -> list[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("MLX_BFS_MAX_WIDTH", "MLXTUNE_PROFILE")}
    clean.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=clean, capture_output=True,
                         text=True, timeout=120, check=True)
    return out.stdout.strip().splitlines()


def test_cpu_profile_is_depth_first():
    # on a Mac too: MLXTUNE_PROFILE=cpu puts MLX's default device on the CPU first
    width, line = probe(MLXTUNE_PROFILE="cpu")
    assert width == "'1'" and line.startswith("depth-first")


def test_gpu_profile_keeps_mlx_default():
    width, line = probe(MLXTUNE_PROFILE="gpu")
    assert width == "None" and "MLX's default" in line


@pytest.mark.parametrize("given, kept", [("7", "'7'"), ("", "'1'"), ("0", "'1'"),
                                         ("wide", "'1'")])
def test_a_users_width_is_kept_unless_mlx_would_hang_on_it(given, kept):
    width, _ = probe(MLXTUNE_PROFILE="cpu", MLX_BFS_MAX_WIDTH=given)
    assert width == kept
