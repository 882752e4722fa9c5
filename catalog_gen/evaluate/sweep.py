"""`catalog sweep`: train and evaluate every point of a hyperparameter grid, resumably.

The axes are the questions of the seed reports: the fine-tuning method, training steps, LoRA rank,
learning rate, number of training photos, prior preservation, inference steps and scheduler.

WORKDIR/sweeps/<name>/
    sweep.json                 the grid and the base settings (a rerun must match)
    points/<id>/               one grid point: its own workdir (adapter, checkpoints)
    points/<id>/images/        the final adapter's evaluation images and the base model's (base/, final/)
    points/<id>/result.json    written last: the point is finished and is not redone
    results.parquet, results.md, <axis>-<metric>.png
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from catalog_gen import layout
from catalog_gen.config import TrainConfig
from catalog_gen.errors import CatalogError
from catalog_gen.evaluate.evaluation import METRICS, EvalConfig, evaluate_instance, load_eval_models, plot_metric
from catalog_gen.storage import atomic_path, atomic_write_json, atomic_write_text

# axis -> (which config it changes, the field it sets)
AXES = {
    "method": ("train", "method"),
    "embedding_lr": ("train", "embedding_lr"),
    "embedding_vectors": ("train", "embedding_vectors"),
    "steps": ("train", "steps"),
    "lora_rank": ("train", "lora_rank"),
    "learning_rate": ("train", "learning_rate"),
    "max_photos": ("train", "max_photos"),
    "prior_preservation": ("train", "prior_preservation"),
    "inference_steps": ("eval", "inference_steps"),
    "scheduler": ("eval", "scheduler"),
}


def parse_grid_option(text: str) -> dict[str, list]:
    """`steps=20,40 lora_rank=4,8` -> {"steps": [20, 40], "lora_rank": [4, 8]} (values as TOML would read them)."""
    import tomllib

    grid: dict[str, list] = {}
    for part in text.split():
        if "=" not in part:
            raise CatalogError(f"grid item '{part}' is not axis=value,value")
        axis, values = part.split("=", 1)
        parsed = []
        for value in values.split(","):
            try:
                parsed.append(tomllib.loads(f"v = {value}")["v"])
            except tomllib.TOMLDecodeError:
                parsed.append(value)  # a bare word such as a scheduler name
        grid[axis] = parsed
    return grid


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination, in a fixed order; unknown axes and empty axes are refused."""
    if not grid:
        raise CatalogError(f"empty sweep grid; axes: {', '.join(AXES)}")
    for axis, values in grid.items():
        if axis not in AXES:
            raise CatalogError(f"unknown sweep axis '{axis}'; axes: {', '.join(AXES)}")
        if not values:
            raise CatalogError(f"sweep axis '{axis}' has no values")
    axes = sorted(grid)
    return [dict(zip(axes, combo)) for combo in itertools.product(*(grid[a] for a in axes))]


def point_id(point: Mapping[str, Any]) -> str:
    readable = "_".join(f"{k}-{v}" for k, v in sorted(point.items()))
    digest = hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in readable)[:80]
    return f"{safe}-{digest}"


def configs_for(point: Mapping[str, Any], train: TrainConfig, evaluation: EvalConfig,
                method_settings: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[TrainConfig, EvalConfig]:
    """The point's settings; each replace() re-runs validation, so a bad grid value is a clear error.
    method_settings: [train] settings per method value (a full fine-tune needs another learning rate than
    a LoRA), applied under the point's own axes."""
    train_changes = {AXES[a][1]: v for a, v in point.items() if AXES[a][0] == "train"}
    method = train_changes.get("method", train.method)
    train_changes = {**(method_settings or {}).get(method, {}), **train_changes}
    eval_changes = {AXES[a][1]: v for a, v in point.items() if AXES[a][0] == "eval"}
    # Checkpoints at the end only: the sweep compares finished runs.
    return replace(train, checkpoint_every=0, validation_images=0, **train_changes), replace(evaluation, **eval_changes)


def run_sweep(source, class_key: str, instance_key: str, workdir: Path, name: str, grid: Mapping[str, Sequence[Any]],
              train: TrainConfig, evaluation: EvalConfig, *, progress=None, steps_progress=None,
              method_settings: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Run every unfinished grid point (shared between processes under accelerate), then tabulate.
    `progress` is train_class's per-instance factory; steps_progress(label, done, total) hears
    "point i of n" and the evaluation of each point."""
    from accelerate import PartialState

    from catalog_gen.catalog.class_map import load_class_map
    from catalog_gen.models.sampling import make_scheduler
    from catalog_gen.train.workflow import train_class, use_cpu

    state = PartialState(cpu=use_cpu())
    points = grid_points(grid)
    for point in points:  # every value checked before the first point trains, not when its turn comes
        try:
            configs_for(point, train, evaluation, method_settings)
        except CatalogError as error:
            raise CatalogError(f"sweep point {point}: {error}") from error
    class_map = load_class_map(source.class_map)
    class_spec = class_map.get_class(class_key)
    class_map.get_instance(class_key, instance_key)  # a clear error before any work
    sweep_dir = layout.sweep_folder(workdir, name)
    # 1. The sweep folder belongs to one grid and one set of base settings.
    if state.is_main_process:
        _claim(sweep_dir, grid, train, evaluation, class_key, instance_key, method_settings)
    state.wait_for_everyone()

    # 2. This process's unfinished points: train, evaluate the final checkpoint, record.
    models = None
    mine = points[state.process_index::state.num_processes]
    for number, point in enumerate(mine, 1):
        folder = layout.sweep_point_folder(sweep_dir, point_id(point))
        label = f"sweep {name}: point {number} of {len(mine)} ({point_id(point)})"
        report = steps_progress or (lambda *_: None)
        report(label, 0, 1)
        if (folder / layout.SWEEP_POINT_RESULT).is_file():
            report(label, 1, 1)
            continue
        train_config, eval_config = configs_for(point, train, evaluation, method_settings)
        summary = train_class(source, class_key, [instance_key], folder, train_config, resume=True,
                              progress=progress, steps_progress=steps_progress, distributed=False)
        if summary.failed or not summary.outcomes:
            reason = summary.failed[0].detail if summary.failed else "; ".join(s.reason for s in summary.skipped)
            raise CatalogError(f"sweep point {point}: training failed: {reason}")
        if models is None:  # one base pipeline for every point; reference embeddings cached for the sweep
            models = load_eval_models(train_config.base_model, eval_config, sweep_dir)
        models.pipeline.scheduler = make_scheduler(eval_config.scheduler, models.pipeline.scheduler.config)
        # The instance's own outcome (two-stage lists its class stage first).
        final_step = next(o.steps for o in summary.outcomes if o.key == f"{class_key}/{instance_key}")

        def keep_images(step: int, images, folder=folder) -> None:
            if step in (0, final_step):
                _save_images(layout.sweep_point_images(folder, base=step == 0), images)

        rows = evaluate_instance(models, eval_config, folder, class_spec, instance_key, progress=steps_progress,
                                 on_images=keep_images, base_row=True)
        atomic_write_json(folder / layout.SWEEP_POINT_RESULT, {"point": point, "lora_alpha": train_config.resolved_lora_alpha,
                                                   "metrics": rows[-1], "base_metrics": rows[0]})
        report(label, 1, 1)
    state.wait_for_everyone()

    # 3. One table and a plot per axis, from every finished point.
    if state.is_main_process:
        _tabulate(sweep_dir, points, evaluation.select_by)
    state.wait_for_everyone()  # every process returns only once the table it may read exists
    return sweep_dir


def _save_images(folder: Path, images) -> None:
    for index, image in enumerate(images):
        with atomic_path(folder / f"{index:02d}.png") as tmp:
            image.save(tmp, format="PNG")


def _claim(sweep_dir: Path, grid, train: TrainConfig, evaluation: EvalConfig, class_key: str, instance_key: str,
           method_settings=None) -> None:
    settings = {"grid": grid, "train": train.to_dict(), "eval": evaluation.to_dict(), "class": class_key,
                "instance": instance_key}
    if method_settings:  # recorded only when set, so sweeps claimed before it existed still match
        settings["method_settings"] = method_settings
    settings = json.loads(json.dumps(settings, default=str))
    marker = sweep_dir / layout.SWEEP_JSON
    if marker.is_file():
        defaults = json.loads(json.dumps({"train": TrainConfig().to_dict(), "eval": EvalConfig().to_dict()},
                                         default=str))
        changed = changed_settings(json.loads(marker.read_text()), settings, defaults)
        if changed:
            raise CatalogError(f"sweep '{sweep_dir.name}' exists with a different grid or settings "
                               f"({', '.join(changed)}); choose another --name")
        return
    atomic_write_json(marker, settings)


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[str]:
    """The settings in which a sweep's saved claim and this run differ, as 'section.name'.

    A setting the saved claim lacks counts as unchanged when this run leaves it at its default:
    a newer catalog-gen that adds a setting must still resume the sweeps of the older one.
    """
    changed = []
    for section in sorted(set(saved) | set(current)):
        old, new = saved.get(section), current.get(section)
        if isinstance(old, dict) and isinstance(new, dict) and section in defaults:
            for name in sorted(set(old) | set(new)):
                if name not in old and new.get(name) == defaults[section].get(name):
                    continue
                if old.get(name) != new.get(name):
                    changed.append(f"{section}.{name}")
        elif old != new:
            changed.append(section)
    return changed


def _tabulate(sweep_dir: Path, points: Sequence[dict], select_by: str) -> None:
    import polars as pl

    rows = []
    for point in points:
        result = layout.sweep_point_folder(sweep_dir, point_id(point)) / layout.SWEEP_POINT_RESULT
        if result.is_file():
            record = json.loads(result.read_text())
            rows.append({**{f"axis_{k}": v for k, v in record["point"].items()},
                         # The LoRA scale is alpha / rank: recorded, so a rank axis says what it measured.
                         "lora_alpha": record.get("lora_alpha"), **{m: record["metrics"][m] for m in METRICS}})
    if not rows:
        return
    frame = pl.DataFrame(rows)
    with atomic_path(sweep_dir / layout.SWEEP_TABLE) as tmp:
        frame.write_parquet(tmp)
    axes = [c for c in frame.columns if c.startswith("axis_")]
    higher = METRICS[select_by]
    ordered = frame.sort(select_by, descending=higher)
    lines = [f"# Sweep {sweep_dir.name}", "", f"{len(rows)} of {len(points)} grid points finished; "
             f"sorted by {select_by} ({'higher' if higher else 'lower'} is better).", "",
             "| " + " | ".join([a[5:] for a in axes] + ["lora_alpha"] + list(METRICS)) + " |",
             "|" + "---|" * (len(axes) + 1 + len(METRICS))]
    for row in ordered.iter_rows(named=True):
        cells = [str(row[a]) for a in axes] + [str(row["lora_alpha"])] + [f"{row[m]:.4g}" for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(sweep_dir / layout.SWEEP_SUMMARY, "\n".join(lines) + "\n")
    for axis in axes:
        others = [a for a in axes if a != axis]
        plot_rows = [{**r, "group": ", ".join(f"{o[5:]}={r[o]}" for o in others) or "all"}
                     for r in frame.iter_rows(named=True)]
        if isinstance(plot_rows[0][axis], str):
            continue  # a categorical axis (scheduler) is read from the table
        plot_metric(plot_rows, select_by, axis, sweep_dir / f"{axis[5:]}-{select_by}.png", group="group",
                    xlabel=axis[5:])
