"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: a missing file, a config typo, a mismatched checkpoint.

    The message must name the thing and say what to do about it.
    """
