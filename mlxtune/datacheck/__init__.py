"""`mlxtune data`: leakage, duplicates, conflicts and truncation in the data a run would
train on (check.py), from its normalised texts (text.py, minhash.py) and its tokens as
the run encodes them (tokens.py); report.py writes the text, fix.py a cleaned copy.
No UI here: the CLI and the TUI call ``check``, ``leakage_note`` and ``summary``."""

from mlxtune.datacheck.check import Report, check, leakage_note, note_leakage

__all__ = ["Report", "check", "leakage_note", "note_leakage"]
