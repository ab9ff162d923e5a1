"""Errors the data generators raise for bad input or a missing tool.

The command line turns them into a one-line ``error: ...`` message and exit
status 2 instead of a traceback.
"""
from __future__ import annotations


class DataGenerationError(Exception):
    """A user-facing problem: a bad parameter, an unusable output directory, a tool failure."""


class MissingToolError(DataGenerationError):
    """A command-line tool the generator needs is not installed."""
