"""Errors of the load-test stage."""


class LoadtestError(Exception):
    """Base class: a user-facing problem (bad arguments, a failed run)."""
