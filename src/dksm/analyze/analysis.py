"""One analysis of a set of images: pages, sharing, shifted runs and the fleet model,
computed once and handed to :mod:`dksm.analyze.report` to render."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dksm.analyze.pages import ImagePages, read_image, unique_labels
from dksm.analyze.predict import FleetPrediction, predict_fleet
from dksm.analyze.sharing import PageReport, SharingMatrix, page_reports, sharing_matrix
from dksm.analyze.shifted import PairShifts, find_runs, shifted_pairs
from dksm.error import DksmError


class AnalyzeError(DksmError):
    """The analysis was asked something it cannot answer (bad instance counts...)."""


@dataclass(frozen=True)
class Analysis:
    images: tuple[ImagePages, ...]
    matrix: SharingMatrix
    pages: tuple[tuple[PageReport, ...], ...]  # per image, its loaded pages
    shifts: tuple[PairShifts, ...]
    fleet: FleetPrediction


def instance_counts(spec: Sequence[int], images: int) -> list[int]:
    """One count for every image, or one per image."""
    if any(n < 0 for n in spec):
        raise AnalyzeError("instance counts cannot be negative")
    if len(spec) == 1:
        return list(spec) * images
    if len(spec) != images:
        raise AnalyzeError(
            f"{len(spec)} instance counts given for {images} images: give one count, "
            "or one per image in order"
        )
    return list(spec)


def analyze_images(paths: Sequence[Path], instances: Sequence[int], mem_size: int) -> Analysis:
    """Analyse ``paths`` (each checked by the loader for a guest of ``mem_size``)
    with ``instances`` per image for the fleet prediction."""
    if not paths:
        raise AnalyzeError("no image to analyse")
    counts = instance_counts(instances, len(paths))
    labels = unique_labels(paths)
    images = [read_image(p, mem_size, label) for p, label in zip(paths, labels, strict=True)]
    runs = find_runs(images)
    shifts = shifted_pairs(images, runs)
    return Analysis(
        images=tuple(images),
        matrix=sharing_matrix(images),
        pages=tuple(tuple(rows) for rows in page_reports(images, runs, shifts)),
        shifts=tuple(shifts),
        fleet=predict_fleet(images, counts),
    )
