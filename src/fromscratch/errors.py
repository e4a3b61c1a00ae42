"""The one exception type for mistakes the user can fix.

The CLI prints a `UserError` as a one-line message (no traceback) and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed checkpoint, an impossible flag."""


class Interrupted(Exception):
    """A run stopped by a signal (SIGINT, SIGTERM) after saving what it had: the command exits
    with 128 + the signal's number (130, 143), as a shell reports a command killed by it."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by signal {signum}")
        self.signum = signum
