"""User-facing errors: one line on stderr, exit code 2, no traceback.

Anything a user can fix (a config key, a path, a bad parquet row) raises a
subclass of :class:`UserError`; the CLI prints ``error: <message>`` and exits 2.
Programming errors keep their tracebacks.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; the message names the file and key or row."""

    exit_code = 2


class ConfigError(UserError):
    """Invalid run configuration (YAML or a dotted override)."""


class DataError(UserError):
    """Unusable training data (missing column, wrong shape, empty dataset)."""
