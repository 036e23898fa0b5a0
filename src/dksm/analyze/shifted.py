"""Why identical code is not shared: byte runs two images both hold, at addresses that
differ by something other than a multiple of the page size.

The pool compares whole pages, so the same library linked at ``0x100084`` in one
image and ``0x100024`` in another shares nothing: every page holds a different
slice of it.  This module finds such runs by content, not by page:

1. **Anchors.**  Every image's read-only file bytes are cut into ``WINDOW``-byte
   blocks at offsets that are multiples of ``WINDOW``; each block is a key in one
   dictionary (blocks of a single repeated byte, and blocks that repeat more than
   ``MAX_REPEATS`` times in one image, are left out: they match everywhere and
   explain nothing).
2. **Probes.**  For every other image, the ``WINDOW`` bytes at *every* offset are
   looked up.  Any common run of at least ``2 * WINDOW - 1`` bytes contains a whole
   anchor block, so it is found whatever its shift.
3. **Runs.**  Each hit is extended byte by byte in both directions to the maximal
   common run; later hits inside a run already found (same pair, same shift) are
   skipped, so the work is one dictionary probe per byte plus one extension per run
   (about 0.1 to 0.2 s per ~500 KiB image, whatever the number of images).  Padding (bytes
   repeating with a short period: zeros, nop fill) is cut off both ends of a run:
   padding meets padding anywhere.  A shifted run whose bytes the two images already have in
   common in place (at the same address, or in a page shared by content) is
   dropped: it is similar code repeated, not code that moved.
4. **Regions.**  Relocated references break a shifted copy into many runs: a call
   or a RIP-relative load of something that moved by another amount holds other
   bytes, and a table of absolute pointers (function tables in ``.rodata``)
   differs in every 8-byte entry for hundreds of bytes.  Runs with the same shift
   separated by at most ``MAX_GAP`` bytes are joined into one region; a region
   counts only if its runs cover at least ``MIN_MATCHED`` of it.  Its differences
   are taken to be addresses that changed *because* of the shift, and that would
   match if the images were aligned.
5. **Pages if aligned.**  A region with a shift that is not a multiple of the page
   size would give the whole pages of the first image that it covers if the second
   image placed it at the same page offset.  Per pair, the union of those pages,
   minus pages already shared by content, is the saving that alignment offers: an
   estimate (close when the differences are indeed relocations, as in the guest
   kit's ``naive`` layout, an upper bound otherwise).

Shifts that are a non-zero multiple of the page size are reported too, with no
saving: content addressing already shares their whole pages wherever they lie.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from dksm.analyze.pages import ImagePages
from dksm.loader.segment import PAGE_SIZE

WINDOW = 16
MAX_REPEATS = 4
MAX_GAP = 2048
# A region counts (pages if aligned, listing) only if its runs cover this much of it:
# chance runs of one shift far apart do not make a moved copy.
MIN_MATCHED = 0.5
# Runs shorter than this are as often chance matches (a common instruction sequence)
# as shared code: they join regions but are not counted as runs on their own.
MIN_RUN = 32
# Regions shorter than this are left out of the listed regions (not of the totals).
MIN_REGION = 256
# Padding repeats with a short period: zeros or 0xcc (period 1), gcc's multi-byte
# nops between functions (``66 2e 0f 1f 84 00 00 00 00 00``, period 10).
MAX_PADDING_PERIOD = 16


@dataclass(frozen=True)
class Run:
    """A maximal byte run image ``a`` holds at ``a_addr`` and image ``b`` at ``b_addr``."""

    a_addr: int
    b_addr: int
    length: int

    @property
    def delta(self) -> int:
        return self.b_addr - self.a_addr


@dataclass(frozen=True)
class Region:
    """Runs with one shift, joined across short differences (see the module docstring)."""

    a_addr: int
    b_addr: int
    length: int
    matched: int  # bytes inside the runs (the rest are the bridged differences)
    runs: int
    pages_if_aligned: int  # whole pages of image a inside the region (0 if page-aligned shift)

    @property
    def delta(self) -> int:
        return self.b_addr - self.a_addr

    @property
    def delta_mod_page(self) -> int:
        return self.delta % PAGE_SIZE

    def a_pages(self) -> range:
        """The whole pages of image a inside the region."""
        first = (self.a_addr + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        last = (self.a_addr + self.length) & ~(PAGE_SIZE - 1)
        return range(first, max(first, last), PAGE_SIZE)

    def b_pages(self) -> range:
        first = (self.b_addr + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        last = (self.b_addr + self.length) & ~(PAGE_SIZE - 1)
        return range(first, max(first, last), PAGE_SIZE)


@dataclass(frozen=True)
class PairShifts:
    """What images ``a`` and ``b`` hold in common at shifted addresses."""

    a: str
    b: str
    a_index: int  # positions of a and b in the images analysed
    b_index: int
    runs: int  # shifted runs of at least MIN_RUN bytes
    run_bytes: int
    regions: tuple[Region, ...]  # every region, longest first
    pages_if_aligned: int  # pages of a that aligning would share, not shared already
    aligned_common_bytes: int  # bytes common at the same address (delta 0), for contrast

    def listed_regions(self) -> list[Region]:
        return [
            r
            for r in self.regions
            if r.length >= MIN_REGION and r.matched >= MIN_MATCHED * r.length
        ]


class _Intervals:
    """A union of address intervals, asked whether it covers a range."""

    def __init__(self, intervals: list[tuple[int, int]]) -> None:
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(intervals):
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        self._starts = [lo for lo, _ in merged]
        self._merged = merged

    def covers(self, lo: int, hi: int) -> bool:
        k = bisect.bisect_right(self._starts, lo) - 1
        return k >= 0 and self._merged[k][1] >= hi


_Block = tuple[int, bytes]  # guest address, file bytes of one read-only segment


def _readonly_blocks(image: ImagePages) -> list[_Block]:
    return [(s.guest_addr, s.data) for s in image.image.segments if not s.writable and s.data]


def _forward(a: bytes, i: int, b: bytes, j: int) -> int:
    """How many bytes a[i:] and b[j:] have in common from their start."""
    limit = min(len(a) - i, len(b) - j)
    n = 0
    for step in (4096, 256, 16, 1):
        while n + step <= limit and a[i + n : i + n + step] == b[j + n : j + n + step]:
            n += step
    return n


def _backward(a: bytes, i: int, b: bytes, j: int) -> int:
    """How many bytes a[:i] and b[:j] have in common at their end."""
    limit = min(i, j)
    n = 0
    for step in (4096, 256, 16, 1):
        while n + step <= limit and a[i - n - step : i - n] == b[j - n - step : j - n]:
            n += step
    return n


def _anchor_index(blocks: Sequence[Sequence[_Block]]) -> dict[bytes, list[tuple[int, int, int]]]:
    """Aligned WINDOW-byte blocks -> where they are: (image, block, offset), images in order."""
    index: dict[bytes, list[tuple[int, int, int]]] = {}
    for image_no, image_blocks in enumerate(blocks):
        local: dict[bytes, list[tuple[int, int]]] = {}
        for block_no, (_addr, data) in enumerate(image_blocks):
            for offset in range(0, len(data) - WINDOW + 1, WINDOW):
                window = data[offset : offset + WINDOW]
                if window.count(window[:1]) == WINDOW:
                    continue  # one repeated byte (padding, zeros): matches everywhere
                local.setdefault(window, []).append((block_no, offset))
        for window, where in local.items():
            if len(where) <= MAX_REPEATS:
                index.setdefault(window, []).extend((image_no, bn, off) for bn, off in where)
    return index


def find_runs(images: Sequence[ImagePages]) -> dict[tuple[int, int], list[Run]]:
    """Maximal common runs (at least WINDOW bytes, any shift including none) of every
    pair of images (i, j), i < j, found as the module docstring describes."""
    blocks = [_readonly_blocks(img) for img in images]
    index = _anchor_index(blocks)
    get = index.get
    runs: dict[tuple[int, int], list[Run]] = {
        (i, j): [] for j in range(len(images)) for i in range(j)
    }
    for b_no in range(1, len(images)):
        for b_addr, b_data in blocks[b_no]:
            # (image a, block of a, offset shift) -> end in b_data of the last run found
            last_end: dict[tuple[int, int, int], int] = {}
            # image a -> end in b_data of the last run found at the same address in a
            in_place_end: dict[int, int] = {}
            for j in range(len(b_data) - WINDOW + 1):
                where = get(b_data[j : j + WINDOW])
                if where is None:
                    continue
                for a_no, a_block, a_off in where:
                    if a_no >= b_no:
                        break  # entries are in image order: only earlier images pair with b
                    key = (a_no, a_block, j - a_off)
                    if j < last_end.get(key, -1):
                        continue  # inside a run of this shift already found
                    a_addr, a_data = blocks[a_no][a_block]
                    in_place = a_addr + a_off == b_addr + j
                    if not in_place and j < in_place_end.get(a_no, -1):
                        # b holds these bytes where a does: a shifted match is the same
                        # code repeated elsewhere (dropped by shifted_pairs anyway).
                        continue
                    back = _backward(a_data, a_off, b_data, j)
                    length = back + WINDOW + _forward(a_data, a_off + WINDOW, b_data, j + WINDOW)
                    last_end[key] = j - back + length
                    if in_place:
                        in_place_end[a_no] = j - back + length
                    head, length = _trim_padding(a_data, a_off - back, length)
                    if length >= WINDOW:
                        runs[(a_no, b_no)].append(
                            Run(a_addr + a_off - back + head, b_addr + j - back + head, length)
                        )
    return runs


def _periodic_length(run: bytes, *, at_end: bool) -> int:
    """Length of the longest prefix (or suffix) of ``run`` that repeats with a period
    of at most MAX_PADDING_PERIOD bytes."""
    n = len(run)

    def periodic(length: int, p: int) -> bool:
        if at_end:
            return run[n - length : n - p] == run[n - length + p : n]
        return run[: length - p] == run[p:length]

    # Most runs end in code or data: rule padding out on the last 2 * WINDOW bytes.
    probe = 2 * WINDOW
    if n < probe:
        return 0
    edge = run[n - probe :] if at_end else run[:probe]
    periods = [p for p in range(1, MAX_PADDING_PERIOD + 1) if edge[: probe - p] == edge[p:]]
    best = 0
    for p in periods:
        good, length = p, 2 * p  # any p bytes are trivially p-periodic
        while length <= n and periodic(length, p):
            good, length = length, 2 * length
        bad = min(length, n + 1)
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if periodic(mid, p) else (good, mid)
        best = max(best, good)
    return best


def _trim_padding(data: bytes, start: int, length: int) -> tuple[int, int]:
    """Cut padding (at least 2 * WINDOW bytes repeating with a short period) off either
    end of a run: padding meets padding anywhere, and would make a run of a few
    common bytes look like kilobytes.  Returns (bytes cut at the head, new length)."""
    run = data[start : start + length]
    head = _periodic_length(run, at_end=False)
    if head < 2 * WINDOW:
        head = 0
    run = run[head:]
    tail = _periodic_length(run, at_end=True)
    if tail < 2 * WINDOW:
        tail = 0
    return head, len(run) - tail


def regions_of(runs: Sequence[Run]) -> list[Region]:
    """Join runs of one shift across differences of at most MAX_GAP bytes."""
    by_delta: dict[int, list[Run]] = {}
    for run in runs:
        by_delta.setdefault(run.delta, []).append(run)
    regions: list[Region] = []
    for delta, group in by_delta.items():
        group.sort(key=lambda r: r.a_addr)
        start = group[0].a_addr
        end = group[0].a_addr + group[0].length
        matched, count = group[0].length, 1
        for run in group[1:]:
            if run.a_addr - end <= MAX_GAP:
                end = max(end, run.a_addr + run.length)
                matched += run.length
                count += 1
                continue
            regions.append(_region(start, delta, end - start, matched, count))
            start, end, matched, count = run.a_addr, run.a_addr + run.length, run.length, 1
        regions.append(_region(start, delta, end - start, matched, count))
    regions.sort(key=lambda r: (-r.length, r.a_addr))
    return regions


def _region(a_addr: int, delta: int, length: int, matched: int, runs: int) -> Region:
    region = Region(a_addr, a_addr + delta, length, matched, runs, 0)
    if delta % PAGE_SIZE == 0 or matched < MIN_MATCHED * length:
        return region
    return Region(a_addr, a_addr + delta, length, matched, runs, len(region.a_pages()))


def shifted_pairs(
    images: Sequence[ImagePages], all_runs: dict[tuple[int, int], list[Run]] | None = None
) -> list[PairShifts]:
    """For each pair of images, the shifted runs and regions and what aligning saves
    (``all_runs``: :func:`find_runs` of ``images``, if already at hand)."""
    result: list[PairShifts] = []
    if all_runs is None:
        all_runs = find_runs(images)
    for (i, j), runs in sorted(all_runs.items()):
        a, b = images[i], images[j]
        aligned = [r for r in runs if r.delta == 0]
        a_contents, b_contents = a.shareable_contents(), b.shareable_contents()
        already = {p.addr for p in a.shareable if p.content in b_contents}
        # A shifted run whose bytes the two images already have in common where they
        # are (same address, or a page shared by content) is the same code repeated
        # elsewhere (similar functions), not code that moved: it explains nothing.
        common_a = _Intervals(
            [(r.a_addr, r.a_addr + r.length) for r in aligned]
            + [(addr, addr + PAGE_SIZE) for addr in already]
        )
        common_b = _Intervals(
            [(r.b_addr, r.b_addr + r.length) for r in aligned]
            + [(p.addr, p.addr + PAGE_SIZE) for p in b.shareable if p.content in a_contents]
        )
        shifted = [
            r
            for r in runs
            if r.delta != 0
            and not common_a.covers(r.a_addr, r.a_addr + r.length)
            and not common_b.covers(r.b_addr, r.b_addr + r.length)
        ]
        regions = regions_of(shifted) if shifted else []
        counted = [r for r in shifted if r.length >= MIN_RUN]
        # Pages of a that aligning would share: inside a region whose shift is not a
        # page multiple, and not already shared with b by content.
        gain: set[int] = set()
        for region in regions:
            if region.pages_if_aligned:
                gain.update(region.a_pages())
        result.append(
            PairShifts(
                a=a.label,
                b=b.label,
                a_index=i,
                b_index=j,
                runs=len(counted),
                run_bytes=sum(r.length for r in counted),
                regions=tuple(regions),
                pages_if_aligned=len(gain - already),
                aligned_common_bytes=sum(r.length for r in aligned),
            )
        )
    return result
