"""mlxtune: LoRA / QLoRA and preference fine-tuning on MLX."""

from mlxtune import _blas, _malloc

# Must run before anything imports mlx.core (see _blas).
_blas.preload()
_malloc.tune()  # freed host buffers reused instead of page-faulted in again (see _malloc)

__version__ = "0.1.0"
