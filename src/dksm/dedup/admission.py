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
looks up only one page in :data:`ANCHOR_EVERY` (its *anchors*), predicts the slots
of the pages after each anchor found (:func:`predicted_runs`), and compares whole
runs of predicted slots with its bytes at once.  A prediction is a candidate like a
hash match, and the bytes decide as for one; only the pages no prediction matched
are hashed and looked up one by one.  The hash a slot is recorded under is not
needed: a slot in use holds the bytes it was stored with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dksm.memory.host_mapping import PAGE_SIZE

SlotComparer = Callable[[int, memoryview], bool]
"""``holds(first_slot, data)``: whether consecutive stored pages from ``first_slot``
on are exactly ``data`` (whole pages)."""

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


def predicted_runs(count: int, anchor_slots: Sequence[int | None], end: int) -> list[Run]:
    """The slots predicted for a load of ``count`` pages whose anchors (pages 0,
    :data:`ANCHOR_EVERY`, ...) the index found at ``anchor_slots`` (None: not found),
    as runs below slot ``end``.

    An anchor found at slot ``s`` predicts the pages after it, up to the next anchor
    found, at ``s + 1, s + 2, ...``; pages before the first anchor found get none.
    Predictions that continue each other (an image stored in one piece) make one
    run, of at most :data:`COMPARE_RUN` pages."""
    found: list[Run] = []
    base: int | None = None  # slot - page, from the last anchor found
    for position, anchor_slot in enumerate(anchor_slots):
        page = position * ANCHOR_EVERY
        if anchor_slot is not None:
            base = anchor_slot - page
        if base is None:
            continue
        length = min(ANCHOR_EVERY, count - page, end - (base + page))
        if length <= 0:
            continue
        if found:
            last_page, last_slot, last_length = found[-1]
            if (
                last_page + last_length == page
                and last_slot + last_length == base + page
                and last_length + length <= COMPARE_RUN
            ):
                found[-1] = (last_page, last_slot, last_length + length)
                continue
        found.append((page, base + page, length))
    return found


def matching_runs(holds: SlotComparer, data: memoryview, runs: Sequence[Run]) -> list[Run]:
    """The parts of ``runs`` whose stored pages hold exactly their part of ``data``.

    Each run is compared at once; one that differs somewhere is compared again
    :data:`ANCHOR_EVERY` pages at a time (the pages of a part that differs are left
    to be found by their hashes)."""
    matched: list[Run] = []
    for page, slot, length in runs:
        if holds(slot, data[page * PAGE_SIZE : (page + length) * PAGE_SIZE]):
            matched.append((page, slot, length))
            continue
        if length <= ANCHOR_EVERY:
            continue
        for offset in range(0, length, ANCHOR_EVERY):
            size = min(ANCHOR_EVERY, length - offset)
            part = data[(page + offset) * PAGE_SIZE : (page + offset + size) * PAGE_SIZE]
            if holds(slot + offset, part):
                matched.append((page + offset, slot + offset, size))
    return matched


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
