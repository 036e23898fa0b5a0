"""Admission alone: which pages of a load the pool holds and which it stores, decided
on bytes (a hash match is only a candidate), without an index or a file."""

from __future__ import annotations

from dksm.dedup import admission
from dksm.memory.host_mapping import PAGE_SIZE

NONE = admission.NO_SLOT_NUMBER


def _pages(*fills: int) -> memoryview:
    return memoryview(b"".join(bytes([fill % 256]) * PAGE_SIZE for fill in fills))


class StoredPages:
    """Slots holding pages, compared as the pages file compares them; counts the
    comparisons (first slot, pages)."""

    def __init__(self, *fills: int) -> None:
        self.data = bytes(_pages(*fills))
        self.reads: list[tuple[int, int]] = []

    def read(self, first: int, data: memoryview) -> bool:
        count = len(data) // PAGE_SIZE
        self.reads.append((first, count))
        return self.data[first * PAGE_SIZE : (first + count) * PAGE_SIZE] == data.tobytes()


def test_runs_group_consecutive_slots() -> None:
    assert admission.runs([]) == []
    assert admission.runs([3, 4, 5, 9, 11, 12]) == [(3, 3), (9, 1), (11, 2)]


def test_confirm_accepts_candidates_whose_bytes_match_and_reads_a_run_at_once() -> None:
    stored = StoredPages(1, 2, 3, 4)
    slots, mismatched = admission.confirm(stored.read, _pages(2, 3, 4), [1, 2, 3])
    assert (slots, mismatched) == ([1, 2, 3], [])
    assert stored.reads == [(1, 3)]


def test_confirm_rejects_a_hash_match_with_other_bytes() -> None:
    stored = StoredPages(1, 2, 3)
    slots, mismatched = admission.confirm(stored.read, _pages(1, 9, 3), [0, 1, 2])
    assert (slots, mismatched) == ([0, -1, 2], [1])


def test_confirm_leaves_pages_without_candidates_unplaced() -> None:
    stored = StoredPages(1)
    slots, mismatched = admission.confirm(stored.read, _pages(7, 1), [NONE, 0])
    assert (slots, mismatched) == ([-1, 0], [])
    assert stored.reads == [(0, 1)]


def test_confirm_reads_at_most_a_compare_run_at_a_time() -> None:
    count = admission.COMPARE_RUN + 3
    stored = StoredPages(*range(count))
    slots, _ = admission.confirm(stored.read, _pages(*range(count)), list(range(count)))
    assert slots == list(range(count))
    assert stored.reads == [(0, admission.COMPARE_RUN), (admission.COMPARE_RUN, 3)]


def test_find_equal_returns_the_slot_with_the_same_bytes() -> None:
    stored = StoredPages(5, 6, 7)
    data = _pages(0, 7)
    assert admission.find_equal(stored.read, data, 1, [0, 1, 2]) == 2
    assert admission.find_equal(stored.read, data, 0, [0, 1, 2]) is None


def test_new_pages_are_stored_once_and_twins_point_at_them() -> None:
    data = _pages(1, 2, 1, 3, 2)
    keys = [b"a", b"b", b"a", b"c", b"b"]
    slots = [-1, -1, -1, -1, -1]
    collided: set[int] = set()
    fresh = admission.distinct_new_pages(data, keys, slots, collided)
    assert fresh == [0, 1, 3]
    assert slots == [-1, -1, -2, -1, -3]  # page 2 is fresh[0]'s twin, page 4 fresh[1]'s
    assert collided == set()
    admission.place_new_pages(slots, fresh, 40)
    assert slots == [40, 41, 40, 42, 41]


def test_equal_hashes_with_other_bytes_are_both_stored_and_counted() -> None:
    data = _pages(1, 2)
    slots = [-1, -1]
    collided: set[int] = set()
    fresh = admission.distinct_new_pages(data, [b"h", b"h"], slots, collided)
    assert fresh == [0, 1]
    assert collided == {1}


def test_pages_already_placed_are_not_stored() -> None:
    data = _pages(1, 2, 3)
    slots = [7, -1, 8]
    fresh = admission.distinct_new_pages(data, [b"a", b"b", b"c"], slots, set())
    assert fresh == [1]
    admission.place_new_pages(slots, fresh, 20)
    assert slots == [7, 20, 8]


class Index:
    """Anchors' slots and slots in use, as the index would answer; records which
    pages were looked up as anchors."""

    def __init__(self, anchors: dict[int, int], in_use: range) -> None:
        self.anchors = anchors
        self.in_use_slots = in_use
        self.looked_up: list[int] = []

    def anchor_slot(self, page: int) -> int | None:
        self.looked_up.append(page)
        return self.anchors.get(page)

    def in_use(self, first: int, length: int) -> int:
        done = 0
        while done < length and first + done in self.in_use_slots:
            done += 1
        return done


def test_a_load_held_in_one_piece_takes_one_anchor() -> None:
    count = admission.COMPARE_RUN + 100
    stored = StoredPages(*[n + 7 for n in range(count + 20)])  # the load at slot 20
    index = Index({0: 20}, range(count + 20))
    data = _pages(*[n + 27 for n in range(count)])
    matched = admission.matched_predictions(
        data, index.anchor_slot, index.in_use, stored.read, count + 20
    )
    assert matched == [
        (0, 20, admission.COMPARE_RUN),
        (admission.COMPARE_RUN, 20 + admission.COMPARE_RUN, 100),
    ]
    assert index.looked_up == [0]
    assert stored.reads == [(20, admission.COMPARE_RUN), (20 + admission.COMPARE_RUN, 100)]


def test_a_run_that_differs_is_matched_up_to_the_part_that_differs_then_anchored_again() -> None:
    every = admission.ANCHOR_EVERY
    count = 4 * every
    stored = StoredPages(*range(count))
    wanted = list(range(count))
    wanted[every + 1] = 10_000  # one page in the second span differs
    index = Index({0: 0, 2 * every: 2 * every}, range(count))
    matched = admission.matched_predictions(
        _pages(*wanted), index.anchor_slot, index.in_use, stored.read, count
    )
    assert matched == [(0, 0, every), (2 * every, 2 * every, 2 * every)]
    assert index.looked_up == [0, 2 * every]
    assert stored.reads == [(0, count), (0, every), (every, every), (2 * every, 2 * every)]


def test_pages_before_an_anchor_found_and_slots_not_in_use_get_no_prediction() -> None:
    every = admission.ANCHOR_EVERY
    count = 4 * every
    stored = StoredPages(*range(count))
    # Anchors from page every on are found; slot every + 3 is free (its page punched).
    index = Index({every: every, 2 * every: 2 * every, 3 * every: 3 * every}, range(count))
    index.in_use_slots = range(every + 3)  # and nothing after it is in use either
    matched = admission.matched_predictions(
        _pages(*range(count)), index.anchor_slot, index.in_use, stored.read, count
    )
    assert matched == [(every, every, 3)]
    assert index.looked_up == [0, every, 2 * every, 3 * every]
    index = Index({0: 0}, range(count))
    assert admission.matched_predictions(
        _pages(*range(count)), index.anchor_slot, index.in_use, stored.read, every + 5
    ) == [(0, 0, every + 5)]  # clipped at the end
