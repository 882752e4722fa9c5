"""Where one SKU stands, and which candidates the next shared UNet batch draws: pure, unit-tested on
its own (tests/test_generation_batching.py). generation.py runs the batches this plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from catalog_gen import seeds


@dataclass(frozen=True)
class SkuState:
    """What the planner knows of one SKU; every candidate drawn so far has been scored."""

    sku: str
    prompt: str
    run_seed: int
    k: int
    """Images wanted (and kept at most) for the SKU."""
    budget: int
    """k + M: the most candidates the SKU may draw."""
    drawn: int = 0
    passed: int = 0


@dataclass(frozen=True)
class Slot:
    """One candidate in a shared batch."""

    sku: str
    candidate: int
    seed: int
    prompt: str


def candidates_wanted(state: SkuState) -> int:
    """How many more candidates a SKU draws now: its first k whatever the gates say, then one extra per
    missing pass (so the SKU stops at its first k passes), never beyond k + M."""
    missing = state.k - state.drawn if state.drawn < state.k else state.k - state.passed
    return max(0, min(missing, state.budget - state.drawn))


def plan_batch(states: Sequence[SkuState], batch_size: int) -> list[Slot]:
    """The next batch: SKUs in order, each with as many of its wanted candidates as still fit.

    A SKU whose candidates are split over batches draws the same ones as drawn all at once:
    candidates_wanted is re-asked only after the earlier ones are scored, and it never asks for
    more than the passes still missing."""
    slots: list[Slot] = []
    for state in states:
        count = min(candidates_wanted(state), batch_size - len(slots))
        slots += [Slot(state.sku, index, seeds.candidate(state.sku, index, state.run_seed), state.prompt)
                  for index in range(state.drawn, state.drawn + count)]
    return slots
