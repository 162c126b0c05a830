"""Exceptions a user can cause.

Every error that a user can fix (a bad config field, a missing file, a corrupt checkpoint, an unknown
preset) is raised as a :class:`CoscaleError` subclass with a message that says what to change. The CLI
prints such an error on one line and exits with status 2; anything else is a bug and keeps its
traceback.
"""


class CoscaleError(Exception):
    """Base class for errors caused by user input."""


class ConfigError(CoscaleError, ValueError):
    """An invalid or inconsistent configuration."""


class CheckpointError(CoscaleError):
    """A missing, corrupt, mis-shaped or incompatible checkpoint."""


class DataError(CoscaleError):
    """A missing or unreadable training corpus."""
