"""The root of dksm's error hierarchy.

Every module raises its own subclass of :class:`DksmError` for bad input or an
unusable environment, with a message that is a sentence for the user.  Only the CLI
turns these into exit codes; anything else escaping is a bug and keeps its traceback.

A message is printed as one line per problem: :meth:`DksmError.lines` gives them
with every control character and line separator escaped, so that a path or a field
name holding a newline can never split a line (or forge one).
"""

# C0 and C1 controls and Unicode's line and paragraph separators.
_LINE_BREAKERS = (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _LINE_BREAKERS}


def one_line(text: str) -> str:
    """``text`` with everything that could break or fake a line escaped."""
    return text.translate(_ESCAPES)


class DksmError(Exception):
    """A failure caused by input or environment, explained in its message."""

    def lines(self) -> list[str]:
        """The problems, one escaped line each (one, unless a subclass has several)."""
        return [one_line(str(self))]
