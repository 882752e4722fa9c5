"""The learning test: DreamBooth-LoRA on a held-out toy-world instance must move its images toward the
product, and the check must fail when learning is broken (no gradient, wrong noise target; a dropped token
is not detectable this way, see bench.toy_learning_check.UNDETECTED).

Toy world, not Stable Diffusion: catalog_gen/toy/MODEL_CARD.md. The setting, the breakages and the margins
live in bench/toy_learning_check.py, whose run prints the numbers the margins were set from.
"""

from __future__ import annotations

import pytest

from bench.toy_learning_check import BREAKAGES, MARGINS, SAMPLER, base_images as draw_base_images, measure, one_thread
from catalog_gen.toy import proof

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toolkit():
    with one_thread():  # for the whole module, as the margins were measured
        yield proof.load_toolkit(sampler=SAMPLER)


@pytest.fixture(scope="module")
def base_images(toolkit, tmp_path_factory):
    return draw_base_images(toolkit, tmp_path_factory.mktemp("toy-base"))


def test_dreambooth_lora_learns_a_held_out_instance(toolkit, base_images, tmp_path):
    row = measure(toolkit, base_images, tmp_path)
    assert proof.learning_failures(row, MARGINS) == []


@pytest.mark.parametrize("breakage", list(BREAKAGES.values()), ids=list(BREAKAGES))
def test_the_learning_check_fails_when_learning_is_broken(toolkit, base_images, tmp_path, monkeypatch, breakage):
    breakage(monkeypatch)
    row = measure(toolkit, base_images, tmp_path)
    assert proof.learning_failures(row, MARGINS) != []
