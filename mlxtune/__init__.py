"""mlxtune: LoRA / QLoRA and preference fine-tuning on MLX."""

from mlxtune import _blas

# Must run before anything imports mlx.core (see _blas).
_blas.preload()

__version__ = "0.1.0"
