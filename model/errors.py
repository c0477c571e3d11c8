"""UserError: bad input the user can fix (a wrong flag, a bad preset key, a missing or corrupt checkpoint).

The CLI prints its message as one line and exits 2; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error in what the user asked for, with a message that says what is wrong and how to fix it."""


def unknown_key(key: str, valid, source: str) -> UserError:
    """The error for a key that `source` (a file, or the --set flags) may not hold, naming the closest valid one."""
    import difflib

    closest = difflib.get_close_matches(key, list(valid), n=1, cutoff=0)
    hint = f"; did you mean '{closest[0]}'?" if closest else ""
    return UserError(f"unknown key '{key}' in {source}{hint}")
