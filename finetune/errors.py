"""Errors the fine-tune stage reports to users as one line."""


class FinetuneError(Exception):
    """Base class: a user-facing problem (bad input, bad arguments)."""


class DataError(FinetuneError):
    """The data set is missing, malformed or unusable."""


class CheckpointError(FinetuneError):
    """A base or output checkpoint directory is unusable."""
