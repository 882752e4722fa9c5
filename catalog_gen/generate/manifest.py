"""The run manifest: one row per candidate (and one per SKU that ended in an error), its schema, and the
files it lives in (per-SKU parts while a run goes, then the merged manifest; names from layout.py).

Producers (generation.py) build rows with candidate_row / error_row, readers (the report, review,
export, redo) and the tests' fixtures read them with read_manifest; SCHEMA is the one list of columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from catalog_gen import layout
from catalog_gen.errors import CatalogError
from catalog_gen.storage import atomic_path

SCHEMA: dict[str, str] = {  # column -> polars dtype name; an error row leaves the scores null
    "sku": "String", "line": "Int64", "class": "String", "instance": "String",
    "candidate": "Int64", "prompt": "String", "clip_t_prompt": "String", "seed": "Int64",
    "clip_i": "Float64", "dino": "Float64", "clip_t": "Float64", "max_train_dino": "Float64", "pixel_std": "Float64",
    "passed": "Boolean", "kept": "Boolean", "failed_gates": "String", "reason": "String", "path": "String",
    "threshold_clip_i": "Float64", "threshold_dino": "Float64", "threshold_clip_t": "Float64",
    "calibrated": "Boolean", "gen_seconds": "Float64", "score_seconds": "Float64",
    "adapter_base_fingerprint": "String", "base_mismatch": "Boolean",
}
ERROR_CANDIDATE = -1
"""The candidate number of the row that records a SKU's error."""


def candidate_row(row, prompt: str, scoring_prompt: str, record: dict, path: Path, kept: bool, thresholds,
                  adapter_base: str | None, base_fingerprint: str) -> dict[str, Any]:
    """One scored candidate of a sheet row (skus.SkuRow), as the manifest holds it."""
    scores, verdict = record["scores"], record["verdict"]
    return {
        "sku": row.sku, "line": row.line, "class": row.class_key, "instance": row.instance_key,
        "candidate": record["candidate"], "prompt": prompt, "clip_t_prompt": scoring_prompt, "seed": record["seed"],
        "clip_i": scores.clip_i, "dino": scores.dino, "clip_t": scores.clip_t,
        "max_train_dino": scores.max_train_dino, "pixel_std": scores.pixel_std,
        "passed": verdict.passed, "kept": kept, "failed_gates": ",".join(verdict.failed_gates),
        "reason": verdict.reason, "path": str(path),
        "threshold_clip_i": thresholds.clip_i, "threshold_dino": thresholds.dino,
        "threshold_clip_t": thresholds.clip_t, "calibrated": thresholds.calibrated,
        "gen_seconds": round(record["gen_seconds"], 4), "score_seconds": round(record["score_seconds"], 4),
        "adapter_base_fingerprint": adapter_base, "base_mismatch": adapter_base != base_fingerprint,
    }


def error_row(row, message: str) -> dict[str, Any]:
    """The row that records why a SKU has no candidates this run (it is tried again on the next)."""
    return {"sku": row.sku, "line": row.line, "class": row.class_key, "instance": row.instance_key,
            "candidate": ERROR_CANDIDATE, "passed": False, "kept": False, "failed_gates": "error",
            "reason": f"error: {message}", "path": ""}


def _frame(rows: Sequence[dict]):
    import polars as pl

    schema = {name: getattr(pl, dtype) for name, dtype in SCHEMA.items()}
    return pl.DataFrame([{name: row.get(name) for name in SCHEMA} for row in rows], schema=schema)


def write_part(run_dir: Path, sku_folder: str, rows: Sequence[dict]) -> None:
    """One finished SKU's rows, written atomically: the SKU's commit marker."""
    with atomic_path(layout.part_file(run_dir, sku_folder)) as tmp:
        _frame(rows).write_parquet(tmp)


def part_finished(run_dir: Path, sku_folder: str) -> bool:
    """A SKU is done when its part exists and holds no error row (an error is tried again next run)."""
    import polars as pl

    part = layout.part_file(run_dir, sku_folder)
    if not part.is_file():
        return False
    return not pl.read_parquet(part)["reason"].str.starts_with("error:").any()


def merge_manifest(run_dir: Path, sku_folders: Sequence[str]) -> None:
    """The run's manifest (Parquet, and CSV with formulas escaped) from the SKUs' parts."""
    import polars as pl

    from catalog_gen.generate.skus import write_csv_escaped

    parts = [layout.part_file(run_dir, folder) for folder in sku_folders]
    frames = [pl.read_parquet(part) for part in parts if part.is_file()]
    if not frames:
        return
    manifest = pl.concat(frames, how="diagonal_relaxed").sort(["sku", "candidate"])
    with atomic_path(run_dir / layout.MANIFEST_PARQUET) as tmp:
        manifest.write_parquet(tmp)
    write_csv_escaped(manifest, run_dir / layout.MANIFEST_CSV)


def read_manifest(run_dir: Path, columns: Sequence[str] | None = None):
    """The merged manifest of a finished run, as a polars DataFrame; a clear error when there is none."""
    import polars as pl

    path = Path(run_dir) / layout.MANIFEST_PARQUET
    if not Path(run_dir).is_dir():
        raise CatalogError(f"run folder {run_dir} does not exist")
    if not path.is_file():
        raise CatalogError(f"{run_dir} has no {path.name}: is it a finished run folder (catalog generate)?")
    try:
        return pl.read_parquet(path, columns=list(columns) if columns else None)
    except Exception as error:
        raise CatalogError(f"{path}: cannot read the manifest ({error})") from error
