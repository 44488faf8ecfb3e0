"""The one exception type for bad user input. The CLI prints its message on one line and exits 2."""


class BadInput(ValueError):
    """Input the user can fix: the message says what is wrong and how to fix it."""
