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


@pytest.fixture(params=PROFILES)
def profile(request, monkeypatch):
    """Runs an end-to-end test under each compute profile: 'cpu' (this machine's own path)
    and 'gpu' (MLXTUNE_PROFILE=gpu: every choice as on Metal/CUDA, bfloat16 compute,
    computed here). The variable reaches subprocesses the test starts too."""
    monkeypatch.setenv("MLXTUNE_PROFILE", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _cpu_profile_unless_asked(request, monkeypatch):
    """Tests that do not ask for `profile` test this machine's own path, whatever
    MLXTUNE_PROFILE the shell has."""
    if "profile" not in request.fixturenames:
        monkeypatch.setenv("MLXTUNE_PROFILE", "cpu")


def expected_compute_dtype(profile: str) -> str:
    """What `model.dtype: auto` resolves to under `profile`."""
    return "bfloat16" if profile == "gpu" else "float32"
