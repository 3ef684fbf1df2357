"""Errors meant for the artist, not for a traceback."""


class UserError(Exception):
    """Something the user can fix. The message says what is wrong, which file, and what to do next.

    Raised before any GPU time is spent wherever the problem can be seen that early; the CLI, the UI and the
    API show only the message.
    """
