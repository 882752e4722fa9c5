"""Quality gates: keep only candidates that look like the product. Pure functions over numbers.

Scores (DreamBooth paper): CLIP-I and DINO are the mean cosine similarity between a
candidate's embedding and every reference photo of the instance; CLIP-T is the cosine
between the candidate and its prompt with the rare token replaced by the class noun.
Besides the three thresholds, a candidate fails when it is blank, NaN or near-uniform,
or when it is a near copy of one training photo (memorisation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np

GATES = ("invalid", "blank", "clip_i", "dino", "clip_t", "memorised")


@dataclass(frozen=True)
class Thresholds:
    clip_i: float
    dino: float
    clip_t: float
    memorisation_dino: float
    min_pixel_std: float
    calibrated: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Scores:
    clip_i: float
    dino: float
    clip_t: float
    max_train_dino: float
    """Highest DINO similarity to any single training photo."""
    pixel_std: float
    finite: bool


@dataclass(frozen=True)
class Verdict:
    passed: bool
    failed_gates: tuple[str, ...]
    reason: str


def base_thresholds(config) -> Thresholds:
    return Thresholds(config.min_clip_i, config.min_dino, config.min_clip_t, config.memorisation_dino,
                      config.min_pixel_std)


def leave_one_out_similarity(reference: np.ndarray) -> float:
    """Mean over photos of each photo's mean cosine to the others: the instance's real-to-real level."""
    reference = np.asarray(reference, dtype=np.float64)
    if reference.shape[0] < 2:
        return float("nan")
    unit = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    similarity = unit @ unit.T
    n = similarity.shape[0]
    return float(((similarity.sum(axis=1) - np.diag(similarity)) / (n - 1)).mean())


def calibrate(base: Thresholds, reference_clip: np.ndarray, reference_dino: np.ndarray, ratio: float) -> Thresholds:
    """Per-instance CLIP-I / DINO thresholds: `ratio` x the reference photos' own similarity.

    A plain band ring's photos resemble each other far more than a charm necklace's do,
    so one fixed threshold is either too strict for one or too lax for the other.
    """
    clip_level = leave_one_out_similarity(reference_clip)
    dino_level = leave_one_out_similarity(reference_dino)
    if not (np.isfinite(clip_level) and np.isfinite(dino_level)):
        return base  # one reference photo: nothing to calibrate against
    return replace(base, clip_i=round(ratio * clip_level, 6), dino=round(ratio * dino_level, 6), calibrated=True)


def image_statistics(pixels: np.ndarray) -> tuple[float, bool]:
    """(standard deviation of the 0-255 pixel values, whether every value is finite)."""
    pixels = np.asarray(pixels, dtype=np.float64)
    finite = bool(np.isfinite(pixels).all())
    return (float(np.nanstd(pixels)) if finite else 0.0), finite


def score_and_threshold_text(value: float, minimum: float) -> tuple[str, str]:
    """Both as text with 3 decimals, or with as many more (up to 6) as it takes for a failing score not to
    read as equal to its threshold ("0.919 < 0.919")."""
    for digits in (3, 4, 5, 6):
        shown, limit = f"{value:.{digits}f}", f"{minimum:.{digits}f}"
        if shown != limit or value == minimum:
            break
    return shown, limit


def decide(scores: Scores, thresholds: Thresholds) -> Verdict:
    """Which gates a candidate fails, each with the number that failed it."""
    failures: list[tuple[str, str]] = []
    if not scores.finite:
        failures.append(("invalid", "image has NaN or infinite values"))
    elif scores.pixel_std < thresholds.min_pixel_std:
        failures.append(("blank", f"near-uniform image (pixel std {scores.pixel_std:.2f} < {thresholds.min_pixel_std})"))
    checks = (("clip_i", scores.clip_i, thresholds.clip_i, "CLIP-I"),
              ("dino", scores.dino, thresholds.dino, "DINO"),
              ("clip_t", scores.clip_t, thresholds.clip_t, "CLIP-T"))
    for gate, value, minimum, label in checks:
        if not np.isfinite(value) or value < minimum:
            shown, limit = score_and_threshold_text(value, minimum)
            failures.append((gate, f"{label} {shown} < {limit}"))
    if scores.max_train_dino >= thresholds.memorisation_dino:
        failures.append(("memorised", f"near copy of a training photo (DINO {scores.max_train_dino:.3f} "
                                      f">= {thresholds.memorisation_dino:.3f})"))
    return Verdict(not failures, tuple(g for g, _ in failures), "; ".join(r for _, r in failures))


def ranking_score(scores: Scores) -> float:
    """How candidates that passed are ordered when more than k pass: likeness first, then prompt fidelity."""
    return scores.clip_i + scores.dino + 0.5 * scores.clip_t


def choose_kept(candidates: Sequence[tuple[int, Scores, Verdict]], k: int) -> set[int]:
    """Indices of the best k passing candidates (ties broken by the lower index, so reruns agree)."""
    passing = [(index, scores) for index, scores, verdict in candidates if verdict.passed]
    passing.sort(key=lambda item: (-ranking_score(item[1]), item[0]))
    return {index for index, _ in passing[:k]}


def score_images(images, clip: np.ndarray, dino: np.ndarray, text_embedding: np.ndarray, reference_clip: np.ndarray,
                 reference_dino: np.ndarray) -> list[Scores]:
    """The gates' numbers for each image, from its CLIP and DINO embeddings and its prompt's text embedding."""
    from catalog_gen.quality.metrics import pairwise_cosine

    clip_to_refs = pairwise_cosine(clip, reference_clip)
    dino_to_refs = pairwise_cosine(dino, reference_dino)
    clip_t = pairwise_cosine(clip, text_embedding)[:, 0]
    results = []
    for n, image in enumerate(images):
        pixel_std, finite = image_statistics(np.asarray(image))
        results.append(Scores(
            clip_i=float(clip_to_refs[n].mean()), dino=float(dino_to_refs[n].mean()), clip_t=float(clip_t[n]),
            max_train_dino=float(dino_to_refs[n].max()), pixel_std=pixel_std, finite=finite))
    return results
