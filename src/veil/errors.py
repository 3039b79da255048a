"""Exceptions that Veil raises on purpose.

`UserError` and its subclasses mean "the input is wrong and the user can fix it": the CLI prints
their message as one line on stderr and exits with status 2, without a traceback. Anything else
is a bug in Veil and keeps its traceback.
"""

from __future__ import annotations


class VeilError(Exception):
    """Base class of every exception Veil raises deliberately."""


class UserError(VeilError):
    """Bad input by the user: the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """A run configuration is invalid (unknown key, wrong type, impossible value)."""


class DataError(UserError):
    """A data set cannot be loaded or partitioned as requested."""


class StoreError(UserError):
    """A run store or run directory is missing or does not hold what was asked for."""
