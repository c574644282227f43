"""The one exception type users see: it names the bad value and the fix."""


class ExplorerError(ValueError):
    """A user-facing error. The message names the offending value and how to fix it."""
