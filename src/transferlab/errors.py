"""User-facing errors: the CLI prints their message and exits non-zero, with no traceback."""


class TransferlabError(Exception):
    """An error the user can act on; its message says what went wrong and what to do."""

    exit_code = 2


class DataError(TransferlabError):
    """The input data cannot be used as given (missing path, empty/single class, split mismatch...)."""


class BackboneUnavailable(TransferlabError):
    """A backbone is unknown, or its weights cannot be obtained (e.g. offline without a cached copy)."""


class RunDirError(TransferlabError):
    """A run directory is missing, incomplete, or cannot be written."""
