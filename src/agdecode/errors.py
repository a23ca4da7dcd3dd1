"""The one base class of user-facing errors."""


class AgdError(ValueError):
    """A problem with the user's input or setup, reported as one line."""
