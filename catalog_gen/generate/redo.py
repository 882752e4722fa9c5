"""`catalog generate --redo-rejected RUN`: which SKUs a reviewed run sends back, and the redo round whose
seeds they draw from (seeds.sku_run_seed)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from catalog_gen import layout
from catalog_gen.errors import CatalogError


def rejected_in(previous_run: Path) -> dict[str, int]:
    """Per SKU, how many of an earlier run's kept candidates a reviewer rejected.

    A rejection of a candidate the gates had already dropped asks for nothing new: it was never
    going to be exported, so it does not add an image to the next night's count.
    """
    import polars as pl

    decisions = previous_run / layout.DECISIONS_PARQUET
    if not decisions.is_file():
        raise CatalogError(f"{previous_run} has no {decisions.name}: review it first (catalog review {previous_run})")
    from catalog_gen.generate.manifest import read_manifest

    kept = read_manifest(previous_run, ["sku", "candidate", "kept"]).filter(pl.col("kept")).select("sku", "candidate")
    table = pl.read_parquet(decisions).filter(pl.col("decision") == "reject")
    table = table.join(kept, on=["sku", "candidate"], how="inner")
    return dict(Counter(table["sku"].to_list()))


def next_redo_round(previous_run: Path, run_dir: Path) -> int:
    """The redo round for a redo of previous_run into run_dir: one past every round its family has used.

    The family is every run folder beside previous_run or run_dir that descends from the same first run
    (following each run's recorded redo_rejected). Redoing one reviewed run twice, or a run and its redo,
    thus never draws from seeds an earlier redo drew (and a reviewer may have rejected). A run_dir that
    already holds a redo keeps its round, so a crashed redo resumes on its own seeds.
    """
    def settings(folder: Path) -> dict:
        try:
            return json.loads((folder / layout.RUN_JSON).read_text()).get("settings", {})
        except (OSError, ValueError):
            return {}

    def root(folder: Path) -> Path:
        seen: set[Path] = set()
        folder = folder.resolve()
        while folder not in seen:
            seen.add(folder)
            parent = settings(folder).get("redo_rejected")
            if not parent:
                break
            folder = Path(parent).resolve()
        return folder

    own = settings(run_dir)
    if own.get("redo_rejected") and Path(own["redo_rejected"]).resolve() == previous_run.resolve():
        return int(own.get("redo_round", 1))
    family_root = root(previous_run)
    rounds = [int(settings(previous_run).get("redo_round", 0))]
    for parent in {previous_run.resolve().parent, run_dir.resolve().parent}:
        for folder in parent.iterdir() if parent.is_dir() else ():
            if folder.is_dir() and (folder / layout.RUN_JSON).is_file() and root(folder) == family_root:
                rounds.append(int(settings(folder).get("redo_round", 0)))
    return max(rounds) + 1
