"""Errors the exporter reports to users as one line."""


class ExporterError(Exception):
    """Base class: a user-facing problem (bad input, bad arguments)."""


class CheckpointError(ExporterError):
    """The checkpoint is missing, corrupt or not a sequence classifier."""


class EvalDataError(ExporterError):
    """The evaluation CSV is missing or lacks the needed columns."""


class ParityError(ExporterError):
    """No variant passed its parity gate."""


class TokenizerError(CheckpointError):
    """No usable (fast) tokenizer: none in the checkpoint and none given with --tokenizer, or not convertible."""
