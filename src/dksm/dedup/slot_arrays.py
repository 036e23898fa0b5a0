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

The same reading finds zeros (slots not in use) without looking at each element:
setting every element's top bit and subtracting one from each cannot borrow from a
neighbour, and leaves an element's top bit clear exactly where it was zero.
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
    return int.from_bytes(_ONE * count, _ORDER)


_ONE: Final = array.array("Q", [1]).tobytes()
_ramps: list[int] = [0]  # the ramp of the most elements built so far (a power of two)
_ramp_elements: list[int] = [1]


def _ramp(count: int) -> int:
    """The elements ``0, 1, ..., count - 1``, read as one integer.

    Built once for a power of two at least ``count``, by doubling (elements
    ``m ... 2m - 1`` are elements ``0 ... m - 1`` plus ``m``: a few big-integer
    operations, never a Python int per element), and cut to ``count``."""
    ramp, built = _ramps[0], _ramp_elements[0]
    while built < count:
        upper = ramp + built * _ones(built)
        if _ORDER == "little":  # element i at bits 64 i
            ramp |= upper << (64 * built)
        else:  # element i at bits 64 (n - 1 - i)
            ramp = (ramp << (64 * built)) | upper
        built *= 2
    _ramps[0], _ramp_elements[0] = ramp, built
    if _ORDER == "little":
        return ramp & ((1 << (64 * count)) - 1)
    return ramp >> (64 * (built - count))


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


def first_zero(counts: array.array[int]) -> int:
    """The position of the first zero among ``counts`` (unsigned u64s), -1 if none."""
    if not counts:
        return -1
    return _first_zero(int.from_bytes(counts.tobytes(), _ORDER), len(counts))


def _first_zero(packed: int, count: int) -> int:
    highs = _highs(count)
    # An element's top bit, set, keeps a subtraction of one inside it; cleared after,
    # it marks a zero (elements with their own top bit set are not zero).
    zeros = ~(((packed | highs) - _ones(count)) | packed) & highs
    if not zeros:
        return -1
    if _ORDER == "little":  # element i holds bits 64 i ... 64 i + 63
        return ((zeros & -zeros).bit_length() - 1) >> 6
    return count - 1 - ((zeros.bit_length() - 1) >> 6)


def plus_one_in_use(counts: array.array[int]) -> tuple[array.array[int], int]:
    """Each of ``counts`` (unsigned u64s, below 2**63) plus one, and the position of
    the first that was zero (-1 if none), from one reading of ``counts``."""
    if not counts:
        return array.array("Q"), -1
    packed = int.from_bytes(counts.tobytes(), _ORDER)
    return _plus_one(packed, len(counts)), _first_zero(packed, len(counts))


def plus_one(counts: array.array[int]) -> array.array[int]:
    """Each of ``counts`` (unsigned u64s, below 2**63) plus one."""
    return _plus_one(int.from_bytes(counts.tobytes(), _ORDER), len(counts))


def _plus_one(packed: int, count: int) -> array.array[int]:
    if packed & _highs(count):
        raise ValueError("a reference count would leave 63 bits")
    raised = packed + _ones(count)
    result = array.array("Q")
    result.frombytes(raised.to_bytes(8 * count, _ORDER))
    return result
