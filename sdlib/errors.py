"""User-facing errors: what the library raises when the input is wrong, and the stages print as one line.

Each carries a complete, one-line message naming what is wrong (the key, the file, the step). `sdlib.cli.user_errors`
turns any `UserError` into `error: <message>` and exit code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Base of the errors a user can fix; the message is one line."""


class ConfigError(UserError, ValueError):
    """A bad, missing or contradictory parameter or option."""


class DataError(UserError, ValueError):
    """Missing, empty or corrupt input data, or an output path that cannot be written."""


class CheckpointError(UserError, ValueError):
    """A missing, corrupt or mismatched checkpoint."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class SamplingError(UserError, RuntimeError):
    """Sampling gave non-finite values (broken weights, or a dtype too narrow for the model)."""
