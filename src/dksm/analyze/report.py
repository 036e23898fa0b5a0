"""An :class:`~dksm.analyze.analysis.Analysis` for people and for programs: rich tables
on the terminal, a JSON document, and a heatmap of the pairwise sharing matrix.

Renderers only format; every number comes from the analysis, so the table, the JSON
and the plot always agree.  rich and matplotlib are imported inside the functions
that need them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dksm.analyze.analysis import Analysis
from dksm.analyze.pages import PageClass
from dksm.analyze.sharing import PageStatus, section_summaries, unshared_symbols
from dksm.analyze.shifted import MIN_MATCHED, PairShifts, Region
from dksm.loader.segment import PAGE_SIZE

KIB = 1024
JSON_FORMAT = 1


def signed_hex(value: int) -> str:
    return f"-{-value:#x}" if value < 0 else f"+{value:#x}"


def _main_shifts(pair: PairShifts, count: int = 2) -> list[tuple[int, int, int]]:
    """The shifts of most bytes in regions that count (their runs cover at least
    MIN_MATCHED of them): (delta, bytes, pages if aligned), largest first."""
    by_delta: dict[int, list[Region]] = {}
    for region in pair.regions:
        if region.matched >= MIN_MATCHED * region.length:
            by_delta.setdefault(region.delta, []).append(region)
    ranked = sorted(by_delta.items(), key=lambda kv: (-sum(r.length for r in kv[1]), abs(kv[0])))
    return [
        (delta, sum(r.length for r in regions), sum(r.pages_if_aligned for r in regions))
        for delta, regions in ranked[:count]
    ]


def _status_counts(analysis: Analysis, k: int) -> dict[PageStatus, int]:
    counts = dict.fromkeys(PageStatus, 0)
    for row in analysis.pages[k]:
        counts[row.status] += 1
    return counts


# -- JSON ---------------------------------------------------------------------------


def _region_json(region: Region) -> dict[str, object]:
    return {
        "a_addr": region.a_addr,
        "b_addr": region.b_addr,
        "length": region.length,
        "matched_bytes": region.matched,
        "runs": region.runs,
        "delta": region.delta,
        "delta_mod_page": region.delta_mod_page,
        "pages_if_aligned": region.pages_if_aligned,
    }


def to_json(analysis: Analysis, top: int = 10) -> dict[str, Any]:
    """Everything the analysis found; per-page detail included, regions and symbols
    cut to ``top`` per pair or image (their totals are not)."""
    images: list[dict[str, Any]] = []
    for k, img in enumerate(analysis.images):
        rows = analysis.pages[k]
        images.append(
            {
                "label": img.label,
                "path": img.path,
                "entry": img.image.entry,
                "segments": [
                    {
                        "addr": s.guest_addr,
                        "file_bytes": len(s.data),
                        "mem_size": s.mem_size,
                        "writable": s.writable,
                        "executable": s.executable,
                    }
                    for s in img.image.segments
                ],
                "pages": {c.value: img.count(c) for c in PageClass}
                | {"loaded": len(img.loaded), "distinct_shareable": len(img.shareable_contents())},
                "status": {s.value: n for s, n in _status_counts(analysis, k).items()},
                "sections": [
                    {"name": s.name, "pages": s.pages, "status": dict(s.by_status)}
                    for s in section_summaries(rows)
                ],
                "unshared_symbols": [
                    {"name": s.name, "bytes": s.bytes, "pages": s.pages, "status": list(s.statuses)}
                    for s in unshared_symbols(rows, top)
                ],
                "page_list": [
                    {
                        "addr": r.addr,
                        "class": r.cls.value,
                        "status": r.status.value,
                        "zero": r.zero,
                        "common_bytes": r.common_bytes,
                        "sections": list(r.sections),
                        "symbols": [name for name, _ in r.symbols],
                    }
                    for r in rows
                ],
                "notes": list(img.notes),
            }
        )
    m = analysis.matrix
    return {
        "format": JSON_FORMAT,
        "page_size": PAGE_SIZE,
        "images": images,
        "sharing": {
            "labels": list(m.labels),
            "matrix": [list(row) for row in m.shared],
            "same_address": [list(row) for row in m.same_address],
            "distinct_shareable_pages": m.distinct_shareable,
        },
        "shifted": [
            {
                "a": p.a,
                "b": p.b,
                "runs": p.runs,
                "run_bytes": p.run_bytes,
                "pages_if_aligned": p.pages_if_aligned,
                "aligned_common_bytes": p.aligned_common_bytes,
                "main_shifts": [
                    {"delta": d, "delta_mod_page": d % PAGE_SIZE, "bytes": b, "pages_if_aligned": g}
                    for d, b, g in _main_shifts(p)
                ],
                "regions": [_region_json(r) for r in p.listed_regions()[:top]],
            }
            for p in analysis.shifts
        ],
        "fleet": analysis.fleet.to_json(),
    }


# -- terminal -----------------------------------------------------------------------


def _kib(pages: int) -> str:
    return f"{pages * PAGE_SIZE / KIB:,.0f}"


def _table(title: str, columns: Sequence[str], left: int = 1) -> Any:
    """A compact rich table; the first ``left`` columns are text, the rest numbers."""
    from rich import box
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for k, col in enumerate(columns):
        # Headers wrap at spaces, never cut inside a word.
        width = max((len(word) for word in col.split()), default=0)
        t.add_column(col, justify="left" if k < left else "right", min_width=width)
    return t


# Cells longer than this may wrap (free text); shorter ones keep their line.
_MAX_KEPT_CELL = 24


def _show(console: Any, t: Any) -> None:
    """Print ``t`` with every short cell on one line (labels and numbers are never
    cut), and its title and caption as lines of their own, as wide as the console
    rather than as the table."""
    from rich.text import Text

    for col in t.columns:
        longest = max((len(str(cell)) for cell in col.cells), default=0)
        if longest <= _MAX_KEPT_CELL:
            col.min_width = max(col.min_width or 0, longest)
    title, caption = t.title, t.caption
    t.title = t.caption = None
    if title:
        console.print(Text(str(title), style="bold"))
    console.print(t)
    if caption:
        console.print(Text(str(caption), style="dim"))
    console.print()


def render(analysis: Analysis, console: Any, top: int = 5) -> None:
    """Print the analysis as rich tables on ``console`` (a ``rich.console.Console``)."""
    images = analysis.images
    t = _table(
        "Pages of each image, by what loading does with them",
        [
            "image",
            "loaded",
            "shareable",
            "partial",
            "writable",
            "zero-fill",
            "shared",
            "not shared",
        ],
    )
    for k, img in enumerate(images):
        counts = _status_counts(analysis, k)
        shareable = img.count(PageClass.SHAREABLE)
        t.add_row(
            img.label,
            str(len(img.loaded)),
            str(shareable),
            str(img.count(PageClass.PARTIAL)),
            str(img.count(PageClass.WRITABLE)),
            str(img.count(PageClass.ZERO_FILL)),
            str(counts[PageStatus.SHARED]),
            str(shareable - counts[PageStatus.SHARED]),
        )
    t.caption = (
        "shareable: from the pool; partial, writable: copied per instance; zero-fill: not "
        "loaded; shared: shareable with the same bytes in another image"
    )
    _show(console, t)

    m = analysis.matrix
    t = _table(
        "Identical read-only pages per pair (content-addressed, as the pool)", ["", *m.labels]
    )
    for i, label in enumerate(m.labels):
        t.add_row(label, *(str(v) for v in m.shared[i]))
    t.caption = (
        f"diagonal: the image's distinct shareable pages; "
        f"all images together: {m.distinct_shareable} distinct shareable pages"
    )
    _show(console, t)

    t = _table(
        "Loaded pages by section and status",
        ["image", "section", "pages"] + [s.value for s in PageStatus],
        2,
    )
    for k, img in enumerate(images):
        for sec in section_summaries(analysis.pages[k]):
            per = dict(sec.by_status)
            t.add_row(
                img.label,
                sec.name,
                str(sec.pages),
                *(str(per.get(x.value, "")) for x in PageStatus),
            )
    _show(console, t)

    _render_shifts(analysis, console, top)

    t = _table(
        f"Symbols with most bytes in read-only pages not shared (top {top} per image)",
        ["image", "symbol", "bytes", "pages", "status"],
        2,
    )
    for k, img in enumerate(images):
        for sym in unshared_symbols(analysis.pages[k], top):
            t.add_row(
                img.label, sym.name, f"{sym.bytes:,}", str(sym.pages), ", ".join(sym.statuses)
            )
    if t.row_count:
        _show(console, t)

    f = analysis.fleet
    fleet_desc = ", ".join(f"{n}x{label}" for label, n in f.instances if n)
    t = _table(
        f"Predicted guest-image memory of {f.vms} VMs ({fleet_desc})",
        ["mode", "pages", "KiB", "counted"],
    )
    t.columns[3].justify = "left"
    t.add_row("none", str(f.none_pages), _kib(f.none_pages), "every loaded page, per instance")
    t.add_row(
        "dksm",
        str(f.dksm_pages),
        _kib(f.dksm_pages),
        f"pool {f.hashtable_entries} (hashtable_entries) + copied {f.dksm_private_pages}",
    )
    t.add_row(
        "ksm (ideal)",
        str(f.ksm_pages),
        _kib(f.ksm_pages),
        "each distinct loaded page once, writable too",
    )
    t.caption = "pages the guests touch as they run, and the VMM processes, are not included"
    _show(console, t)
    for img in images:
        for note in img.notes:
            console.print(f"note: {img.label}: {note}")


def _where(analysis: Analysis, image: int, addr: int, length: int) -> str:
    """The sections a range of an image overlaps."""
    names = [
        s.name for s in analysis.images[image].sections if s.addr < addr + length and s.end > addr
    ]
    return ",".join(names) or "-"


def _render_shifts(analysis: Analysis, console: Any, top: int) -> None:
    pairs = [p for p in analysis.shifts if p.runs or p.pages_if_aligned]
    if not pairs:
        if len(analysis.images) > 1:
            console.print(
                "Why not shared: no byte runs common to two images at shifted addresses; "
                "the pages that are not shared hold different bytes.\n"
            )
        return
    pairs.sort(key=lambda p: (-p.pages_if_aligned, -p.run_bytes))
    shown = max(top, 10)
    t = _table(
        "Why not shared: bytes common to two images at shifted addresses",
        ["a", "b", "runs", "KiB", "main shift b-a (mod 4096)", "pages if aligned"],
        2,
    )
    for p in pairs[:shown]:
        main = _main_shifts(p, 1)
        shift = f"{signed_hex(main[0][0])} ({main[0][0] % PAGE_SIZE:#x})" if main else "-"
        t.add_row(
            p.a, p.b, str(p.runs), f"{p.run_bytes / KIB:,.1f}", shift, str(p.pages_if_aligned)
        )
    captions = [
        "runs: maximal common byte runs >= 32 bytes at another address; pages if aligned: "
        "pages of a that placing b's copy at the same page offset would share"
    ]
    if len(pairs) > shown:
        captions.append(f"{len(pairs) - shown} more pairs in --json")
    t.caption = "; ".join(captions)
    _show(console, t)

    regions = [(p, r) for p in pairs for r in p.listed_regions()]
    regions.sort(key=lambda pr: (-pr[1].pages_if_aligned, -pr[1].length))
    if not regions:
        return
    t = _table(
        f"Largest shifted regions (top {top})",
        ["a", "b", "a range", "in", "shift", "KiB", "matched", "pages if aligned"],
        4,
    )
    for p, r in regions[:top]:
        t.add_row(
            p.a,
            p.b,
            f"{r.a_addr:#x}-{r.a_addr + r.length:#x}",
            _where(analysis, p.a_index, r.a_addr, r.length),
            signed_hex(r.delta),
            f"{r.length / KIB:,.1f}",
            f"{100 * r.matched / r.length:.0f}%",
            str(r.pages_if_aligned),
        )
    t.caption = (
        "a region joins runs of one shift across differences (relocated addresses) "
        "of up to 2 KiB; matched: bytes inside runs"
    )
    _show(console, t)


# -- plot ---------------------------------------------------------------------------


def plot_matrix(analysis: Analysis, path: Path) -> None:
    """Write a heatmap of the pairwise sharing matrix to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = analysis.matrix
    n = len(m.labels)
    size = max(4.0, 1.0 + 0.9 * n)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), dpi=110)
    image = ax.imshow([list(row) for row in m.shared], cmap="viridis", vmin=0)
    ax.set_xticks(range(n), labels=list(m.labels), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(m.labels))
    peak = max((max(row) for row in m.shared), default=0)
    for i in range(n):
        for j in range(n):
            value = m.shared[i][j]
            ax.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                color="black" if value > 0.6 * peak else "white",
                fontsize=9,
            )
    ax.set_title(
        f"identical read-only pages per pair\n({m.distinct_shareable} distinct over all images)"
    )
    fig.colorbar(image, ax=ax, label="shared pages (diagonal: the image's own)")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
