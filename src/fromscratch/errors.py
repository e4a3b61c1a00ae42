"""The one exception type for mistakes the user can fix.

The CLI prints a `UserError` as a one-line message (no traceback) and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed checkpoint, an impossible flag."""
