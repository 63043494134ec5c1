"""mlxtune._malloc: freed host buffers are reused instead of page-faulted in again."""

import statistics
import subprocess
import sys

import pytest

# Buffers of 3-25 MB alive together, freed, allocated again: the pattern of a step's
# activations. Prints the minor page faults of each repetition after the first.
_PROGRAM = """
import resource
import mlxtune
import mlx.core as mx
from mlxtune import _malloc

def step():
    arrays = []
    for mb in (3, 25, 7, 12, 25, 3, 18, 7):
        a = mx.ones((mb * 2**18,))
        mx.eval(a)
        arrays.append(a)

step()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(_malloc.state["tuned"], *faults)
"""


def _run(env_value):
    import os

    env = dict(os.environ)
    env.pop("MLXTUNE_MALLOC", None)
    if env_value is not None:
        env["MLXTUNE_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0] == "True", [int(x) for x in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_buffers_are_reused_without_page_faults():
    tuned, faults = _run(None)
    default_tuned, default_faults = _run("0")
    assert tuned and not default_tuned
    # 100 MB a repetition: ~25,000 pages if each buffer came fresh from the kernel. glibc's
    # defaults fault 7,000-14,000 a repetition on average here (~17,600 in most, 0-2,000 in
    # some; 4,450 on one busy machine, where glibc's adaptive mmap threshold had risen).
    # Tuned: 0 in every repetition on a quiet machine; on a busy CI machine the kernel
    # reclaimed pages now and then (a mean of ~900), so the tuned side is read by its
    # median repetition; a tenth of the defaults' mean is the bound. The defaults must
    # fault at all (a tenth of the ~25,000 pages) for the comparison to mean something.
    mean_default = statistics.mean(default_faults)
    assert mean_default > 2500, default_faults
    assert statistics.median(faults) < mean_default / 10, (faults, default_faults)
