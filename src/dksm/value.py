"""Values: plain slotted classes that compare, hash and print by their fields.

The modules ``dksm run`` imports make their small value classes this way rather than
as dataclasses: making a dataclass compiles its methods at import, about half a
millisecond each, and importing :mod:`dataclasses` itself (with :mod:`inspect`)
several more, paid by every VM start.  A subclass names its fields in
``__slots__`` and sets them in ``__init__``; nothing changes them afterwards
(unlike a frozen dataclass this is a convention, not enforced: enforcing it would
cost every instance what freezing costs).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from typing import Self


class Value:
    """Equal to a value of its own class with equal fields (``__slots__``, in order)."""

    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def fields(self) -> dict[str, object]:
        """Each field's name and value, in order (values themselves not copied)."""
        return dict(zip(self.__slots__, self._values(), strict=True))

    def replace(self, **changes: object) -> Self:
        """A copy with ``changes`` (field names and new values), as
        :func:`dataclasses.replace` makes one; every field is an ``__init__``
        parameter of the same name."""
        return type(self)(**{**self.fields(), **changes})

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({shown})"
