"""Errors a user can act on. Their ``str()`` is one line naming the file, field or URL."""


class OrchardError(Exception):
    """Base for errors reported to the user as one line, never as a traceback."""
