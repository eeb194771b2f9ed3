"""The one exception type for bad input: the CLI prints its message and exits with status 2."""


class UserInputError(ValueError):
    """Bad input from the user: the message names the file, line or parameter and what to do."""
