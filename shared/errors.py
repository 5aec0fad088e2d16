"""Errors a user can act on. Their ``str()`` is one line naming the file, field or URL."""


class OrchardError(Exception):
    """Base for errors reported to the user as one line, never as a traceback."""

    def __init__(self, message: object = "") -> None:
        # whatever went into the message (a file name, a TOML key), it stays one line
        super().__init__(" ".join(str(message).split("\n")).replace("\r", " "))
