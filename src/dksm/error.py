"""The root of dksm's error hierarchy.

Every module raises its own subclass of :class:`DksmError` for bad input or an
unusable environment, with a message that is a sentence for the user.  Only the CLI
turns these into exit codes; anything else escaping is a bug and keeps its traceback.
"""


class DksmError(Exception):
    """A failure caused by input or environment, explained in its message."""
