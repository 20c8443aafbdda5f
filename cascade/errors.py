"""User-facing errors.

Anything a user can fix (a config, a data file, a checkpoint, an argument) raises a
:class:`CascadeError`. The CLI prints its message on one line and exits with code 2;
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CascadeError(Exception):
    """An error caused by the user's input, reported without a traceback.

    Args:
        message: one actionable line; name the file and the key or row when there is one.
    """


class ConfigError(CascadeError):
    """A config that failed validation; ``errors`` lists every problem found."""

    def __init__(self, path: str, errors: list[str]):
        self.path = path
        self.errors = list(errors)
        super().__init__("\n".join(f"{path}: {e}" for e in self.errors))


class DataError(CascadeError):
    """A data file that is missing, truncated or malformed."""


class CheckpointError(CascadeError):
    """A checkpoint that cannot be read, or that a different config or network wrote."""


class TrainingError(CascadeError):
    """Training that went wrong (a NaN or infinite loss); the message names the step and
    the last good checkpoint, which is kept."""
