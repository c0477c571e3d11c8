"""UserError: bad input the user can fix (a wrong flag, a bad preset key, a missing or corrupt checkpoint).

The CLI prints its message as one line and exits 2; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error in what the user asked for, with a message that says what is wrong and how to fix it."""
