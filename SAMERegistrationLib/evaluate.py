"""Accuracy measures shared by the pipeline report, the tests and the benchmarks."""

from __future__ import annotations

import numpy as np


def dice_per_label(
    reference: np.ndarray, candidate: np.ndarray, labels: list[int] | None = None
) -> dict[int, float]:
    """Dice of each label; by default the labels present (non-zero) in both maps."""
    if reference.shape != candidate.shape:
        raise ValueError(f"label maps differ in shape: {reference.shape} vs {candidate.shape}")
    if labels is None:
        labels = sorted(set(np.unique(reference)) & set(np.unique(candidate)) - {0})
    scores = {}
    for label in labels:
        a, b = reference == label, candidate == label
        total = int(a.sum()) + int(b.sum())
        scores[int(label)] = 2.0 * int((a & b).sum()) / total if total else float("nan")
    return scores


def mean_dice(scores: dict[int, float]) -> float:
    values = [v for v in scores.values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def target_registration_error(mapped: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm) between mapped and expected points, per point."""
    return np.linalg.norm(np.asarray(mapped) - np.asarray(expected), axis=1)
