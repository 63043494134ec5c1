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
    assert module is not None, native.state["reason"]
    return module
