"""The training loop and what it writes: events, checkpoints, adapters."""
