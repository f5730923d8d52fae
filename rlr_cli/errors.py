"""User-facing errors: the CLI prints their message as one line and exits with status 2."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing weights, bad input); no traceback is shown."""
