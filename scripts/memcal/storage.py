"""The stored measurements of scripts/calibrate_memory.py (docs/memory-calibration.json)
and the environment they were measured in."""

from __future__ import annotations

import json

from memcal import MEASUREMENTS


def load_measurements() -> dict:
    if MEASUREMENTS.exists():
        return json.loads(MEASUREMENTS.read_text())
    return {}


def save_measurements(data: dict) -> None:
    MEASUREMENTS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def record_measurement(name: str, entry: dict, env: dict) -> dict:
    """Add one measurement to the stored ones as they are on disk now (another
    calibrate_memory.py may have added its own since this one started); returns them."""
    stored = load_measurements()
    stored.setdefault("measurements", {})[name] = entry
    stored["environment"] = env
    tmp = MEASUREMENTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    tmp.replace(MEASUREMENTS)
    return stored


def environment() -> dict:
    import platform

    import mlx.core as mx

    from mlxtune import backend

    return {"mlx": mx.__version__, "backend": backend.name(), "blas": backend.blas(),
            "machine": f"{platform.system()} {platform.machine()}"}
