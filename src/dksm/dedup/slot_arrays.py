"""Arrays of slot numbers and reference counts, changed a run at a time in C.

Loads reference runs of consecutive slots, thousands of pages long, and each page
costs: its count goes up by one and its slot number is written into the load's
array.  Done an element at a time, every element passes through a Python int
(about 50 ns).  Read as one integer in the host's byte order, a run of ``n`` u64
elements is changed by one big-integer operation instead: adding
``sum(1 << 64 i)`` adds one to every element, and ``s * sum(1 << 64 i) +
sum(i << 64 i)`` is the run ``s, s + 1, ..., s + n - 1``.  No element may carry
into the next: counts are checked to stay below 2**63 and slot numbers are far
below it.  About four times faster, and the loop stays in C.
"""

from __future__ import annotations

import array
import functools
import sys

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from typing import Final

_ORDER: Final = sys.byteorder
_LIMIT: Final = 1 << 63  # no element this large: adding one can never carry


@functools.lru_cache(maxsize=32)  # a load uses a few lengths: blocks, spans, runs
def _ones(count: int) -> int:
    return int.from_bytes(array.array("Q", [1]).tobytes() * count, _ORDER)


@functools.lru_cache(maxsize=32)
def _ramp(count: int) -> int:
    return int.from_bytes(array.array("q", range(count)).tobytes(), _ORDER)


@functools.lru_cache(maxsize=32)
def _highs(count: int) -> int:
    return _ones(count) << 63


def consecutive(first: int, count: int) -> array.array[int]:
    """The slot numbers ``first, first + 1, ..., first + count - 1``."""
    if not 0 <= first < _LIMIT - count:
        raise ValueError(f"slot numbers from {first} do not fit in 63 bits")
    packed = first * _ones(count) + _ramp(count)
    run = array.array("q")
    run.frombytes(packed.to_bytes(8 * count, _ORDER))
    return run


def plus_one(counts: array.array[int]) -> array.array[int]:
    """Each of ``counts`` (unsigned u64s, below 2**63) plus one."""
    packed = int.from_bytes(counts.tobytes(), _ORDER)
    if packed & _highs(len(counts)):
        raise ValueError("a reference count would leave 63 bits")
    raised = packed + _ones(len(counts))
    result = array.array("Q")
    result.frombytes(raised.to_bytes(8 * len(counts), _ORDER))
    return result
