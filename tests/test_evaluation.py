"""`catalog eval` and `catalog sweep` end to end on the tiny presets."""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import replace

import polars as pl
import pytest

from catalog_gen.config import TrainConfig, build_config, read_recipe
from catalog_gen.errors import CatalogError
from catalog_gen.evaluate.evaluation import EvalConfig, best_checkpoints, run_eval
from catalog_gen.evaluate.sweep import grid_points, parse_grid_option, point_id, run_sweep
from catalog_gen.train.workflow import PhotoSource, train_class


def recipe_configs():
    train = build_config(TrainConfig, read_recipe("tiny_sweep", "train"), {})
    evaluation = build_config(EvalConfig, read_recipe("tiny_sweep", "eval"), {})
    return train, evaluation


def source(sample_catalogue) -> PhotoSource:
    return PhotoSource(photos_dir=sample_catalogue.photos_dir, products_csv=sample_catalogue.products_csv)


def test_eval_scores_every_checkpoint(sample_catalogue, tmp_path):
    train, evaluation = recipe_configs()
    train_class(source(sample_catalogue), "ring", ["band", "slim"], tmp_path, replace(train, steps=20))
    heard = []
    out = run_eval(tmp_path, "ring", [], evaluation, progress=lambda *report: heard.append(report))
    table = pl.read_parquet(out / "eval.parquet")
    assert sorted(zip(table["instance"], table["step"])) == [("band", 10), ("band", 20), ("slim", 10), ("slim", 20)]
    # Per instance: the base model's image set, then each checkpoint's.
    assert heard == [(f"eval ring/{key}", done, 3) for key in ("band", "slim") for done in range(4)]
    assert set(table["extractor"]) == {"dino"}
    for metric in ("kid_photos", "fid_photos", "kid_base", "fid_base", "clip_i", "dino", "clip_t"):
        assert table[metric].is_finite().all(), metric
        assert (out / f"{metric}.png").stat().st_size > 1000
    assert (table["n_generated"] == 6).all()
    summary = (out / "summary.md").read_text()
    best = best_checkpoints(table.to_dicts(), "kid_photos")
    assert f"- band: step {best['band']['step']}" in summary and "Extractor for KID/FID: **dino**" in summary


def test_eval_without_checkpoints_or_adapters_is_a_clear_error(tmp_path):
    _, evaluation = recipe_configs()
    with pytest.raises(CatalogError, match="no trained adapters"):
        run_eval(tmp_path, "ring", [], evaluation)


def test_best_checkpoint_direction():
    rows = [{"instance": "a", "step": 10, "kid_photos": 0.2, "dino": 0.5},
            {"instance": "a", "step": 20, "kid_photos": 0.1, "dino": 0.4}]
    assert best_checkpoints(rows, "kid_photos")["a"]["step"] == 20
    assert best_checkpoints(rows, "dino")["a"]["step"] == 10


def test_grid_parsing_and_points():
    grid = parse_grid_option("steps=10,30 learning_rate=1e-4,1e-3 scheduler=ddim prior_preservation=true")
    assert grid == {"steps": [10, 30], "learning_rate": [1e-4, 1e-3], "scheduler": ["ddim"],
                    "prior_preservation": [True]}
    points = grid_points(grid)
    assert len(points) == 4 and len({point_id(p) for p in points}) == 4
    with pytest.raises(CatalogError, match="unknown sweep axis 'batch'"):
        grid_points({"batch": [1]})
    with pytest.raises(CatalogError, match="no values"):
        grid_points({"steps": []})


def test_sweep_resumes_a_half_finished_grid(sample_catalogue, tmp_path, monkeypatch):
    train, evaluation = recipe_configs()
    grid = {"steps": [6, 12], "max_photos": [3]}
    import catalog_gen.evaluate.sweep

    real_write = catalog_gen.evaluate.sweep.atomic_write_json

    def write_then_crash(path, payload):  # a kill right after the first point finished
        real_write(path, payload)
        if Path(path).name == "result.json":
            raise InterruptedError("stopped after one grid point")

    monkeypatch.setattr(catalog_gen.evaluate.sweep, "atomic_write_json", write_then_crash)
    with pytest.raises(InterruptedError):
        run_sweep(source(sample_catalogue), "ring", "band", tmp_path, "t", grid, train, evaluation)
    monkeypatch.undo()
    finished = sorted((tmp_path / "sweeps" / "t" / "points").glob("*/result.json"))
    assert len(finished) == 1
    stamp = finished[0].stat().st_mtime_ns

    heard = []
    out = run_sweep(source(sample_catalogue), "ring", "band", tmp_path, "t", grid, train, evaluation,
                    steps_progress=lambda *report: heard.append(report))
    assert finished[0].stat().st_mtime_ns == stamp, "a finished point was redone"
    points = [label for label, done, total in heard if label.startswith("sweep t: point")]
    assert [label.split(" (")[0] for label in points] == ["sweep t: point 1 of 2"] * 2 + ["sweep t: point 2 of 2"] * 2
    table = pl.read_parquet(out / "results.parquet")
    assert sorted(table["axis_steps"]) == [6, 12] and set(table["axis_max_photos"]) == {3}
    assert (out / "steps-kid_photos.png").is_file()
    assert "| max_photos | steps | lora_alpha | kid_photos |" in (out / "results.md").read_text()
    assert set(table["lora_alpha"]) == {4.0}  # recorded per point: alpha follows the recipe's rank 4
    for result in (out / "points").glob("*/result.json"):
        record = json.loads(result.read_text())
        adapter = json.loads((result.parent / "adapters" / "ring" / "band" / "adapter.json").read_text())
        assert adapter["steps"] == record["point"]["steps"] and len(adapter["photos"]) == 3

    with pytest.raises(CatalogError, match="different grid"):
        run_sweep(source(sample_catalogue), "ring", "band", tmp_path, "t", {"steps": [6]}, train, evaluation)


def test_a_bad_grid_value_is_refused_before_any_point_trains(sample_catalogue, tmp_path):
    train, evaluation = recipe_configs()
    with pytest.raises(CatalogError, match=r"sweep point \{'lora_rank': -1, 'steps': 6\}: lora_rank must be > 0"):
        run_sweep(source(sample_catalogue), "ring", "band", tmp_path, "bad", {"steps": [6], "lora_rank": [4, -1]},
                  train, evaluation)
    assert not (tmp_path / "sweeps" / "bad" / "points").exists()  # the good point did not train first


def test_eval_resize_keeps_floating_point_values():
    import dataclasses

    import numpy as np
    from PIL import Image

    from catalog_gen.quality.embedders import ImageTransform

    edge = np.zeros((64, 64, 3), dtype=np.uint8)
    edge[:, 32:] = 255  # a hard edge: bicubic overshoots past 255 and below 0 beside it
    transform = ImageTransform(24, (24, 24), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    as_uint8 = transform(Image.fromarray(edge))
    as_float = dataclasses.replace(transform, float_resize=True)(Image.fromarray(edge))
    assert float(as_uint8.max()) == 1.0 and float(as_uint8.min()) == 0.0
    assert float(as_float.max()) > 1.0 and float(as_float.min()) < 0.0


def test_sweep_claims_compare_setting_by_setting():
    from catalog_gen.evaluate.sweep import changed_settings

    defaults = {"train": {"steps": 200, "rank": 4}, "eval": {"precision": "auto", "steps": 25}}
    saved = {"grid": {"steps": [6]}, "train": {"steps": 200, "rank": 4}, "eval": {"steps": 25}, "class": "ring"}
    # A setting added after the sweep started, left at its default: the sweep resumes.
    same = {**saved, "eval": {"steps": 25, "precision": "auto"}}
    assert changed_settings(saved, same, defaults) == []
    # ... but not when it is set to something else, and every difference is named.
    other = {**saved, "grid": {"steps": [6, 12]}, "train": {"steps": 200, "rank": 8},
             "eval": {"steps": 25, "precision": "bf16"}}
    assert changed_settings(saved, other, defaults) == ["eval.precision", "grid", "train.rank"]
