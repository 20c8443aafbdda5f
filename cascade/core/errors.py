"""User-facing errors.

Anything a user can fix (a config, a data file, a checkpoint, an argument) raises a
:class:`CascadeError`. The CLI prints its message on one line and exits with code 2;
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def described(exc: BaseException) -> str:
    """``Type: first line`` of an exception, for a one-line error about a library's failure."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


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
