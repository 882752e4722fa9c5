"""Candidates of several SKUs of one instance share UNet batches: the planner on its own, then
generate() on the tiny presets (same candidates as drawing SKU by SKU, fewer and fuller draw calls,
crash-safe per SKU)."""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl
import pytest
from conftest import crash_after_skus

from catalog_gen import seeds
from catalog_gen.generate import generation
from catalog_gen.generate.planner import SkuState, candidates_wanted, plan_batch
# workdir: the module fixture with the two trained ring adapters.
from test_generation import assert_same_candidates, nightly, run, workdir  # noqa: F401

# Two instance groups of several SKUs each, k from 1 to 3: first rounds span batches, extras get pooled.
SHEET = (
    "sku,class,instance,n_images,seed,view,setting,metal\n"
    "B-1,ring,band,2,,front view,on marble,gold\n"
    "S-1,ring,signet,1,,top view,on wood,silver\n"
    "B-2,ring,band,3,,side view,on linen,silver\n"
    "B-3,ring,band,1,,top view,on sand,rose gold\n"
    "S-2,ring,signet,2,,front view,on linen,gold\n"
    "B-4,ring,band,2,,three-quarter view,on wood,gold\n"
    "B-5,ring,band,1,,front view,on velvet,silver\n"
    "S-3,ring,signet,3,,side view,on marble,rose gold\n"
)
K = {line.split(",")[0]: int(line.split(",")[3]) for line in SHEET.splitlines()[1:]}
COLUMNS = ["sku", "candidate", "seed", "clip_i", "dino", "clip_t", "passed", "kept", "path"]


# ----------------------------------------------------------------------------- the planner (pure)

def test_a_sku_draws_its_first_k_whatever_passed():
    state = SkuState("A", "p", 0, k=3, budget=5)
    assert candidates_wanted(state) == 3
    # A first round split over two batches finishes it, even when the first ones all passed.
    assert candidates_wanted(SkuState("A", "p", 0, k=3, budget=5, drawn=2, passed=2)) == 1


def test_extras_only_while_fewer_than_k_passed_and_never_beyond_k_plus_m():
    def wanted(drawn, passed, k=2, budget=4):
        return candidates_wanted(SkuState("A", "p", 0, k=k, budget=budget, drawn=drawn, passed=passed))

    assert wanted(2, 2) == 0
    assert wanted(2, 1) == 1 and wanted(2, 0) == 2  # one extra per missing pass
    assert wanted(3, 1) == 1 and wanted(3, 2) == 0
    assert wanted(3, 0) == 1  # two passes missing, one candidate of the budget left
    assert wanted(4, 0) == 0 and wanted(4, 1) == 0
    assert wanted(2, 0, budget=2) == 0  # M = 0: never an extra


def test_a_batch_takes_skus_in_order_and_never_exceeds_batch_size():
    states = [SkuState("A", "pa", 7, k=3, budget=5), SkuState("B", "pb", 7, k=2, budget=4, drawn=2, passed=1),
              SkuState("C", "pc", 7, k=2, budget=2, drawn=2, passed=0)]
    slots = plan_batch(states, batch_size=4)
    assert [(s.sku, s.candidate) for s in slots] == [("A", 0), ("A", 1), ("A", 2), ("B", 2)]
    assert [s.prompt for s in slots] == ["pa"] * 3 + ["pb"]
    assert all(s.seed == seeds.candidate(s.sku, s.candidate, 7) for s in slots)
    assert [(s.sku, s.candidate) for s in plan_batch(states, batch_size=2)] == [("A", 0), ("A", 1)]
    assert plan_batch(states[2:], batch_size=4) == []


def per_sku_rounds(passes: list[bool], k: int, budget: int) -> list[int]:
    """The draw calls of the per-SKU generator, as it was written: k first, then rounds of (k - passed)
    while fewer than k passed, up to the budget k + M."""
    rounds: list[int] = []
    while sum(rounds) < budget:
        passed = sum(passes[:sum(rounds)])
        if passed >= k:
            break
        rounds.append(min(k - passed if rounds else k, budget - sum(rounds)))
    return rounds


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 7])
def test_shared_batches_draw_the_same_candidates_as_sku_by_sku(batch_size):
    rng = random.Random(batch_size)
    for _ in range(200):
        # Random SKUs, each with a fixed gate outcome per candidate index (as a seed fixes the image).
        skus_ = [(f"S{n}", rng.randint(1, 4), rng.randint(0, 3)) for n in range(rng.randint(1, 8))]
        outcome = {sku: [rng.random() < 0.5 for _ in range(k + m)] for sku, k, m in skus_}
        states = {sku: SkuState(sku, "p", 0, k=k, budget=k + m) for sku, k, m in skus_}
        while slots := plan_batch(list(states.values()), batch_size):
            assert len(slots) <= batch_size
            for slot in slots:
                state = states[slot.sku]
                assert slot.candidate == state.drawn  # each SKU's candidates in index order, none skipped
                states[slot.sku] = SkuState(state.sku, "p", 0, state.k, state.budget, state.drawn + 1,
                                            state.passed + outcome[slot.sku][slot.candidate])
        for sku, k, m in skus_:
            assert states[sku].drawn == sum(per_sku_rounds(outcome[sku], k, k + m)), (sku, k, m, outcome[sku])


# ----------------------------------------------------------------------------- generate() on the tiny presets

@pytest.fixture(scope="module")
def sheet(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("batch-sheet") / "skus.csv"
    path.write_text(SHEET)
    return path


def counting_draws(monkeypatch, calls: list[int], fail_on: str | None = None) -> None:
    """Record each draw call's batch (and make any batch holding `fail_on` in a prompt raise)."""
    draw = generation._draw

    def counted(context, prompts, seeds):
        calls.append(len(prompts))
        if fail_on is not None and any(fail_on in prompt for prompt in prompts):
            raise RuntimeError(f"bad prompt: {fail_on}")
        return draw(context, prompts, seeds)

    monkeypatch.setattr(generation, "_draw", counted)


@pytest.fixture(scope="module")
def batched(sheet, workdir, tmp_path_factory):  # noqa: F811
    """The sheet with batch_size 4: every draw call's size, and the SKUs in flight each time one starts."""
    run_dir, calls, in_flight, finished = tmp_path_factory.mktemp("batched"), [], [], []
    start_sku = generation._start_sku

    def counted_start(*args):
        in_flight.append(len(in_flight) + 1 - len(finished))
        return start_sku(*args)

    with pytest.MonkeyPatch.context() as monkeypatch:
        counting_draws(monkeypatch, calls)
        monkeypatch.setattr(generation, "_start_sku", counted_start)
        summary = run(sheet, workdir, run_dir, nightly(batch_size=4), progress=finished.append)
    return run_dir, summary, calls, in_flight


def read_manifest(run_dir: Path) -> pl.DataFrame:
    return pl.read_parquet(run_dir / "manifest.parquet").select(COLUMNS)


def test_the_sheet_has_multi_sku_groups_with_extras(batched):
    run_dir, summary, *_ = batched
    assert summary.skus_done == 8 and not summary.errors
    counts = dict(pl.read_parquet(run_dir / "manifest.parquet").group_by("sku").len().iter_rows())
    assert any(counts[sku] > K[sku] for sku in K), "no SKU drew extras: the test would cover less"
    assert 0 < summary.kept < summary.candidates


def test_batch_size_changes_no_candidate_score_or_verdict(batched, sheet, workdir, tmp_path):  # noqa: F811
    reference, *_ = batched
    run(sheet, workdir, tmp_path, nightly(batch_size=1))
    assert_same_candidates(tmp_path, reference)


def test_skus_share_draw_calls_up_to_batch_size(batched):
    run_dir, summary, calls, in_flight = batched
    assert max(calls) <= 4 and sum(calls) == summary.candidates
    assert max(in_flight) <= 4  # a crash loses at most batch_size SKUs
    # What drawing SKU by SKU cost on the same candidates: one call per round.
    manifest = pl.read_parquet(run_dir / "manifest.parquet").sort(["sku", "candidate"])
    per_sku_calls = sum(len(per_sku_rounds(group["passed"].to_list(), K[sku], K[sku] + nightly().max_extra))
                        for (sku,), group in manifest.group_by("sku"))
    assert len(calls) < per_sku_calls
    assert summary.candidates / len(calls) > summary.candidates / per_sku_calls
    assert summary.candidates / len(calls) >= 2.5  # 8 SKUs over 2 instances, batch 4: nearly full batches


def test_a_crash_mid_group_keeps_finished_skus_whole_and_the_rerun_matches(batched, sheet, workdir,  # noqa: F811
                                                                           tmp_path):
    reference, *_ = batched
    with pytest.raises(InterruptedError):
        run(sheet, workdir, tmp_path, nightly(batch_size=4), progress=crash_after_skus(2))
    # Parts are written per finished SKU, inside the first group (band, 5 SKUs), each complete with its PNGs.
    parts = sorted((tmp_path / "parts").glob("*.parquet"))
    assert len(parts) == 2
    expected = read_manifest(reference)
    finished = set()
    for part in parts:
        rows = pl.read_parquet(part).select(COLUMNS)
        sku = rows["sku"][0]
        finished.add(sku)
        assert rows.equals(expected.filter(pl.col("sku") == sku))
        assert all((tmp_path / path).is_file() for path in rows["path"])
    assert finished < {"B-1", "B-2", "B-3", "B-4", "B-5"}
    # No PNG of a SKU in flight, no temporary file.
    images = {p.relative_to(tmp_path).as_posix() for p in (tmp_path / "images").rglob("*") if p.is_file()}
    assert images == set(expected.filter(pl.col("sku").is_in(finished))["path"])
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".") and p.is_file() and p.name != ".run.lock"], \
        "temporary files left"

    summary = run(sheet, workdir, tmp_path, nightly(batch_size=4))
    assert summary.skus_done == 6 and summary.skus_already_done == 2
    assert_same_candidates(tmp_path, reference)


def test_a_shared_draw_that_fails_fails_only_the_sku_at_fault(batched, sheet, workdir,  # noqa: F811
                                                                tmp_path, monkeypatch):
    reference, *_ = batched
    at_fault = ["B-3", "S-3"]  # the "rose gold" rows
    counting_draws(monkeypatch, [], fail_on="in rose gold")
    summary = run(sheet, workdir, tmp_path, nightly(batch_size=4))
    assert sorted(sku for sku, _ in summary.errors) == at_fault
    assert all("bad prompt" in message for _, message in summary.errors)
    manifest = pl.read_parquet(tmp_path / "manifest.parquet")
    assert manifest.filter(pl.col("sku").is_in(at_fault))["reason"].str.starts_with("error:").all()
    # Their batch-mates were drawn again on their own: the same candidates as in the run without a fault.
    exact = ["sku", "candidate", "seed", "passed", "kept"]
    others = manifest.filter(~pl.col("sku").is_in(at_fault)).select(exact)
    assert others.equals(read_manifest(reference).filter(~pl.col("sku").is_in(at_fault)).select(exact))
