"""User-facing errors: the CLI prints their message as one line and exits with status 2 (130 for Ctrl-C)."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing weights, bad input); no traceback is shown."""


class Interrupted(Exception):
    """The user stopped the run (Ctrl-C); the message says what was saved."""
