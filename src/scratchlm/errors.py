"""The one exception type for problems a user can fix.

Anything raised as :class:`ScratchLMError` is a problem with the user's input (a path, a file, a
line, a config field); the CLI prints its message on one line, without a traceback, and exits 2.
Everything else is a bug and keeps its traceback.
"""


class ScratchLMError(Exception):
    """Bad input. The message names the culprit (file, line, field) and says what to do."""
