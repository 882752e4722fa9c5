"""The seed owner: pinned values (a change here changes every user's images and adapters) and no
process-global generator moved by the library."""

from __future__ import annotations

import pytest
import torch

from catalog_gen import seeds


def test_pinned_seeds_never_change():
    assert seeds.training_step(3, "ring/band", 5) == 5283659209696862786
    assert seeds.lora_init(0, "ring/band") == 3680786309540630258
    assert seeds.dropout(0, "ring/band", 2) == 3379537722393753157
    assert seeds.photo_order(0, "ring/band") == 698163080
    assert seeds.candidate("RG-BAND-001", 0, 42) == 6142763885115335740
    assert seeds.class_image(2, 5) == 200_011 and seeds.validation_image(2, 5) == 7
    assert seeds.evaluation_image(2, 5) == 2_005 and seeds.epoch_order(3, 1) == 3_000_010


def test_a_redo_round_shifts_the_run_seed_and_a_sheet_seed_wins():
    assert seeds.sku_run_seed(7, None, 0) == 7
    assert seeds.sku_run_seed(7, 11, 0) == 11
    assert seeds.sku_run_seed(7, None, 2) == 7 + 2 * seeds.REDO_SEED_STRIDE


def test_isolated_rng_leaves_the_global_generator_as_it_found_it():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    with seeds.isolated_rng(5):
        inside = torch.rand(3)
    assert torch.equal(torch.random.get_rng_state(), state)
    with seeds.isolated_rng(5):
        assert torch.equal(torch.rand(3), inside)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_candidate_seed_refuses_a_bad_index(bad):
    with pytest.raises(Exception, match="candidate index"):
        seeds.candidate("A", bad, 7)
