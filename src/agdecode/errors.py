"""The one base class of the errors agdecode reports to people (the CLI prints them as one line)."""


class AgdError(ValueError):
    """A problem with the user's input or setup, reported as one line."""
