"""The pieces of scripts/calibrate_memory.py: the grid (grid.py), the fit (fitting.py), the
report and the README's claims table (report.py), the stored measurements (storage.py).
The paths they share are here."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MEASUREMENTS = ROOT / "docs" / "memory-calibration.json"
DOC = ROOT / "docs" / "memory.md"
CACHE = Path(os.environ.get("MLXTUNE_CALIBRATE_CACHE",
                            Path(tempfile.gettempdir()) / "mlxtune-calibrate"))
COEFFICIENT_FILE = ROOT / "mlxtune" / "memory" / "calibration.py"
