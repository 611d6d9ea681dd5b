"""Errors that revseg reports to the user as one line (no traceback).

The CLI entry points catch :class:`RevsegError`, print ``error: <message>`` to stderr and exit
with status 2. Messages name the offending file or config key.
"""

__all__ = ["RevsegError", "ConfigError", "DataError", "TrainingError"]


class RevsegError(Exception):
    """Base class of the errors shown to the user as a single line."""


class ConfigError(RevsegError):
    """A config key has a wrong type or an impossible value; the message names the key."""


class DataError(RevsegError):
    """A dataset file or folder is missing or malformed; the message names the path."""


class TrainingError(RevsegError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step and the case."""
