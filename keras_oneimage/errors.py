"""Errors that the package raises for bad user input."""


class InputError(ValueError):
    """A user-supplied input (file, array, flag value) that the package cannot use.

    The message is one line and says what was wrong and with what; the CLI prints it and exits with status 2.
    """


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss and stopped; the last good checkpoint is kept. ``.history`` holds the epochs."""

    def __init__(self, message: str, history=None):
        super().__init__(message)
        self.history = history
