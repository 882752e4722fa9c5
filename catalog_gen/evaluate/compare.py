"""`catalog compare`: fine-tuning methods side by side on the same photos, prompts and seeds.

It is a sweep whose one axis is the method (WORKDIR/sweeps/compare-<class>-<instance>/), so it resumes like
one, plus what a team choosing a method weighs besides the scores:
    compare.parquet, compare.md   per method: CLIP-I, DINO, CLIP-T, KID and FID to the photos and to the base
                                  model, training time, weight-file size, trained parameters, peak CUDA memory
    grid.png                      the reference photos, the base model's images, then each method's
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from catalog_gen import layout
from catalog_gen.config import METHODS, TrainConfig
from catalog_gen.errors import CatalogError
from catalog_gen.evaluate.evaluation import METRICS, EvalConfig
from catalog_gen.storage import atomic_path, atomic_write_text

GRID_IMAGES = 4
"""Images per row of grid.png."""


def parse_methods(text: str | Sequence[str]) -> list[str]:
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise CatalogError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                           f"choose from {', '.join(METHODS)}")
    if len(set(names)) < len(names):
        raise CatalogError(f"--methods lists a method twice: {', '.join(names)}")
    return names


def parse_method_settings(section: Mapping[str, Any], origin: str) -> dict[str, dict]:
    """A recipe's [compare] section: one table of [train] settings per method, e.g. [compare.dreambooth]
    learning_rate = 1e-6 (full fine-tuning wants a far smaller rate than a LoRA)."""
    from dataclasses import fields

    known = {f.name for f in fields(TrainConfig)} - {"method"}
    found = {}
    for method, values in section.items():
        if method not in METHODS:
            raise CatalogError(f"{origin}: [compare.{method}] is not a method; choose from {', '.join(METHODS)}")
        if not isinstance(values, dict):
            raise CatalogError(f"{origin}: [compare] {method} must be a table of [train] settings")
        unknown = sorted(set(values) - known)
        if unknown:
            raise CatalogError(f"{origin}: [compare.{method}] unknown setting(s) {', '.join(unknown)}")
        found[method] = dict(values)
    return found


def run_compare(source, class_key: str, instance_key: str, workdir: Path, methods: Sequence[str],
                train: TrainConfig, evaluation: EvalConfig, *, progress=None, steps_progress=None,
                method_settings: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Train and evaluate each method (resuming what a killed run finished), then tabulate and draw.
    method_settings: [train] settings for one method only (parse_method_settings)."""
    from catalog_gen.evaluate.sweep import run_sweep

    # 1-2. Each method trained and evaluated as a sweep point.
    sweep_dir = run_sweep(source, class_key, instance_key, workdir, layout.compare_name(class_key, instance_key),
                          {"method": list(methods)}, train, evaluation, progress=progress,
                          steps_progress=steps_progress, method_settings=method_settings)
    from accelerate import PartialState

    from catalog_gen.train.workflow import use_cpu

    if not PartialState(cpu=use_cpu()).is_main_process:  # under accelerate launch one process writes
        return sweep_dir
    # 3. The comparison table, with what each method cost.
    rows = [base_row(sweep_dir, methods[0])] + [method_row(sweep_dir, class_key, instance_key, m) for m in methods]
    _write_table(sweep_dir, rows, evaluation)
    # 4. The picture grid.
    draw_grid(sweep_dir, class_key, instance_key, methods)
    return sweep_dir


def base_row(sweep_dir: Path, method: str) -> dict:
    """The base model's own images, same prompts and seeds, scored like the methods' (what they improve on)."""
    from catalog_gen.evaluate.sweep import point_id

    folder = layout.sweep_point_folder(sweep_dir, point_id({"method": method}))
    result = json.loads((folder / layout.SWEEP_POINT_RESULT).read_text())
    if "base_metrics" not in result:
        raise CatalogError(f"{folder}: made by an older catalog-gen, without the base model's scores; delete the "
                           "folder to redo that method")
    return {"method": "base model (no fine-tuning)", "steps": 0, **{m: result["base_metrics"][m] for m in METRICS},
            "train_seconds": None, "weights_bytes": None, "trained_parameters": None,
            "peak_cuda_memory_bytes": None, "class_stage_seconds": None, "class_stage_bytes": None}


def method_row(sweep_dir: Path, class_key: str, instance_key: str, method: str) -> dict:
    from safetensors import safe_open

    from catalog_gen.evaluate.sweep import point_id
    from catalog_gen.train.adapters import read_adapter

    folder = layout.sweep_point_folder(sweep_dir, point_id({"method": method}))
    result = json.loads((folder / layout.SWEEP_POINT_RESULT).read_text())
    adapter = read_adapter(layout.adapter_folder(folder, class_key, instance_key))
    # The files a diffusers user loads (the kohya file is the same LoRA renamed, the single file the same
    # fine-tune with the base model's VAE beside it, so neither is counted twice).
    files = [adapter.folder / name for kind, name in adapter.record["files"].items()
             if name and kind not in ("kohya", "single_file")]
    parameters = 0
    for path in files:
        with safe_open(str(path), "pt") as handle:
            parameters += sum(_count(handle.get_slice(key).get_shape()) for key in handle.keys())
    timings = adapter.record["timings"]
    stage = adapter.class_stage  # two-stage: its class LoRA is shared by every instance of the class
    return {"method": method, "steps": adapter.record["steps"], **{m: result["metrics"][m] for m in METRICS},
            "train_seconds": timings["train_seconds"], "weights_bytes": sum(p.stat().st_size for p in files),
            "trained_parameters": parameters, "peak_cuda_memory_bytes": timings.get("peak_cuda_memory_bytes"),
            "class_stage_seconds": stage.record["timings"]["train_seconds"] if stage else None,
            "class_stage_bytes": stage.diffusers_file.stat().st_size if stage else None}


def _count(shape) -> int:
    total = 1
    for side in shape:
        total *= int(side)
    return total


def _write_table(sweep_dir: Path, rows: list[dict], evaluation: EvalConfig) -> None:
    import polars as pl

    with atomic_path(sweep_dir / layout.COMPARE_TABLE) as tmp:
        pl.DataFrame(rows).write_parquet(tmp)
    columns = ["method", "steps", *METRICS, "train_seconds", "weights_bytes", "trained_parameters",
               "peak_cuda_memory_bytes", "class_stage_seconds", "class_stage_bytes"]
    lines = [f"# Method comparison: {sweep_dir.name}", "",
             f"Same photos, prompts and seeds for every method; {evaluation.extractor} features for KID/FID; "
             f"peak CUDA memory is blank where training ran on a CPU (not measured). two-stage's time and size "
             f"are its instance stage's; its class stage (class_stage_*) is trained once and shared by every "
             f"instance of the class.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    atomic_write_text(sweep_dir / layout.COMPARE_SUMMARY, "\n".join(lines) + "\n")


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def draw_grid(sweep_dir: Path, class_key: str, instance_key: str, methods: Sequence[str]) -> Path:
    """One row each: reference photos, the base model, every method (its first GRID_IMAGES eval images)."""
    from PIL import Image, ImageDraw

    from catalog_gen.evaluate.sweep import point_id
    from catalog_gen.train.adapters import read_adapter

    first = layout.sweep_point_folder(sweep_dir, point_id({"method": methods[0]}))
    photos = read_adapter(layout.adapter_folder(first, class_key, instance_key)).photo_paths
    rows = [("photos", photos[:GRID_IMAGES]),
            ("base model", sorted(layout.sweep_point_images(first, base=True).glob("*.png"))[:GRID_IMAGES])]
    for method in methods:
        folder = layout.sweep_point_folder(sweep_dir, point_id({"method": method}))
        rows.append((method, sorted(layout.sweep_point_images(folder, base=False).glob("*.png"))[:GRID_IMAGES]))
    side, label_width = 96, 130
    grid = Image.new("RGB", (label_width + side * GRID_IMAGES, side * len(rows)), "white")
    pen = ImageDraw.Draw(grid)
    for row, (label, paths) in enumerate(rows):
        pen.text((6, row * side + side // 2 - 6), label, fill="black")
        for column, path in enumerate(paths):
            with Image.open(path) as image:
                grid.paste(image.convert("RGB").resize((side, side), Image.NEAREST),
                           (label_width + column * side, row * side))
    out = sweep_dir / layout.COMPARE_GRID
    with atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")
    return out
