"""User-facing errors.

Anything raised as an ``MlxtuneError`` is bad input or an expected failure: the CLI prints
its message as one line and exits non-zero, without a traceback (unless ``--debug``).
"""


class MlxtuneError(Exception):
    """An error whose message is meant for the user, as is."""

    exit_code = 2


class ConfigError(MlxtuneError):
    """A config file or --set override is invalid; the message names file and key."""


class DataError(MlxtuneError):
    """A dataset is invalid; the message names file and line."""


class ModelError(MlxtuneError):
    """A model cannot be found or read; the message names the source."""


class TrainingStopped(MlxtuneError):
    """Training stopped early on purpose (NaN loss, interruption)."""

    exit_code = 3
