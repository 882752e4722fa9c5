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
    ("StableDiffusionXLImg2ImgPipeline", "is the SDXL refiner (StableDiffusionXLImg2ImgPipeline)"),
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
    assert named in message and "catalog-gen trains SD 1.x, SD 2.x, SDXL" in message and "\n" not in message


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


# ---------------------------------------------------------------- end to end on tiny-sd2 and tiny-sdxl (slow)

EXPECTED = {"tiny-sd2": ("sd2", "v_prediction", "StableDiffusionPipeline", "SD 2.x (v-prediction)"),
            "tiny-sdxl": ("sdxl", "epsilon", "StableDiffusionXLPipeline", "SDXL")}


@pytest.fixture(scope="module", params=list(EXPECTED))
def trained_on(request, sample_catalogue, tmp_path_factory):
    """ring/band's DreamBooth-LoRA on each family's tiny preset, prior preservation on (SDXL's class images are
    drawn by its own pipeline)."""
    from catalog_gen.train.adapters import read_adapter
    from catalog_gen.train.workflow import train_class
    from test_training import _source, tiny_config

    workdir = tmp_path_factory.mktemp(request.param)
    config = tiny_config(base_model=request.param, validation_images=0, prior_preservation=True,
                         num_class_images=2, class_image_steps=2)
    summary = train_class(_source(sample_catalogue), "ring", ["band"], workdir, config)
    assert [o.status for o in summary.outcomes] == ["trained"], summary.outcomes
    return request.param, workdir, read_adapter(workdir / "adapters" / "ring" / "band")


@pytest.mark.slow
def test_each_family_trains_and_records_it(trained_on):
    preset, _, adapter = trained_on
    family, prediction, _, _ = EXPECTED[preset]
    assert adapter.record["base_model"]["family"] == family
    assert adapter.record["base_model"]["prediction_type"] == prediction
    assert all(np.isfinite(adapter.record["loss_curve"]))


@pytest.mark.slow
def test_the_adapter_loads_in_the_familys_plain_diffusers_pipeline_as_in_generation(trained_on):
    """The matching pipeline class loads the diffusers file and the kohya file to the same image the generator
    draws; detach gives the base model's image back."""
    import diffusers

    from catalog_gen.models.loading import load_pipeline
    from catalog_gen.models.sampling import draw
    from catalog_gen.train.adapters import adapter_weights, attach, detach

    preset, _, adapter = trained_on
    model = resolve_base_model(preset)
    pipeline_class = EXPECTED[preset][2]
    ours = load_pipeline(model, "cpu")
    assert type(ours).__name__ == pipeline_class
    extra = {"safety_checker": None, "requires_safety_checker": False} if pipeline_class == "StableDiffusionPipeline" else {}
    plain = getattr(diffusers, pipeline_class).from_pretrained(model.path, local_files_only=True, **extra)
    assert plain.scheduler.config.prediction_type == EXPECTED[preset][1]

    def image(pipeline):
        return np.asarray(draw(pipeline, [adapter.record["instance_prompt"]], [3], steps=3, resolution=64)[0])

    base = image(plain)
    plain.load_lora_weights(str(adapter.folder), weight_name=adapter.diffusers_file.name)
    with_lora = image(plain)
    plain.unload_lora_weights()
    assert not np.array_equal(with_lora, base)
    plain.load_lora_weights(str(adapter.folder), weight_name=adapter.kohya_file.name)
    assert np.array_equal(image(plain), with_lora)  # the kohya file: the same image
    # The generator's own pipeline: within one level of plain diffusers' (our loader moves unaligned CPU weights
    # into aligned memory, where MKL rounds differently: models.loading.own_aligned_memory), the base model's
    # image exactly again after detach.
    ours_base = image(ours)
    attached = attach(ours, adapter_weights(adapter), "sku_adapter")
    assert np.abs(image(ours).astype(int) - with_lora).max() <= 1
    detach(ours, attached)
    assert np.array_equal(image(ours), ours_base) and np.abs(ours_base.astype(int) - base).max() <= 1


@pytest.mark.slow
def test_catalog_generate_runs_on_each_family_and_refuses_an_sd1_adapter(trained_on, sample_catalogue, tmp_path):
    import polars as pl

    from catalog_gen.config import GenerateConfig, build_config, read_recipe
    from catalog_gen.generate.generation import GenerationRequest, generate
    from catalog_gen.train.workflow import train_class
    from test_training import _source, tiny_config

    preset, workdir, _ = trained_on
    config = replace(build_config(GenerateConfig, read_recipe("tiny_nightly", "generate"), {}), base_model=preset,
                     n_images=1, max_extra=0, base_images=1, allow_base_mismatch=True)
    sheet = tmp_path / "skus.csv"
    sheet.write_text("sku,class,instance,metal,view,setting\nRG-BAND-1,ring,band,gold,front view,on marble\n")
    summary = generate(GenerationRequest(sheet, workdir, tmp_path / "run"), config)
    assert not summary.errors and summary.candidates == 1
    assert len(pl.read_parquet(tmp_path / "run" / "manifest.parquet")) == 1
    # An SD 1.x adapter on this base: refused for its SKU, naming both, even with allow_base_mismatch.
    sd1 = tmp_path / "sd1"
    train_class(_source(sample_catalogue), "ring", ["band"], sd1, tiny_config(steps=2, validation_images=0))
    summary = generate(GenerationRequest(sheet, sd1, tmp_path / "run-sd1"), config)
    assert summary.rejected_rows == 1 and summary.candidates == 0
    [reason] = pl.read_csv(tmp_path / "run-sd1" / "rejects.csv")["reason"].to_list()
    assert (f"adapter ring/band was trained on SD 1.x ('tiny'); base model '{preset}' is {EXPECTED[preset][3]}"
            in reason)


def test_sdxl_conditions_the_unet_on_both_encoders_pooled_text_and_size():
    """Both encoders' penultimate hidden states side by side, the second's pooled projection, and
    (res, res, 0, 0, res, res): what StableDiffusionXLPipeline gives the UNet for the same prompt."""
    from catalog_gen.config import TrainConfig
    from catalog_gen.train import training

    model = resolve_base_model("tiny-sdxl")
    components = training.load_components(model, TrainConfig(base_model="tiny-sdxl", mixed_precision="no"),
                                          torch.device("cpu"))
    ids = training.tokenize(components, ["photo of a ring", "photo of a pair of hoops"])
    assert ids.shape == (2, 2, 77)
    hidden, pooled = training.encode_text(components, ids)
    from catalog_gen.models.sampling import pipeline_from_components

    pipeline = pipeline_from_components(components)
    expected, _, expected_pooled, _ = pipeline.encode_prompt(["photo of a ring", "photo of a pair of hoops"],
                                                             device="cpu", do_classifier_free_guidance=False)
    assert hidden.shape == (2, 77, 32 + 48) and torch.allclose(hidden, expected, atol=1e-6)  # both encoders
    assert pooled.shape == (2, 48) and torch.allclose(pooled, expected_pooled, atol=1e-6)
    time_ids = training.micro_conditioning(components, 64, 2)
    expected_ids = pipeline._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32,
                                              components.text_encoder_2.config.projection_dim)
    assert torch.equal(time_ids, expected_ids.repeat(2, 1))


@pytest.mark.slow
def test_sdxl_text_encoder_lora_trains_both_encoders_resumes_exactly_and_loads_in_plain_diffusers(
        sample_catalogue, tmp_path):
    """train_text_encoder on SDXL: a LoRA on each text encoder (kohya's te1 and te2), exact resume after a crash,
    and plain StableDiffusionXLPipeline draws with either file what the generator draws."""
    import diffusers
    from conftest import crash_in_training_step
    from safetensors.torch import load_file

    from catalog_gen.models.loading import load_pipeline
    from catalog_gen.models.sampling import draw
    from catalog_gen.train.adapters import adapter_weights, attach, detach, read_adapter
    from catalog_gen.train.workflow import train_class
    from test_training import _source, tiny_config

    config = tiny_config(base_model="tiny-sdxl", train_text_encoder=True, text_encoder_lr=1e-2, validation_images=0)
    source = _source(sample_catalogue)
    train_class(source, "ring", ["band"], tmp_path / "whole", config)
    with pytest.raises(InterruptedError):
        train_class(source, "ring", ["band"], tmp_path / "resumed", config, progress=crash_in_training_step(4))
    train_class(source, "ring", ["band"], tmp_path / "resumed", config, resume=True)
    whole, resumed = (read_adapter(tmp_path / run / "adapters" / "ring" / "band") for run in ("whole", "resumed"))
    assert resumed.record["resumed_from_step"] == 2 and resumed.record["loss_curve"] == whole.record["loss_curve"]
    tensors = load_file(str(whole.diffusers_file))
    again = load_file(str(resumed.diffusers_file))
    assert tensors.keys() == again.keys() and all(torch.equal(tensors[k], again[k]) for k in tensors)
    assert {key.split(".")[0] for key in tensors} == {"unet", "text_encoder", "text_encoder_2"}
    # Both encoders' LoRAs learned (peft starts each B at zero).
    for part in ("text_encoder.", "text_encoder_2."):
        assert any(k.startswith(part) and "lora_B" in k and tensors[k].abs().max() > 0 for k in tensors), part
    for part in ("text_encoder", "text_encoder_2"):  # CLIP's standard names (lora_files.text_model_names)
        assert all(k.startswith(f"{part}.text_model.encoder.layers.") for k in tensors if k.split(".")[0] == part)
    kohya = load_file(str(whole.kohya_file))
    assert {key.split("_")[1] for key in kohya} == {"unet", "te1", "te2"}
    assert all(k.startswith(("lora_unet_", "lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_"))
               for k in kohya)
    # sd-scripts' SDXL names: the UNet's SGM blocks (tiny-sdxl attends at its second level: input_blocks.3-4,
    # output_blocks.0-1, the middle block), not diffusers' down_blocks / up_blocks.
    unet_modules = {key.split(".")[0] for key in kohya if key.startswith("lora_unet_")}
    assert unet_modules and all(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                              "lora_unet_output_blocks_")) for m in unet_modules)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in unet_modules

    model = resolve_base_model("tiny-sdxl")
    plain = diffusers.StableDiffusionXLPipeline.from_pretrained(model.path, local_files_only=True)

    def image(pipeline):
        return np.asarray(draw(pipeline, [whole.record["instance_prompt"]], [3], steps=3, resolution=64)[0]).astype(int)

    def encoded(pipeline):
        ids = pipeline.tokenizer([whole.record["instance_prompt"]], padding="max_length", max_length=77,
                                 return_tensors="pt").input_ids
        with torch.no_grad():
            return pipeline.text_encoder(ids)[0], pipeline.text_encoder_2(ids)[0]

    base, base_text = image(plain), encoded(plain)
    plain.load_lora_weights(str(whole.folder), weight_name=whole.diffusers_file.name)
    with_lora = image(plain)
    # Each text encoder's LoRA is on in plain diffusers, not left out under names it does not match.
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(encoded(plain), base_text))
    plain.unload_lora_weights()
    plain.load_lora_weights(str(whole.folder), weight_name=whole.kohya_file.name)
    assert np.array_equal(image(plain), with_lora) and not np.array_equal(with_lora, base)
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(encoded(plain), base_text))
    ours = load_pipeline(model, "cpu")
    attached = attach(ours, adapter_weights(whole), "sku_adapter")
    assert np.abs(image(ours) - with_lora).max() <= 1  # see the family test above on aligned memory
    detach(ours, attached)


@pytest.mark.slow
def test_catalog_eval_scores_each_familys_checkpoints(trained_on):
    import polars as pl

    from catalog_gen.config import build_config, read_recipe
    from catalog_gen.evaluate.evaluation import EvalConfig, run_eval

    _, workdir, _ = trained_on
    out = run_eval(workdir, "ring", ["band"], build_config(EvalConfig, read_recipe("tiny_sweep", "eval"), {}))
    table = pl.read_parquet(out / "eval.parquet")
    assert table["step"].to_list() == [2, 4, 6] and table["clip_i"].is_finite().all()
    assert table["fid_base"][0] != table["fid_base"][2]  # each checkpoint's own weights drew its images


def test_an_fp16_vae_that_overflows_encodes_in_fp32_and_stays_fp16():
    """SDXL's VAE says force_upcast: under fp16 training the photos are encoded in fp32 (here: the same latents
    as an fp32 VAE with the fp16 weights), and the VAE is fp16 again afterwards, as SDXL's pipeline leaves it."""
    from catalog_gen.config import TrainConfig
    from catalog_gen.train import training

    model = resolve_base_model("tiny-sdxl")
    components = training.load_components(model, TrainConfig(base_model="tiny-sdxl", mixed_precision="no"),
                                          torch.device("cpu"))
    assert components.vae.config.force_upcast
    photos = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    components.vae.to(torch.float16)
    mean, std = training.encode_latent_distribution(components, photos)
    assert components.vae.dtype == torch.float16 and mean.dtype == torch.float32
    components.vae.to(torch.float32)  # the same (fp16-rounded) weights in fp32
    expected, _ = training.encode_latent_distribution(components, photos)
    assert torch.allclose(mean, expected, rtol=0, atol=1e-6)  # an fp16 encode is off by ~1e-3


@pytest.mark.slow
def test_catalog_compare_runs_on_sdxl(sample_catalogue, tmp_path):
    """compare (a sweep over the method) trains and scores SDXL adapters through the same calls as SD 1.x's."""
    import polars as pl
    from typer.testing import CliRunner

    from catalog_gen.cli.main import app
    from catalog_gen.config import _recipe_path

    recipe = tmp_path / "compare.toml"
    recipe.write_text(_recipe_path("tiny_sweep").read_text().replace('base_model = "tiny"', 'base_model = "tiny-sdxl"'))
    assert 'base_model = "tiny-sdxl"' in recipe.read_text()
    result = CliRunner().invoke(app, [
        "compare", "--class", "ring", "--instance", "band", "--photos", str(sample_catalogue.photos_dir),
        "--products", str(sample_catalogue.products_csv), "--workdir", str(tmp_path), "--recipe", str(recipe),
        "--methods", "dreambooth-lora,lora-captions,two-stage", "--quiet"])
    assert result.exit_code == 0, result.output
    table = pl.read_parquet(tmp_path / "sweeps" / "compare-ring-band" / "compare.parquet")
    assert table["method"].to_list() == ["base model (no fine-tuning)", "dreambooth-lora", "lora-captions", "two-stage"]
    assert table["clip_i"].is_finite().all() and table["kid_photos"].is_finite().all()
    records = [json.loads(p.read_text()) for p in tmp_path.glob("sweeps/*/points/*/adapters/ring/band/adapter.json")]
    assert {r["base_model"]["family"] for r in records} == {"sdxl"} and len(records) == 3


@pytest.mark.slow
def test_full_dreambooth_on_sd2_writes_no_single_file_and_says_why(sample_catalogue, tmp_path):
    """SD 2.x's original checkpoint keeps OpenCLIP-H's last layer, which its diffusers text encoder lacks."""
    from catalog_gen.train.adapters import read_adapter
    from catalog_gen.train.workflow import train_class
    from test_training import _source, tiny_config

    train_class(_source(sample_catalogue), "ring", ["band"], tmp_path,
                tiny_config(base_model="tiny-sd2", method="dreambooth", steps=2, validation_images=0))
    info = read_adapter(tmp_path / "adapters" / "ring" / "band")
    assert info.single_file is None and info.full_parts == ["unet"]
    [note] = info.record["notes"]
    assert note.startswith("no single-file checkpoint: catalog-gen writes SD 1.x's and SDXL's, this base model is sd2")
