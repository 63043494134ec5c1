import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import mlxtune  # noqa: E402,F401  (loads OpenBLAS before mlx.core, as the CLI does)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tiny import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_quantized_model_dir(tmp_path_factory):
    from tiny import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("tiny-llama-q4"),
                          quantize={"group_size": 32, "bits": 4})


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def native_kernels():
    """mlxtune.native's extension module; the test is skipped where it cannot be built
    here. Where it can be, it must load: a silent fallback would hide a broken kernel."""
    from mlxtune import native

    reason = native._unavailable()
    if reason:
        pytest.skip(f"native kernels: {reason}")
    module = native.load()
    assert module is not None, native.status_line(build=False)
    return module


PROFILES = ("cpu", "gpu")


def _on_device(profile: str):
    """Where a GPU exists (a Mac in CI), the 'cpu' profile computes on the CPU device and
    the 'gpu' profile on the GPU, as `import mlxtune` does for a subprocess given
    MLXTUNE_PROFILE; without one (these Linux machines) the GPU profile's choices run on
    the CPU. Returns the device to restore."""
    import mlx.core as mx

    before = mx.default_device()
    has_gpu = mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())
    if has_gpu:
        mx.set_default_device(mx.gpu if profile == "gpu" else mx.cpu)
    return before


@pytest.fixture(params=PROFILES)
def profile(request, monkeypatch):
    """Runs an end-to-end test under each compute profile: 'cpu' (this machine's own path)
    and 'gpu' (MLXTUNE_PROFILE=gpu: every choice as on Metal/CUDA, bfloat16 compute,
    computed here; on a real GPU, there). The variable reaches the test's subprocesses."""
    import mlx.core as mx

    monkeypatch.setenv("MLXTUNE_PROFILE", request.param)
    before = _on_device(request.param)
    yield request.param
    mx.set_default_device(before)


@pytest.fixture(autouse=True)
def _cpu_profile_unless_asked(request, monkeypatch):
    """Tests that do not ask for `profile` test the CPU path (on the CPU device), whatever
    MLXTUNE_PROFILE the shell has; tests marked `gpu` run on the GPU."""
    if "profile" in request.fixturenames:
        yield
        return
    import mlx.core as mx

    wanted = "gpu" if request.node.get_closest_marker("gpu") else "cpu"
    monkeypatch.setenv("MLXTUNE_PROFILE", wanted)
    before = _on_device(wanted)
    yield
    mx.set_default_device(before)


def expected_compute_dtype(profile: str) -> str:
    """What `model.dtype: auto` resolves to under `profile`."""
    return "bfloat16" if profile == "gpu" else "float32"
