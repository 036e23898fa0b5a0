"""Across images: which read-only pages the pool would share, and what each page holds.

The pool is content-addressed, so two images share a page when both have a
shareable page with the same bytes, at whatever addresses.  The pairwise matrix
counts distinct shared contents; the diagonal is each image's own number of
distinct shareable contents (what one image alone puts in the pool).

Every loaded page then gets a status that says why it is or is not shared with the
other images analysed:

``shared``
    shareable, and another image has a shareable page with the same bytes.
``shifted``
    shareable, not shared, but wholly inside a region of bytes another image holds
    at a shift that is not a page multiple (:mod:`dksm.analyze.shifted`): aligning
    the two images would share it.
``partly common``
    shareable, not shared, and some of its bytes are found in another image (a run
    of at least ``shifted.MIN_RUN`` bytes, shifted or not): the page mixes common
    and own content, or its common content is split by differences too long to be
    relocations.
``own``
    shareable, and none of its bytes found in another image: this image's own
    content (still shared by every instance of the image).
``partial`` and ``writable``
    not shareable at all (see :class:`dksm.analyze.pages.PageClass`): copied into
    every instance.

Each page is also attributed to the ELF sections and the function and object
symbols that overlap it, so that a summary can say what is, and is not, shared.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from dksm.analyze.pages import ImagePages, PageClass
from dksm.analyze.shifted import MIN_RUN, PairShifts, Run
from dksm.loader.segment import PAGE_SIZE


class PageStatus(enum.Enum):
    """Why a loaded page is, or is not, shared with the other images (module docstring)."""

    SHARED = "shared"
    SHIFTED = "shifted"
    PARTLY_COMMON = "partly common"
    OWN = "own"
    PARTIAL = "partial"
    WRITABLE = "writable"

    @property
    def shareable(self) -> bool:
        return self not in (PageStatus.PARTIAL, PageStatus.WRITABLE)


@dataclass(frozen=True)
class SharingMatrix:
    """Distinct shareable contents each pair of images has in common."""

    labels: tuple[str, ...]
    shared: tuple[tuple[int, ...], ...]  # [i][j]: common distinct contents; [i][i]: image i's
    same_address: tuple[tuple[int, ...], ...]  # [i][j]: of those, at the same address in both
    distinct_shareable: int  # distinct shareable contents over all images


@dataclass(frozen=True)
class PageReport:
    """One loaded page of one image: its class, its status, what it holds."""

    addr: int
    cls: PageClass
    status: PageStatus
    sections: tuple[str, ...]
    symbols: tuple[tuple[str, int], ...]  # (name, bytes in this page), largest first
    common_bytes: int  # bytes of the page found in another image (runs >= MIN_RUN)
    zero: bool


def sharing_matrix(images: Sequence[ImagePages]) -> SharingMatrix:
    contents = [img.shareable_contents() for img in images]
    at = [{p.addr: p.content for p in img.shareable} for img in images]
    n = len(images)
    shared = [[len(contents[i] & contents[j]) for j in range(n)] for i in range(n)]
    same = [
        [sum(1 for addr, c in at[i].items() if at[j].get(addr) == c) for j in range(n)]
        for i in range(n)
    ]
    union: set[bytes] = set().union(*contents) if contents else set()
    return SharingMatrix(
        labels=tuple(img.label for img in images),
        shared=tuple(tuple(row) for row in shared),
        same_address=tuple(tuple(row) for row in same),
        distinct_shareable=len(union),
    )


def _merged(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    intervals.sort()
    out: list[tuple[int, int]] = []
    for lo, hi in intervals:
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _coverage(intervals: list[tuple[int, int]]) -> dict[int, int]:
    """Page address -> bytes of the page inside the union of ``intervals``."""
    covered: dict[int, int] = {}
    for lo, hi in _merged(intervals):
        for page in range(lo & ~(PAGE_SIZE - 1), hi, PAGE_SIZE):
            inside = min(hi, page + PAGE_SIZE) - max(lo, page)
            covered[page] = covered.get(page, 0) + inside
    return covered


def page_reports(
    images: Sequence[ImagePages],
    runs: dict[tuple[int, int], list[Run]],
    shifts: Sequence[PairShifts],
) -> list[list[PageReport]]:
    """The loaded pages of each image with their status and labels (same order)."""
    n = len(images)
    contents = [img.shareable_contents() for img in images]
    # Runs in each image's own coordinates, and pages inside shifted regions.
    intervals: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for (i, j), pair_runs in runs.items():
        for run in pair_runs:
            if run.length >= MIN_RUN:
                intervals[i].append((run.a_addr, run.a_addr + run.length))
                intervals[j].append((run.b_addr, run.b_addr + run.length))
    shifted_pages: list[set[int]] = [set() for _ in range(n)]
    for pair in shifts:
        a, b = pair.a_index, pair.b_index
        for region in pair.regions:
            if region.pages_if_aligned:
                shifted_pages[a].update(region.a_pages())
                shifted_pages[b].update(region.b_pages())
    reports: list[list[PageReport]] = []
    for k, img in enumerate(images):
        others: set[bytes] = set().union(*(contents[m] for m in range(n) if m != k))
        covered = _coverage(intervals[k])
        by_page = img.symbols_by_page()
        rows: list[PageReport] = []
        for page in img.loaded:
            common = covered.get(page.addr, 0)
            if page.cls is PageClass.PARTIAL:
                status = PageStatus.PARTIAL
            elif page.cls is PageClass.WRITABLE:
                status = PageStatus.WRITABLE
            elif page.content in others:
                status = PageStatus.SHARED
            elif page.addr in shifted_pages[k]:
                status = PageStatus.SHIFTED
            elif common:
                status = PageStatus.PARTLY_COMMON
            else:
                status = PageStatus.OWN
            rows.append(
                PageReport(
                    addr=page.addr,
                    cls=page.cls,
                    status=status,
                    sections=page.sections,
                    symbols=tuple((s.name, nbytes) for s, nbytes in by_page.get(page.addr, [])),
                    common_bytes=common,
                    zero=page.is_zero,
                )
            )
        reports.append(rows)
    return reports


@dataclass(frozen=True)
class SectionSummary:
    """Loaded pages overlapping one section, by status."""

    name: str
    pages: int
    by_status: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class SymbolSummary:
    """Bytes of one symbol in pages that are not shared, and their statuses."""

    name: str
    bytes: int
    pages: int
    statuses: tuple[str, ...]


def section_summaries(rows: Sequence[PageReport]) -> list[SectionSummary]:
    """Per section, in address order of first appearance; a page overlapping two
    sections counts in both, and pages in no section under ``(none)``."""
    counts: dict[str, dict[PageStatus, int]] = {}
    for row in rows:
        for name in row.sections or ("(none)",):
            per = counts.setdefault(name, {})
            per[row.status] = per.get(row.status, 0) + 1
    return [
        SectionSummary(
            name=name,
            pages=sum(per.values()),
            by_status=tuple((s.value, per[s]) for s in PageStatus if s in per),
        )
        for name, per in counts.items()
    ]


def unshared_symbols(rows: Sequence[PageReport], top: int) -> list[SymbolSummary]:
    """The symbols with most bytes in shareable pages not shared with another image
    (writable and partial pages are never shared: the section summary counts them)."""
    total: dict[str, int] = {}
    pages: dict[str, int] = {}
    statuses: dict[str, set[str]] = {}
    for row in rows:
        if row.status is PageStatus.SHARED or not row.status.shareable:
            continue
        for name, nbytes in row.symbols:
            total[name] = total.get(name, 0) + nbytes
            pages[name] = pages.get(name, 0) + 1
            statuses.setdefault(name, set()).add(row.status.value)
    ranked = sorted(total, key=lambda name: (-total[name], name))[:top]
    return [
        SymbolSummary(name, total[name], pages[name], tuple(sorted(statuses[name])))
        for name in ranked
    ]
