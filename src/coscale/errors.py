"""Exceptions a user can cause.

Every error that a user can fix (a bad config field, a missing file, a corrupt checkpoint, an unknown
preset) is raised as a :class:`CoscaleError` subclass with a message that says what to change. The CLI
prints such an error on one line and exits with status 2; anything else is a bug and keeps its
traceback.
"""

import contextlib


class CoscaleError(Exception):
    """Base class for errors caused by user input."""


class ConfigError(CoscaleError, ValueError):
    """An invalid or inconsistent configuration."""


class CheckpointError(CoscaleError):
    """A missing, corrupt, mis-shaped or incompatible checkpoint."""


class DataError(CoscaleError):
    """A missing or unreadable training corpus."""


class OutputError(CoscaleError, OSError):
    """A file or directory that cannot be written: not a directory, no permission, a read-only or full
    filesystem. Also an ``OSError``, so callers that handle I/O failures keep doing so."""


def os_error_reason(error: OSError) -> str:
    """The cause of an ``OSError`` in words (``strerror``, e.g. 'No space left on device')."""
    return error.strerror or str(error) or type(error).__name__


@contextlib.contextmanager
def writing(what: str):
    """Turn an ``OSError`` raised inside into a one-line :class:`OutputError`: 'cannot write <what>: <cause>'
    (``what`` names the path)."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"cannot write {what}: {os_error_reason(e)}") from None
