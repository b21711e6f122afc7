"""What a user takes out of a run: the model bundle (export), fairseq label files, and units of any corpus."""


class ExportError(ValueError):
    """What was asked for cannot be exported (no such model or checkpoint, labels that do not fit the run)."""

    retryable = False
