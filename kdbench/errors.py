"""The one exception type for mistakes a user can fix (bad config, unknown name, missing file).

The CLI turns it into a one-paragraph message and exit code 2, never a traceback; anything else
that escapes is a bug in kdbench and keeps its traceback.
"""


class KdbenchError(Exception):
    """A user-facing error: the message says what was given, what was expected and how to fix it."""
