"""Slot runs and count increments computed a run at a time give exactly what an
element-by-element loop gives, and refuse values that would carry into the next."""

from __future__ import annotations

import array
import random

import pytest

from dksm.dedup import slot_arrays


@pytest.mark.parametrize("count", [0, 1, 2, 31, 32, 512, 4096, 5000])
def test_a_run_of_slots_counts_up_from_its_first(count: int) -> None:
    for first in (0, 1, 511, 2**40 + 3):
        assert slot_arrays.consecutive(first, count) == array.array(
            "q", range(first, first + count)
        )


def test_counts_each_go_up_by_one_without_touching_their_neighbours() -> None:
    rng = random.Random(7)
    counts = array.array("Q", [rng.choice([1, 2, 255, 256, 2**32 - 1, 2**62]) for _ in range(700)])
    assert slot_arrays.plus_one(counts) == array.array("Q", [n + 1 for n in counts])
    assert slot_arrays.plus_one(array.array("Q")) == array.array("Q")


def test_values_that_could_carry_are_refused() -> None:
    with pytest.raises(ValueError, match="63 bits"):
        slot_arrays.plus_one(array.array("Q", [1, 2**63, 1]))
    with pytest.raises(ValueError, match="63 bits"):
        slot_arrays.consecutive(2**63 - 2, 4)


@pytest.mark.parametrize("count", [1, 2, 63, 512, 700])
def test_the_first_zero_is_found_wherever_it_lies(count: int) -> None:
    rng = random.Random(count)
    values = [1, 2, 255, 256, 2**32, 2**56, 2**62, 2**63, 2**64 - 1]
    for _ in range(40):
        counts = array.array("Q", [rng.choice(values) for _ in range(count)])
        expected = -1
        if rng.random() < 0.8:
            expected = rng.randrange(count)
            counts[expected] = 0
            for later in range(expected + 1, count):
                if rng.random() < 0.3:
                    counts[later] = 0
        assert slot_arrays.first_zero(counts) == expected
    assert slot_arrays.first_zero(array.array("Q")) == -1
    assert slot_arrays.first_zero(array.array("Q", [0] * count)) == 0


def test_counts_raised_in_use_say_where_the_first_zero_was() -> None:
    counts = array.array("Q", [3, 1, 7, 2**62])
    assert slot_arrays.plus_one_in_use(counts) == (array.array("Q", [4, 2, 8, 2**62 + 1]), -1)
    counts[2] = 0
    counts[3] = 0
    assert slot_arrays.plus_one_in_use(counts)[1] == 2
    assert slot_arrays.plus_one_in_use(array.array("Q")) == (array.array("Q"), -1)
    with pytest.raises(ValueError, match="63 bits"):
        slot_arrays.plus_one_in_use(array.array("Q", [2**63]))
