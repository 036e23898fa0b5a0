"""Admission: which of a load's pages the pool already holds, and which to store.

Pure functions over a load's bytes, its pages' hashes and the candidate slots the
index named; the stored pages are compared through a function given by the caller
(the pages file's ``holds``, which compares in place), so nothing here touches the
index, a file descriptor or a transaction.  :mod:`dksm.dedup.references` runs them
inside the write transaction that takes the references (the pool's invariant 3:
bytes are compared before a page is shared).

Conventions: ``slots[page]`` is a slot number, ``-1`` for a page without one yet, or
``-2 - i`` for a page equal to the ``i``-th page the load stores itself.

Finding candidates without hashing every page: content the pool already holds was
mostly stored a load at a time, in consecutive slots, so where page ``p`` was found
at slot ``s``, page ``p + k`` is most likely at slot ``s + k``.  A load hashes and
looks up one page (an *anchor*), predicts the slots of the pages after it, and
compares the whole run of predicted slots in use with its bytes at once
(:func:`matched_predictions`); it hashes another anchor only where a prediction
ended without a match, at the next of every :data:`ANCHOR_EVERY`-th page.  An image
the pool holds in one piece is found with one hash and one lookup.  A prediction is
a candidate like a hash match, and the bytes decide as for one; only the pages no
prediction matched are hashed and looked up one by one.  The hash a slot is recorded
under is not needed: a slot in use holds the bytes it was stored with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dksm.memory.host_mapping import PAGE_SIZE

SlotComparer = Callable[[int, memoryview], bool]
"""``holds(first_slot, data)``: whether consecutive stored pages from ``first_slot``
on are exactly ``data`` (whole pages)."""
AnchorLookup = Callable[[int], int | None]
"""``anchor_slot(page)``: a slot in use the index names for the hash of ``page``."""
InUse = Callable[[int, int], int]
"""``in_use(first_slot, length)``: how many of the slots from ``first_slot`` on (at
most ``length``) are in use before the first that is not."""

# Hash matches are confirmed a run of consecutive candidate slots at a time, at most
# this long (16 MiB): one comparison in place per run, the mapping it needs bounded.
COMPARE_RUN = 4096
NO_SLOT = b"\xff" * 8  # sorts after every real slot; never allocated
NO_SLOT_NUMBER = int.from_bytes(NO_SLOT, "big")
# One page in this many is hashed and looked up to predict the slots of the pages
# after it; a prediction that fails costs the pages up to the next anchor a hash
# and a lookup each.
ANCHOR_EVERY = 32

Run = tuple[int, int, int]
"""(first page, first slot, length): pages ``first page ...`` in consecutive slots."""


def matched_predictions(
    data: memoryview, anchor_slot: AnchorLookup, in_use: InUse, holds: SlotComparer, end: int
) -> list[Run]:
    """The runs of ``data``'s pages that the pool holds in the slots predicted for them,
    compared byte for byte; predictions are made below slot ``end`` only.

    An anchor found at slot ``s`` predicts the pages after it at ``s + 1, s + 2, ...``
    for as long as those slots are in use, :data:`COMPARE_RUN` pages at a time; a run
    that matched whole is continued without another anchor.  Where a run differs, its
    pages are compared :data:`ANCHOR_EVERY` at a time up to the first part that
    differs, and the next anchor is the first :data:`ANCHOR_EVERY`-th page after it;
    pages before the first anchor found get no prediction."""
    count = len(data) // PAGE_SIZE
    matched: list[Run] = []
    page = 0
    slot: int | None = None  # the slot predicted for ``page``
    while page < count:
        if slot is None:
            slot = anchor_slot(page)
            if slot is None:
                page += ANCHOR_EVERY
                continue
        length = in_use(slot, max(0, min(count - page, COMPARE_RUN, end - slot)))
        same = _matching_prefix(holds, data, page, slot, length) if length > 0 else 0
        if same:
            matched.append((page, slot, same))
        if same and same == length:
            page, slot = page + same, slot + same
            continue
        page, slot = (page + same) // ANCHOR_EVERY * ANCHOR_EVERY + ANCHOR_EVERY, None
    return matched


def _matching_prefix(
    holds: SlotComparer, data: memoryview, page: int, slot: int, length: int
) -> int:
    """How many pages from ``page`` on the slots from ``slot`` on hold: all ``length``
    in one comparison, else :data:`ANCHOR_EVERY` at a time up to the first part that
    differs."""
    if holds(slot, data[page * PAGE_SIZE : (page + length) * PAGE_SIZE]):
        return length
    if length <= ANCHOR_EVERY:
        return 0
    same = 0
    while same < length:
        size = min(ANCHOR_EVERY, length - same)
        part = data[(page + same) * PAGE_SIZE : (page + same + size) * PAGE_SIZE]
        if not holds(slot + same, part):
            break
        same += size
    return same


def runs(sorted_slots: Sequence[int]) -> list[tuple[int, int]]:
    """Group ascending slot numbers into (first, length) runs of consecutive slots."""
    found: list[tuple[int, int]] = []
    for slot in sorted_slots:
        if found and found[-1][0] + found[-1][1] == slot:
            found[-1] = (found[-1][0], found[-1][1] + 1)
        else:
            found.append((slot, 1))
    return found


def confirm(
    holds: SlotComparer, data: memoryview, candidates: list[int]
) -> tuple[list[int], list[int]]:
    """Compare each page with its candidate slot: (slot or -1 per page, mismatched pages).

    ``NO_SLOT_NUMBER`` means no candidate.  Runs of pages whose candidates are
    consecutive slots -- an image already in the pool -- are compared a run at a time.
    """
    count = len(candidates)
    slots = [-1] * count
    mismatched: list[int] = []
    start = 0
    while start < count:
        first = candidates[start]
        if first == NO_SLOT_NUMBER:
            start += 1
            continue
        stop = start + 1
        while (
            stop < count and stop - start < COMPARE_RUN and candidates[stop] == first + stop - start
        ):
            stop += 1
        if holds(first, data[start * PAGE_SIZE : stop * PAGE_SIZE]):
            slots[start:stop] = range(first, first + stop - start)
        else:
            for page in range(start, stop):
                if holds(first + page - start, data[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]):
                    slots[page] = first + page - start
                else:
                    mismatched.append(page)
        start = stop
    return slots, mismatched


def find_equal(holds: SlotComparer, data: memoryview, page: int, slots: list[int]) -> int | None:
    """The first of ``slots`` holding exactly the bytes of ``page``, if any."""
    wanted = data[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
    for slot in slots:
        if holds(slot, wanted):
            return slot
    return None


def distinct_new_pages(
    data: memoryview, hash_keys: list[bytes], slots: list[int], collided: set[int]
) -> list[int]:
    """The pages to store (those without a slot, each distinct content once), in order.

    A later page equal to one of them gets ``-2 - i`` in ``slots``, i being the
    position of its twin in the returned list.  Pages whose hash matched an earlier
    new page with other bytes are added to ``collided``.
    """
    unplaced = [page for page, slot in enumerate(slots) if slot == -1]
    if len({hash_keys[page] for page in unplaced}) == len(unplaced):
        return unplaced  # no two share a hash, so no two are equal: nothing to compare
    fresh: list[int] = []
    by_hash: dict[bytes, list[int]] = {}
    for page, slot in enumerate(slots):
        if slot != -1:
            continue
        twins = by_hash.setdefault(hash_keys[page], [])
        if twins:
            content = data[page * PAGE_SIZE : (page + 1) * PAGE_SIZE].tobytes()
            for position in twins:
                twin = fresh[position]
                if content == data[twin * PAGE_SIZE : (twin + 1) * PAGE_SIZE].tobytes():
                    slots[page] = -2 - position
                    break
            else:
                collided.add(page)
                twins.append(len(fresh))
                fresh.append(page)
        else:
            twins.append(len(fresh))
            fresh.append(page)
    return fresh


def place_new_pages(slots: list[int], fresh: Sequence[int], first: int) -> None:
    """Give the stored pages ``fresh`` the slots from ``first`` on, and their twins
    (``-2 - i``) the slot of their ``i``-th stored page."""
    for offset, page in enumerate(fresh):
        slots[page] = first + offset
    for page, slot in enumerate(slots):
        if slot < 0:
            slots[page] = first - 2 - slot
