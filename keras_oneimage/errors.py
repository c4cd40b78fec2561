"""Errors that the package raises for bad user input."""


class InputError(ValueError):
    """A user-supplied input (file, array, flag value) that the package cannot use.

    The message is one line and says what was wrong and with what; the CLI prints it and exits with status 2.
    """
