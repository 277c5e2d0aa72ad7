"""User-facing errors.

Everything a user can cause (a typo in a recipe, a missing dataset, a teacher
checkpoint for another architecture) raises a subclass of :class:`DfkdError`
whose message names the problem and the fix. The CLI prints that message and
exits non-zero instead of showing a traceback.
"""

from __future__ import annotations

from generators.registry import RegistryError

__all__ = [
    "DfkdError",
    "ConfigError",
    "DatasetNotFoundError",
    "CheckpointError",
    "NonFiniteLossError",
    "RunLockedError",
    "USER_ERRORS",
]


class DfkdError(Exception):
    """Base class of errors caused by input the user can fix."""


class ConfigError(DfkdError):
    """A recipe or command-line override is invalid."""


class DatasetNotFoundError(DfkdError):
    """A dataset is not where the recipe says it is."""


class CheckpointError(DfkdError):
    """A checkpoint cannot be read, or does not fit the model it is loaded into."""


class NonFiniteLossError(DfkdError):
    """A loss term became NaN or infinite."""


class RunLockedError(DfkdError):
    """Another process is training into the same run folder."""


# What the CLI reports as a one-paragraph error rather than a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (DfkdError, RegistryError)
