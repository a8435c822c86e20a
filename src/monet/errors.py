"""One exception type for mistakes a user can fix (bad path, bad config, corrupt file).

It subclasses `ValueError` so library callers can catch the usual type; the CLI prints its message
as a single line instead of a traceback.
"""


class MonetError(ValueError):
    """A problem with the user's input, with a message that says what is wrong and how to fix it."""
