"""Exceptions that mean "the user's set-up", which the entry points report as one paragraph without a traceback."""


class MissingPackageError(ImportError):
    """An optional package an option needs is not installed; the message says what to install."""
