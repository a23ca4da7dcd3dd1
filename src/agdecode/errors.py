class AgdError(ValueError):
    """A problem with the user's input or setup, reported as one line."""
