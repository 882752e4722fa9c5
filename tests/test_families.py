"""Model families: SD 1.x and SD 2.x (v-prediction) read from the model folder, other families refused by name,
and DreamBooth-LoRA end to end on the tiny-sd2 preset (train, reload in plain diffusers, catalog generate)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from catalog_gen.errors import CatalogError
from catalog_gen.models.family import ModelFamily, check_adapter_family, detect_family
from catalog_gen.models.loading import resolve_base_model


@pytest.fixture(scope="session")
def tiny_sd2():
    return resolve_base_model("tiny-sd2")


def test_the_family_is_read_from_the_folder(tiny_model, tiny_sd2):
    assert resolve_base_model("tiny").family == ModelFamily("sd1", "epsilon")
    assert tiny_sd2.family == ModelFamily("sd2", "v_prediction")
    assert tiny_sd2.family.label == "SD 2.x (v-prediction)"
    scheduler = json.loads((tiny_sd2.path / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"


def _folder_like(model, tmp_path: Path, index: dict | None = None, scheduler: dict | None = None) -> Path:
    folder = shutil.copytree(model.path, tmp_path / "model")
    if index is not None:
        (folder / "model_index.json").write_text(json.dumps(index))
    if scheduler is not None:
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **scheduler}))
    return folder


@pytest.mark.parametrize(("pipeline_class", "named"), [
    ("StableDiffusionXLPipeline", "is SDXL (StableDiffusionXLPipeline)"),
    ("StableDiffusion3Pipeline", "is SD3 (StableDiffusion3Pipeline)"),
    ("FluxPipeline", "is Flux (FluxPipeline)"),
    ("WuerstchenPipeline", "is a WuerstchenPipeline folder (WuerstchenPipeline)"),
])
def test_another_family_is_refused_by_name(tiny_model, tmp_path, pipeline_class, named):
    # Only model_index.json: an SD3 or Flux folder has no unet/, and the family must be named before that is.
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    with pytest.raises(CatalogError) as caught:
        resolve_base_model(str(folder))
    message = str(caught.value)
    assert named in message and "catalog-gen trains SD 1.x, SD 2.x" in message and "\n" not in message


def test_a_scheduler_that_predicts_the_sample_is_refused(tiny_model, tmp_path):
    folder = _folder_like(tiny_model, tmp_path, scheduler={"prediction_type": "sample"})
    with pytest.raises(CatalogError, match="its scheduler predicts 'sample'; catalog-gen trains epsilon and "
                                           "v_prediction models"):
        detect_family(folder, "mine")


def test_the_v_prediction_target_is_the_velocity():
    """v = sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * latents (Salimans & Ho), per sample's timestep."""
    from diffusers import DDPMScheduler

    from catalog_gen.models.presets import SD_SCHEDULER
    from catalog_gen.train.losses import training_target

    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 900])
    v_scheduler = DDPMScheduler(**{**SD_SCHEDULER, "prediction_type": "v_prediction"})
    alpha_bar = v_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    by_hand = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    assert torch.allclose(training_target(v_scheduler, latents, noise, timesteps), by_hand, atol=1e-6)
    assert torch.equal(training_target(DDPMScheduler(**SD_SCHEDULER), latents, noise, timesteps), noise)
    with pytest.raises(CatalogError, match="prediction_type 'sample' is not trained here"):
        training_target(DDPMScheduler(**{**SD_SCHEDULER, "prediction_type": "sample"}), latents, noise, timesteps)


def test_an_adapter_of_another_family_is_refused_naming_both():
    sd2 = ModelFamily("sd2", "v_prediction")
    check_adapter_family({"family": "sd2", "spec": "a"}, sd2, "adapter ring/band", "b")
    check_adapter_family({"spec": "old"}, sd2, "adapter ring/band", "b")  # recorded before families: passes
    with pytest.raises(CatalogError, match=r"adapter ring/band was trained on SD 1.x \('tiny'\); base model "
                                           r"'tiny-sd2' is SD 2.x \(v-prediction\)"):
        check_adapter_family({"family": "sd1", "spec": "tiny"}, sd2, "adapter ring/band", "tiny-sd2")


# ---------------------------------------------------------------- end to end on tiny-sd2 (slow)

@pytest.fixture(scope="module")
def sd2_adapter(sample_catalogue, tmp_path_factory):
    from catalog_gen.train.adapters import read_adapter
    from catalog_gen.train.workflow import train_class
    from test_training import _source, tiny_config

    workdir = tmp_path_factory.mktemp("sd2")
    config = tiny_config(base_model="tiny-sd2", validation_images=0)
    summary = train_class(_source(sample_catalogue), "ring", ["band"], workdir, config)
    assert [o.status for o in summary.outcomes] == ["trained"], summary.outcomes
    return workdir, config, read_adapter(workdir / "adapters" / "ring" / "band")


@pytest.mark.slow
def test_sd2_trains_and_records_its_family(sd2_adapter):
    _, _, adapter = sd2_adapter
    assert adapter.record["base_model"]["family"] == "sd2"
    assert adapter.record["base_model"]["prediction_type"] == "v_prediction"
    assert all(np.isfinite(adapter.record["loss_curve"]))


@pytest.mark.slow
def test_an_sd2_adapter_loads_in_plain_diffusers_as_in_generation(sd2_adapter, tiny_sd2):
    from diffusers import StableDiffusionPipeline

    from catalog_gen.models.loading import load_pipeline
    from catalog_gen.models.sampling import draw
    from catalog_gen.train.adapters import adapter_weights, attach, detach

    _, _, adapter = sd2_adapter
    ours = load_pipeline(tiny_sd2, "cpu")
    plain = StableDiffusionPipeline.from_pretrained(tiny_sd2.path, local_files_only=True, safety_checker=None,
                                                    requires_safety_checker=False)
    assert plain.scheduler.config.prediction_type == "v_prediction"

    def image(pipeline):
        return np.asarray(draw(pipeline, [adapter.record["instance_prompt"]], [3], steps=3, resolution=64)[0])

    base = image(plain)
    plain.load_lora_weights(str(adapter.folder), weight_name=adapter.diffusers_file.name)
    with_lora = image(plain)
    assert not np.array_equal(with_lora, base)
    attached = attach(ours, adapter_weights(adapter), "sku_adapter")
    assert np.array_equal(image(ours), with_lora)
    detach(ours, attached)
    assert np.array_equal(image(ours), base)


@pytest.mark.slow
def test_catalog_generate_runs_on_sd2_and_refuses_an_sd1_adapter(sd2_adapter, sample_catalogue, tmp_path):
    import polars as pl

    from catalog_gen.config import GenerateConfig, build_config, read_recipe
    from catalog_gen.generate.generation import GenerationRequest, generate
    from catalog_gen.train.workflow import train_class
    from test_training import _source, tiny_config

    workdir, _, _ = sd2_adapter
    config = replace(build_config(GenerateConfig, read_recipe("tiny_nightly", "generate"), {}), base_model="tiny-sd2",
                     n_images=1, max_extra=0, allow_base_mismatch=True)
    sheet = tmp_path / "skus.csv"
    sheet.write_text("sku,class,instance,metal,view,setting\nRG-BAND-1,ring,band,gold,front view,on marble\n")
    summary = generate(GenerationRequest(sheet, workdir, tmp_path / "run"), config)
    assert not summary.errors and summary.candidates == 1
    assert len(pl.read_parquet(tmp_path / "run" / "manifest.parquet")) == 1
    # An SD 1.x adapter on the SD 2.x base: refused for its SKU, naming both, even with allow_base_mismatch.
    sd1 = tmp_path / "sd1"
    train_class(_source(sample_catalogue), "ring", ["band"], sd1, tiny_config(steps=2, validation_images=0))
    summary = generate(GenerationRequest(sheet, sd1, tmp_path / "run-sd1"), config)
    assert summary.rejected_rows == 1 and summary.candidates == 0
    [reason] = pl.read_csv(tmp_path / "run-sd1" / "rejects.csv")["reason"].to_list()
    assert "adapter ring/band was trained on SD 1.x ('tiny'); base model 'tiny-sd2' is SD 2.x" in reason
