"""Quality gates on constructed cases (pure functions, no models)."""

from __future__ import annotations

import numpy as np
import pytest

from catalog_gen.quality import gates
from catalog_gen.config import GenerateConfig
from catalog_gen.errors import CatalogError
from catalog_gen.generate.generation import use_prompt_noun

BASE = gates.Thresholds(clip_i=0.7, dino=0.5, clip_t=0.2, memorisation_dino=0.97, min_pixel_std=4.0)


def scores(**overrides) -> gates.Scores:
    values = dict(clip_i=0.8, dino=0.6, clip_t=0.3, max_train_dino=0.8, pixel_std=40.0, finite=True)
    values.update(overrides)
    return gates.Scores(**values)


def test_a_good_candidate_passes():
    verdict = gates.decide(scores(), BASE)
    assert verdict.passed and verdict.failed_gates == () and verdict.reason == ""


@pytest.mark.parametrize("field, value, gate, text", [
    ("clip_i", 0.69, "clip_i", "CLIP-I 0.690 < 0.700"),
    ("clip_i", 0.69996, "clip_i", "CLIP-I 0.69996 < 0.70000"),  # not "0.700 < 0.700"
    ("dino", 0.2, "dino", "DINO 0.200 < 0.500"),
    ("clip_t", 0.1, "clip_t", "CLIP-T 0.100 < 0.200"),
    ("max_train_dino", 0.99, "memorised", "near copy of a training photo"),
    ("pixel_std", 0.5, "blank", "near-uniform image"),
    ("finite", False, "invalid", "NaN"),
    ("clip_i", float("nan"), "clip_i", "CLIP-I nan"),
])
def test_each_gate_fails_with_its_number(field, value, gate, text):
    verdict = gates.decide(scores(**{field: value}), BASE)
    assert not verdict.passed
    assert gate in verdict.failed_gates
    assert text in verdict.reason


def test_several_failures_are_all_reported():
    verdict = gates.decide(scores(clip_i=0.1, dino=0.1), BASE)
    assert verdict.failed_gates == ("clip_i", "dino")


def test_image_statistics_detect_blank_and_nan():
    uniform = np.full((8, 8, 3), 255, dtype=np.uint8)
    assert gates.image_statistics(uniform) == (0.0, True)
    noisy = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    assert gates.image_statistics(noisy)[0] > 50
    broken = np.zeros((4, 4, 3))
    broken[0, 0, 0] = np.nan
    assert gates.image_statistics(broken) == (0.0, False)


def test_leave_one_out_similarity_by_hand():
    # Three unit vectors: cos(a,b)=1, cos(a,c)=cos(b,c)=0 -> per-photo means 0.5, 0.5, 0.0.
    reference = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    assert gates.leave_one_out_similarity(reference) == pytest.approx((0.5 + 0.5 + 0.0) / 3)


def test_calibration_follows_each_instance():
    rng = np.random.default_rng(0)
    centre = rng.normal(size=16)
    tight = centre + 0.05 * rng.normal(size=(5, 16))   # a plain band ring: photos nearly alike
    loose = centre + 1.5 * rng.normal(size=(5, 16))    # a charm necklace: photos differ a lot
    t = gates.calibrate(BASE, tight, tight, ratio=0.85)
    l = gates.calibrate(BASE, loose, loose, ratio=0.85)
    assert t.calibrated and l.calibrated
    assert t.clip_i > 0.8 and l.clip_i < t.clip_i - 0.2
    assert t.clip_i == pytest.approx(0.85 * gates.leave_one_out_similarity(tight), abs=1e-6)
    assert t.clip_t == BASE.clip_t  # prompt fidelity is not calibrated from photos


def test_calibration_needs_two_photos():
    assert gates.calibrate(BASE, np.ones((1, 4)), np.ones((1, 4)), 0.85) == BASE


def test_best_k_are_kept_and_ties_break_by_index():
    candidates = [
        (0, scores(clip_i=0.75), gates.Verdict(True, (), "")),
        (1, scores(clip_i=0.95), gates.Verdict(True, (), "")),
        (2, scores(clip_i=0.99), gates.Verdict(False, ("dino",), "x")),
        (3, scores(clip_i=0.75), gates.Verdict(True, (), "")),
    ]
    assert gates.choose_kept(candidates, 2) == {1, 0}
    assert gates.choose_kept(candidates, 10) == {0, 1, 3}


def test_clip_t_prompt_uses_the_class_noun():
    assert use_prompt_noun("photo of a xqz signet ring", "xqz", "ring") == "photo of a signet ring"
    assert use_prompt_noun("photo of a xqz on marble", "xqz", "ring") == "photo of a ring on marble"
    assert use_prompt_noun("photo of a ring", "xqz", "ring") == "photo of a ring"


def test_generate_config_rejects_bad_values():
    with pytest.raises(CatalogError, match="scheduler"):
        GenerateConfig(scheduler="heun2")
    with pytest.raises(CatalogError, match="min_clip_i"):
        GenerateConfig(min_clip_i=1.5)
    with pytest.raises(CatalogError, match="n_images"):
        GenerateConfig(n_images=0)


def test_a_failing_score_never_reads_as_equal_to_its_threshold():
    from catalog_gen.quality.gates import score_and_threshold_text

    assert score_and_threshold_text(0.91949, 0.9195) == ("0.91949", "0.91950")
    assert score_and_threshold_text(0.5, 0.7) == ("0.500", "0.700")
    assert score_and_threshold_text(0.7, 0.7) == ("0.700", "0.700")  # equal passes, and reads equal
