"""mlxtune: LoRA / QLoRA and preference fine-tuning on MLX."""

from mlxtune import _blas, _malloc

# Must run before anything imports mlx.core (see _blas).
_blas.preload()
_malloc.tune()  # freed host buffers reused instead of page-faulted in again (see _malloc)


def _cpu_profile_on_the_cpu() -> None:
    """MLXTUNE_PROFILE=cpu on a machine with a GPU computes the CPU path on the CPU device
    (the test suite's CPU-path tests on a Mac, for one); see backend.profile."""
    import os

    if os.environ.get("MLXTUNE_PROFILE", "").strip().lower() == "cpu":
        import mlx.core as mx

        if mx.default_device() != mx.cpu:
            mx.set_default_device(mx.cpu)


_cpu_profile_on_the_cpu()

from mlxtune import _schedule  # noqa: E402  (after the device is settled)

_schedule.depth_first_on_the_cpu()  # before MLX's first evaluation reads the variable

__version__ = "0.1.0"
DISTRIBUTION = "mlxtune-lora"  # the name on PyPI (pip install mlxtune-lora); imports stay mlxtune
