"""The nightly generator end to end on the tiny presets (CPU)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import crash_after_skus
import torch
from PIL import Image

from catalog_gen.config import GenerateConfig, TrainConfig, build_config, read_recipe
from catalog_gen.generate.generation import GenerationRequest, generate
from catalog_gen.train.workflow import PhotoSource, train_class
from test_multiprocess import BIN, subprocess_env

INSTANCES = ["band", "signet"]
SHEET = (
    "sku,class,instance,n_images,seed,view,setting,metal\r\n"
    "RG-BAND-1,ring,band,2,,front view,on marble,gold\r\n"
    "RG-BAND-2,ring,band,,,side view,on linen,silver\r\n"
    "../escape,ring,signet,1,5,top view,on wood,gold\r\n"
    "RG-BAND-1,ring,band,2,,front view,on marble,gold\r\n"      # line 5: duplicate sku
    "NK-1,necklace,chain,2,,front view,on marble,gold\r\n"      # line 6: no adapter
    "RG-X,ring,hexagon,2,,front view,on marble,gold\r\n"        # line 7: unknown instance
    "RG-Y,ring,band,2,,front view,,gold\r\n"                    # line 8: missing {setting}
)


@pytest.fixture(scope="module")
def workdir(sample_catalogue, tmp_path_factory):
    """Two ring adapters trained briefly on the tiny preset."""
    folder = tmp_path_factory.mktemp("generate-work")
    config = replace(build_config(TrainConfig, read_recipe("tiny_demo", "train"), {}),
                     steps=4, checkpoint_every=0, validation_images=0)
    source = PhotoSource(photos_dir=sample_catalogue.photos_dir, products_csv=sample_catalogue.products_csv)
    summary = train_class(source, "ring", INSTANCES, folder, config)
    assert [o.status for o in summary.outcomes] == ["trained", "trained"]
    return folder


@pytest.fixture(scope="module")
def sheet(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sheet") / "skus.csv"
    path.write_bytes(b"\xef\xbb\xbf" + SHEET.encode("utf-8"))  # a BOM and CRLF, as spreadsheets write
    return path


def nightly(**overrides) -> GenerateConfig:
    return replace(build_config(GenerateConfig, read_recipe("tiny_nightly", "generate"), {}), **overrides)


def run(sheet: Path, workdir: Path, run_dir: Path, config: GenerateConfig | None = None, **kwargs):
    request = GenerationRequest(sheet, workdir, run_dir, templates=read_recipe("tiny_nightly", "templates"),
                                force=kwargs.pop("force", False), redo_rejected=kwargs.pop("redo_rejected", None))
    return generate(request, config or nightly(), **kwargs)


def assert_same_candidates(a: Path, b: Path) -> None:
    """Two runs drew the same candidates with the same verdicts and kept choice; images within one level,
    scores within 1e-4. Batches mix SKUs, and what shares a batch depends on batch_size and on what a
    resumed run has left: batched and single matmuls may round differently in the last bit."""
    exact = ["sku", "candidate", "seed", "passed", "kept", "path"]
    x, y = pl.read_parquet(a / "manifest.parquet"), pl.read_parquet(b / "manifest.parquet")
    assert x.select(exact).equals(y.select(exact))
    for column in ("clip_i", "dino", "clip_t"):
        assert np.allclose(x[column].to_numpy(), y[column].to_numpy(), atol=1e-4), column
    for path in x["path"]:
        image_a = np.asarray(Image.open(a / path), dtype=np.int16)
        image_b = np.asarray(Image.open(b / path), dtype=np.int16)
        assert np.abs(image_a - image_b).max() <= 1, path


@pytest.fixture(scope="module")
def finished_run(sheet, workdir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, run(sheet, workdir, run_dir)


def test_run_writes_images_manifest_and_rejects(finished_run):
    run_dir, summary = finished_run
    assert summary.skus_done == 3 and summary.rejected_rows == 4 and not summary.errors
    manifest = pl.read_parquet(run_dir / "manifest.parquet")
    assert set(manifest["sku"]) == {"RG-BAND-1", "RG-BAND-2", "../escape"}
    assert manifest.height == summary.candidates
    assert {"clip_i", "dino", "clip_t", "passed", "kept", "reason", "seed", "path", "gen_seconds"} <= set(manifest.columns)
    for row in manifest.iter_rows(named=True):
        path = (run_dir / row["path"]).resolve()
        assert path.is_file() and path.is_relative_to(run_dir.resolve())
        assert bool(row["passed"]) == (row["reason"] == "")
    wanted = {"../escape": 1, "RG-BAND-1": 2, "RG-BAND-2": 2}  # n_images column, else the recipe's 2
    for sku, group in manifest.group_by("sku"):
        sku = sku[0]
        assert group.filter(pl.col("kept"))["passed"].all()
        assert group["kept"].sum() == min(wanted[sku], group["passed"].sum())
        # More candidates than k only when fewer than k passed among the first k.
        assert group.height == wanted[sku] or group.head(wanted[sku])["passed"].sum() < wanted[sku]
    assert summary.kept == manifest["kept"].sum() and summary.kept > 0
    with Image.open(run_dir / manifest["path"][0]) as image:
        assert image.text["sku"] == manifest["sku"][0]
        assert image.text["seed"] == str(manifest["seed"][0])
        assert "Negative prompt:" in image.text["parameters"]
    rejects = pl.read_csv(run_dir / "rejects.csv")
    assert rejects["line"].to_list() == [5, 6, 7, 8]
    assert "duplicate" in rejects["reason"][0] and "no trained adapter" in rejects["reason"][1]
    assert "hexagon" in rejects["reason"][2] and "setting" in rejects["reason"][3]
    assert (run_dir / "manifest.csv").is_file()


def test_prompt_fills_the_template_and_scores_use_the_noun(finished_run):
    run_dir, _ = finished_run
    row = pl.read_parquet(run_dir / "manifest.parquet").filter(pl.col("sku") == "RG-BAND-2").row(0, named=True)
    assert row["prompt"].endswith("band ring in silver, side view, on linen")
    token = row["prompt"].split()[3]
    assert token not in row["clip_t_prompt"].split() and "ring" in row["clip_t_prompt"]


def test_finished_run_rerun_does_nothing(finished_run, sheet, workdir):
    run_dir, _ = finished_run
    stamp = (run_dir / "manifest.parquet").stat().st_mtime_ns
    summary = run(sheet, workdir, run_dir)
    assert summary.skus_done == 0 and summary.skus_already_done == 3
    assert (run_dir / "manifest.parquet").stat().st_mtime_ns == stamp


def test_a_rerun_finishes_a_manifest_a_kill_left_half_written(finished_run, sheet, workdir, tmp_path):
    """A kill between the Parquet's rename and the CSV's write: the rerun writes the CSV, and no summary
    names a file that is not there."""
    import shutil

    from catalog_gen.report_text import generation_summary_lines

    original, _ = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    (run_dir / "manifest.csv").unlink()
    summary = run(sheet, workdir, run_dir)
    assert summary.skus_done == 0 and (run_dir / "manifest.csv").is_file()
    assert pl.read_csv(run_dir / "manifest.csv").height == pl.read_parquet(run_dir / "manifest.parquet").height

    (run_dir / "manifest.csv").unlink()
    (run_dir / "manifest.parquet").unlink()
    empty = replace(summary, run_dir=tmp_path / "nothing-here")
    assert not any("manifest" in line for line in generation_summary_lines(empty))


def test_resume_after_a_crash_equals_an_uninterrupted_run(finished_run, sheet, workdir, tmp_path):
    reference, _ = finished_run
    with pytest.raises(InterruptedError):
        run(sheet, workdir, tmp_path, progress=crash_after_skus(1))
    assert len(list((tmp_path / "parts").glob("*.parquet"))) == 1
    summary = run(sheet, workdir, tmp_path)
    assert summary.skus_done == 2 and summary.skus_already_done == 1
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".") and p.is_file() and p.name != ".run.lock"], \
        "temporary files left"
    assert_same_candidates(tmp_path, reference)


def test_images_do_not_depend_on_batch_size(finished_run, sheet, workdir, tmp_path):
    reference, _ = finished_run
    run(sheet, workdir, tmp_path, nightly(batch_size=1))
    assert_same_candidates(tmp_path, reference)


def test_changed_settings_refuse_the_run_folder(finished_run, sheet, workdir):
    from catalog_gen.errors import CatalogError

    run_dir, _ = finished_run
    with pytest.raises(CatalogError, match="different settings"):
        run(sheet, workdir, run_dir, nightly(inference_steps=3))


def test_unloading_the_adapter_leaves_the_base_model_unchanged(workdir, tiny_model):
    from catalog_gen.train.adapters import read_adapter
    from catalog_gen.train.lora_files import DIFFUSERS_WEIGHTS_NAME
    from catalog_gen.models.loading import load_pipeline
    from catalog_gen.models.sampling import draw

    pipeline = load_pipeline(tiny_model)
    prompt = read_adapter(workdir / "adapters" / "ring" / "band").record["instance_prompt"]
    base = np.asarray(draw(pipeline, [prompt], [7], steps=4, resolution=64)[0])
    pipeline.load_lora_weights(str(workdir / "adapters" / "ring" / "band"), weight_name=DIFFUSERS_WEIGHTS_NAME,
                               adapter_name="sku_adapter")
    tuned = np.asarray(draw(pipeline, [prompt], [7], steps=4, resolution=64)[0])
    pipeline.unload_lora_weights()
    after = np.asarray(draw(pipeline, [prompt], [7], steps=4, resolution=64)[0])
    assert not np.array_equal(base, tuned)
    assert np.array_equal(base, after)


def test_gates_that_cannot_pass_draw_extra_candidates_and_keep_none(sheet, workdir, tmp_path):
    summary = run(sheet, workdir, tmp_path, nightly(calibrate=False, min_clip_i=1.0, max_extra=1))
    manifest = pl.read_parquet(tmp_path / "manifest.parquet")
    assert summary.kept == 0 and not manifest["passed"].any()
    # Each SKU drew its k candidates plus the one extra allowed.
    counts = dict(manifest.group_by("sku").len().iter_rows())
    assert counts == {"RG-BAND-1": 3, "RG-BAND-2": 3, "../escape": 2}
    assert all("CLIP-I" in reason for reason in manifest["reason"])
    assert summary.failed_by_gate["clip_i"] == manifest.height


def test_a_broken_adapter_fails_its_skus_not_the_run(sheet, workdir, tmp_path_factory, tmp_path):
    import shutil

    broken = tmp_path_factory.mktemp("broken-work")
    shutil.copytree(workdir / "adapters", broken / "adapters")
    shutil.copytree(workdir / "datasets", broken / "datasets")
    (broken / "adapters" / "ring" / "signet" / "pytorch_lora_weights.safetensors").write_bytes(b"not weights")
    summary = run(sheet, broken, tmp_path)
    assert [sku for sku, _ in summary.errors] == ["../escape"]
    assert summary.skus_done == 2
    manifest = pl.read_parquet(tmp_path / "manifest.parquet")
    reason = manifest.filter(pl.col("sku") == "../escape")["reason"][0]
    assert reason.startswith("error: adapter ring/signet") and "the file changed after training" in reason


@pytest.mark.slow
def test_two_processes_equal_one(finished_run, sheet, workdir, tmp_path):
    reference, _ = finished_run
    run_dir = tmp_path / "run2"
    recipe = Path(__file__).resolve().parents[1] / "pipelines" / "tiny_nightly.toml"
    command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               "-m", "catalog_gen.cli.main", "generate", "--skus", str(sheet), "--workdir", str(workdir),
               "--run-dir", str(run_dir), "--recipe", str(recipe)]
    done = subprocess.run(command, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    columns = ["sku", "candidate", "seed", "passed", "kept", "path"]
    a = pl.read_parquet(run_dir / "manifest.parquet")
    b = pl.read_parquet(reference / "manifest.parquet")
    assert a.select(columns).equals(b.select(columns))
    assert np.allclose(a["clip_i"].to_numpy(), b["clip_i"].to_numpy(), atol=1e-5)
    for path in a["path"]:
        x = np.asarray(Image.open(run_dir / path), dtype=np.int16)
        y = np.asarray(Image.open(reference / path), dtype=np.int16)
        assert np.abs(x - y).max() <= 1, path


def _write_decisions(run_dir: Path, entries):
    rows = [{"sku": sku, "candidate": candidate, "decision": decision,
             "reason_code": "artefact" if decision == "reject" else None, "note": None, "reviewer": "test",
             "decided_at": "2026-11-23T00:00:00Z"} for sku, candidate, decision in entries]
    pl.DataFrame(rows, schema_overrides={"reason_code": pl.Utf8, "note": pl.Utf8}).write_parquet(
        run_dir / "decisions.parquet")


def test_redo_rejected_regenerates_exactly_the_rejected_skus(finished_run, sheet, workdir, tmp_path):
    import shutil

    original, _ = finished_run
    reviewed = tmp_path / "reviewed"
    shutil.copytree(original, reviewed)
    kept = pl.read_parquet(original / "manifest.parquet").filter(pl.col("kept") & (pl.col("sku") == "RG-BAND-1"))
    assert kept.height >= 1, "the fixture run keeps at least one RG-BAND-1 candidate"
    _write_decisions(reviewed, [("RG-BAND-1", int(kept["candidate"][0]), "reject"), ("../escape", 0, "approve")])
    summary = run(sheet, workdir, tmp_path / "redo", redo_rejected=reviewed)
    manifest = pl.read_parquet(tmp_path / "redo" / "manifest.parquet")
    assert set(manifest["sku"]) == {"RG-BAND-1"} and summary.skus_done == 1
    # One rejected image -> one new image wanted, drawn from new seeds.
    assert manifest["kept"].sum() <= 1 and manifest.height >= 1
    old_seeds = set(pl.read_parquet(original / "manifest.parquet").filter(pl.col("sku") == "RG-BAND-1")["seed"])
    assert not old_seeds & set(manifest["seed"])
    assert json.loads((tmp_path / "redo" / "run.json").read_text())["settings"]["redo_round"] == 1


def _fake_run(folder: Path, kept: dict[tuple[str, int], bool], redo_of: Path | None = None, round_: int = 0):
    folder.mkdir(parents=True)
    pl.DataFrame([{"sku": sku, "candidate": c, "kept": k} for (sku, c), k in kept.items()]).write_parquet(
        folder / "manifest.parquet")
    settings = {"redo_round": round_, "redo_rejected": str(redo_of) if redo_of else None}
    (folder / "run.json").write_text(json.dumps({"settings": settings}))
    return folder


def test_a_rejection_of_a_candidate_the_gates_dropped_asks_for_no_new_image(tmp_path):
    from catalog_gen.generate.redo import rejected_in

    night = _fake_run(tmp_path / "night", {("A", 0): True, ("A", 1): False, ("B", 0): False, ("B", 1): True})
    _write_decisions(night, [("A", 0, "reject"), ("A", 1, "reject"), ("B", 0, "reject"), ("B", 1, "approve")])
    assert rejected_in(night) == {"A": 1}


def test_redoing_one_reviewed_run_twice_never_reuses_a_redo_round(tmp_path):
    from catalog_gen.generate.redo import next_redo_round

    runs = tmp_path / "runs"
    night = _fake_run(runs / "night", {("A", 0): True})
    assert next_redo_round(night, runs / "redo-1") == 1
    first = _fake_run(runs / "redo-1", {("A", 0): True}, redo_of=night, round_=1)
    assert next_redo_round(night, runs / "redo-1") == 1, "a crashed redo resumes on its own seeds"
    assert next_redo_round(night, runs / "redo-again") == 2, "a second redo of the same run draws new seeds"
    _fake_run(runs / "redo-again", {("A", 0): True}, redo_of=night, round_=2)
    assert next_redo_round(first, runs / "redo-of-redo") == 3
    unrelated = _fake_run(runs / "other-night", {("A", 0): True}, round_=0)
    assert next_redo_round(unrelated, runs / "other-redo") == 1


def test_an_adapter_trained_on_another_base_is_refused_before_any_image_is_drawn(workdir, tmp_path):
    import shutil

    from catalog_gen.layout import adapter_folder

    moved = tmp_path / "work"
    shutil.copytree(workdir, moved)
    record_path = adapter_folder(moved, "ring", "signet") / "adapter.json"
    record = json.loads(record_path.read_text())
    record["base_model"]["fingerprint"] = "0123456789abcdef"
    record_path.write_text(json.dumps(record))
    sheet = tmp_path / "skus.csv"
    sheet.write_text("sku,class,instance,view,setting,metal\nS-1,ring,signet,front view,on wood,gold\n"
                     "B-1,ring,band,front view,on wood,gold\n")
    summary = run(sheet, moved, tmp_path / "refused")
    rejects = pl.read_csv(tmp_path / "refused" / "rejects.csv")
    assert rejects["sku"].to_list() == ["S-1"]
    assert "0123456789abcdef" in rejects["reason"][0] and "--allow-base-mismatch" in rejects["reason"][0]
    assert not (tmp_path / "refused" / "images" / "S-1").exists()
    manifest = pl.read_parquet(tmp_path / "refused" / "manifest.parquet")
    assert set(manifest["sku"]) == {"B-1"} and not manifest["base_mismatch"].any() and summary.skus_done == 1

    run(sheet, moved, tmp_path / "allowed", nightly(allow_base_mismatch=True))
    manifest = pl.read_parquet(tmp_path / "allowed" / "manifest.parquet")
    signet = manifest.filter(pl.col("sku") == "S-1")
    assert signet.height >= 1 and signet["base_mismatch"].all()
    assert set(signet["adapter_base_fingerprint"]) == {"0123456789abcdef"}


def test_redo_needs_a_reviewed_run(finished_run, sheet, workdir, tmp_path):
    from catalog_gen.errors import CatalogError

    with pytest.raises(CatalogError, match="no decisions.parquet"):
        run(sheet, workdir, tmp_path / "redo", redo_rejected=tmp_path)


def test_export_writes_marketplace_files(finished_run, tmp_path):
    import shutil

    from catalog_gen.errors import CatalogError

    from catalog_gen.review.export import AI_SOURCE_TYPE, export_approved

    original, _ = finished_run
    reviewed = tmp_path / "reviewed"
    shutil.copytree(original, reviewed)
    _write_decisions(reviewed, [("RG-BAND-1", 0, "approve"), ("../escape", 0, "approve"), ("RG-BAND-2", 0, "reject")])
    # The tiny model's 64 px images would be enlarged 32x: refused, naming the image, before anything is written.
    with pytest.raises(CatalogError, match=r"64x64 px image would be enlarged 32x to 2048 px.*--allow-upscale"):
        export_approved(reviewed, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    written = export_approved(reviewed, tmp_path / "out", allow_upscale=True)
    assert len(written) == 2 and all(p.resolve().is_relative_to((tmp_path / "out").resolve()) for p in written)
    for path in written:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (2048, 2048) and image.mode == "RGB"
            assert image.info.get("icc_profile")  # sRGB profile embedded
            assert AI_SOURCE_TYPE.encode() in image.info["xmp"]
            assert "photo of a" in image.getexif()[0x010E]
    listing = pl.read_csv(tmp_path / "out" / "export.csv")
    assert sorted(listing["sku"]) == ["../escape", "RG-BAND-1"] and set(listing["upscale_factor"]) == {32.0}


# ---------------------------------------------------------------- the base model's images (base_images)

@pytest.fixture(scope="module")
def base_run(sheet, workdir, tmp_path_factory):
    """The sheet again with base_images=2: every SKU also gets its first candidates' base model images."""
    run_dir = tmp_path_factory.mktemp("run-base")
    return run_dir, run(sheet, workdir, run_dir, nightly(base_images=2))


def _base_files(run_dir: Path) -> dict[str, list[str]]:
    """Per SKU folder under base/, its file names (hidden ones included: none may be left)."""
    return {folder.name: sorted(p.name for p in folder.iterdir()) for folder in (run_dir / "base").iterdir()}


def test_base_images_share_prompt_and_seed_with_their_candidates(base_run, finished_run, tiny_model):
    from catalog_gen.models.loading import load_pipeline
    from catalog_gen.models.sampling import draw, make_scheduler

    run_dir, summary = base_run
    assert not summary.errors and summary.skus_done == 3
    # Drawing the base images first changes no candidate, and they are not in the manifest.
    assert_same_candidates(run_dir, finished_run[0])
    manifest = pl.read_parquet(run_dir / "manifest.parquet")
    assert not any(path.startswith("base") for path in manifest["path"])
    # Sheet order, as generate plans them: each instance group's first candidates (escape has k=1).
    firsts = manifest.filter(pl.col("candidate") < 2).sort(["line", "candidate"])
    folders = {row["sku"]: Path(row["path"]).parent.name for row in firsts.iter_rows(named=True)}
    assert _base_files(run_dir) == {folders["RG-BAND-1"]: ["0.png", "1.png"], folders["RG-BAND-2"]: ["0.png", "1.png"],
                                    folders["../escape"]: ["0.png"]}
    # What the plain base pipeline draws for each candidate's prompt and seed, with the run's settings, in
    # the run's batches (one per instance: batched and single matmuls may round differently).
    config = nightly()
    pipeline = load_pipeline(tiny_model)
    pipeline.scheduler = make_scheduler(config.scheduler, pipeline.scheduler.config)
    groups = [group for _, group in firsts.group_by("instance", maintain_order=True)]
    expected = [image for group in groups for image in draw(
        pipeline, group["prompt"].to_list(), group["seed"].to_list(), steps=config.inference_steps, resolution=config.resolution,
        guidance=config.guidance, negative_prompt=config.negative_prompt, batch_size=config.batch_size)]
    rows = [row for group in groups for row in group.iter_rows(named=True)]
    for row, wanted in zip(rows, expected, strict=True):
        with Image.open(run_dir / "base" / folders[row["sku"]] / f"{row['candidate']}.png") as image:
            assert image.text["seed"] == str(row["seed"]) and image.text["prompt"] == row["prompt"]
            assert image.text["adapter_hash"].startswith("none") and "Lora hash" not in image.text["parameters"]
            base = np.asarray(image.convert("RGB"), dtype=np.int16)
        with Image.open(run_dir / row["path"]) as image:
            assert image.size == (config.resolution, config.resolution) == base.shape[1::-1]
            tuned = np.asarray(image.convert("RGB"), dtype=np.int16)
        wanted = np.asarray(wanted, dtype=np.int16)
        assert np.abs(base - wanted).max() <= 1, row["sku"]
        # The adapter changed the image: by far more than any rounding (4 training steps: a small change).
        assert (base != tuned).sum() > 3 * max(1, (base != wanted).sum()), row["sku"]


def test_no_base_images_unless_asked(finished_run):
    run_dir, _ = finished_run
    assert not (run_dir / "base").exists()


def test_resume_draws_only_the_missing_base_images(base_run, sheet, workdir, tmp_path, monkeypatch):
    import shutil

    from catalog_gen.generate import generation

    original, _ = base_run
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)  # copy2: the files keep their modification times
    folder = "RG-BAND-2"
    # A crash after RG-BAND-2's first base image: no part, no candidates, and base image 1 missing.
    (run_dir / "parts" / f"{folder}.parquet").unlink()
    shutil.rmtree(run_dir / "images" / folder)
    (run_dir / "base" / folder / "1.png").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "base").rglob("*.png")}
    drawn: list[list[str]] = []
    real_draw = generation._draw
    monkeypatch.setattr(generation, "_draw", lambda context, prompts, seeds: drawn.append(list(prompts))
                        or real_draw(context, prompts, seeds))
    summary = run(sheet, workdir, run_dir, nightly(base_images=2))
    assert summary.skus_done == 1 and summary.skus_already_done == 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "a base image was redrawn"
    assert len(drawn[0]) == 1  # the one missing base image, before the adapter's candidates
    assert _base_files(run_dir) == _base_files(original)
    again = np.asarray(Image.open(run_dir / "base" / folder / "1.png"), dtype=np.int16)
    assert np.abs(again - np.asarray(Image.open(original / "base" / folder / "1.png"), dtype=np.int16)).max() <= 1
    assert_same_candidates(run_dir, original)


def test_force_deletes_the_base_images(tmp_path):
    from catalog_gen.generate.generation import _claim_run_dir

    image = tmp_path / "base" / "SKU-1" / "0.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"old")
    request = GenerationRequest(tmp_path / "skus.csv", tmp_path, tmp_path, force=True)
    _claim_run_dir(tmp_path, nightly(base_images=1), request, 0)
    assert not (tmp_path / "base").exists() and (tmp_path / "run.json").is_file()


def test_report_shows_the_base_strip_only_when_there_are_base_images(base_run, finished_run, tmp_path):
    import re
    import shutil
    from urllib.parse import unquote, urlsplit

    from catalog_gen.review.report import write_report

    for source, with_base in ((base_run[0], True), (finished_run[0], False)):
        run_dir = tmp_path / source.name
        shutil.copytree(source, run_dir)  # the report is written into the run folder
        index = write_report(run_dir).index
        html = index.read_text()
        cards = html.split('<article class="card"')[1:]
        assert len(cards) == 3 and all('<h3>Fine-tuned</h3><div class="cands">' in card for card in cards)
        strips = [re.search(r'<section class="strip base-strip">(.*?)</section>', card, re.S) for card in cards]
        if not with_base:
            assert strips == [None] * 3 and "Base model" not in html
            continue
        assert all(strips)
        for card, strip in zip(cards, strips):
            # Reference photos first, then the base model's images, then the fine-tuned candidates.
            assert card.index("Reference photos") < card.index("Base model (same prompt and seed)") < card.index("Fine-tuned")
            links = re.findall(r'<a class="thumb" href="([^"]+)"[^>]*><img src="([^"]+)"', strip.group(1))
            folder = unquote(links[0][0]).split("/")[2]
            assert [unquote(link) for link, _ in links] == [f"../base/{folder}/{n}.png" for n in range(len(links))]
            assert len(links) == len(list((run_dir / "base" / folder).iterdir()))
            for url in (url for pair in links for url in pair):
                parts = urlsplit(url)
                assert not parts.scheme and not parts.netloc and not url.startswith("/"), url
                assert (index.parent / unquote(parts.path)).resolve().is_file(), url
        assert sorted(len(re.findall('class="base-image"', strip.group(1))) for strip in strips) == [1, 2, 2]


def test_base_images_must_not_be_negative():
    from catalog_gen.errors import CatalogError

    with pytest.raises(CatalogError, match="base_images must be >= 0, got -1"):
        GenerateConfig(base_images=-1)


def test_a_rerun_removes_what_a_killed_run_left_half_written(finished_run, sheet, workdir, tmp_path):
    import shutil

    original, _ = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    sku_folder = next(p for p in (run_dir / "images").iterdir() if p.is_dir())
    leftovers = [sku_folder / ".0.png.x1y2.png", run_dir / ".manifest.parquet.ab12.parquet",
                 run_dir / "parts" / ".RG-BAND-1.parquet.cd34.parquet"]
    for path in leftovers:
        path.write_bytes(b"")
    kept = [run_dir / ".decisions.parquet.ef56.parquet"]  # the review server's, not generate's to remove
    kept[0].write_bytes(b"")
    run(sheet, workdir, run_dir)
    assert not any(path.exists() for path in leftovers) and all(path.exists() for path in kept)


def test_a_second_generate_on_a_busy_run_folder_is_refused(finished_run, sheet, workdir, tmp_path):
    import shutil

    from catalog_gen.errors import CatalogError
    from catalog_gen.storage import exclusive_lock

    original, _ = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    with exclusive_lock(run_dir / ".run.lock"):  # as the first night's generate holds it
        with pytest.raises(CatalogError, match="another catalog generate is working on"):
            run(sheet, workdir, run_dir)
    assert run(sheet, workdir, run_dir).skus_already_done == 3
