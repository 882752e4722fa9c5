"""DreamBooth-LoRA training end to end on the tiny preset (CPU, a few seconds per run)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import crash_in_training_step
import torch
from safetensors.torch import load_file

from catalog_gen.train.adapters import read_adapter
from catalog_gen.train.checkpoints import list_checkpoints
from catalog_gen.config import TrainConfig, build_config, read_recipe
from catalog_gen.errors import CatalogError
from catalog_gen.train.workflow import PhotoSource, train_class

INSTANCES = ["band", "signet"]


def tiny_config(**overrides) -> TrainConfig:
    base = build_config(TrainConfig, read_recipe("tiny_demo", "train"), {})
    settings = dict(steps=6, checkpoint_every=2, validation_images=1, validation_steps=2)
    settings.update(overrides)
    return replace(base, **settings)


def _source(sample_catalogue) -> PhotoSource:
    return PhotoSource(photos_dir=sample_catalogue.photos_dir, products_csv=sample_catalogue.products_csv)


@pytest.fixture(scope="module")
def trained(sample_catalogue, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("train")
    summary = train_class(_source(sample_catalogue), "ring", INSTANCES, workdir, tiny_config())
    return workdir, summary


def _pipeline_image(pipeline, prompt: str) -> torch.Tensor:
    out = pipeline(prompt, num_inference_steps=3, height=64, width=64, output_type="pt",
                   generator=torch.Generator().manual_seed(0))
    return out.images[0]


def test_training_writes_every_output(trained):
    workdir, summary = trained
    assert [o.status for o in summary.outcomes] == ["trained", "trained"]
    for instance in INSTANCES:
        info = read_adapter(workdir / "adapters" / "ring" / instance)
        assert info.diffusers_file.is_file() and info.kohya_file.is_file()
        record = info.record
        assert record["steps"] == 6 and len(record["loss_curve"]) == 6
        assert record["token"] and record["token"] in record["instance_prompt"]
        assert record["instance_prompt"].endswith(f"{instance} ring")
        assert record["recipe"]["lora_rank"] == 4
        assert record["base_model"]["fingerprint"] and record["weights_sha256"]
        assert record["versions"]["diffusers"] != "not installed"
        assert len(record["photos"]) >= 3 and all(len(p["sha256"]) == 64 for p in record["photos"])
        assert record["checkpoints"] == ["step-000002", "step-000004", "step-000006"]
        checkpoints = list_checkpoints(workdir / "checkpoints" / "ring" / instance)
        assert [step for step, _ in checkpoints] == [2, 4, 6]
        assert (checkpoints[-1][1] / "validation" / "00.png").is_file()
    tokens = json.loads((workdir / "tokens.json").read_text())
    assert tokens["ring/band"] != tokens["ring/signet"]


def test_rerun_skips_finished_adapters(trained, sample_catalogue):
    workdir, _ = trained
    before = (workdir / "adapters" / "ring" / "band" / "adapter.json").stat().st_mtime_ns
    summary = train_class(_source(sample_catalogue), "ring", ["band"], workdir, tiny_config())
    assert [o.status for o in summary.outcomes] == ["already trained"]
    assert (workdir / "adapters" / "ring" / "band" / "adapter.json").stat().st_mtime_ns == before


def test_adapter_loads_into_plain_diffusers_and_changes_output(trained, tiny_model):
    from diffusers import StableDiffusionPipeline

    workdir, _ = trained
    info = read_adapter(workdir / "adapters" / "ring" / "band")
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model.path, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    prompt = info.record["instance_prompt"]
    base = _pipeline_image(pipeline, prompt)
    pipeline.load_lora_weights(str(info.folder), weight_name=info.diffusers_file.name)
    tuned = _pipeline_image(pipeline, prompt)
    assert (tuned - base).abs().max() > 1e-3

    # The kohya copy is the same adapter: loaded instead, it draws the same image.
    pipeline.unload_lora_weights()
    assert torch.allclose(_pipeline_image(pipeline, prompt), base, atol=1e-6)
    pipeline.load_lora_weights(str(info.folder), weight_name=info.kohya_file.name)
    assert torch.allclose(_pipeline_image(pipeline, prompt), tuned, atol=1e-4)


def test_kohya_file_has_kohya_names_and_alphas(trained):
    workdir, _ = trained
    info = read_adapter(workdir / "adapters" / "ring" / "signet")
    tensors = load_file(str(info.kohya_file))
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert downs and all(k.startswith("lora_unet_") for k in downs)
    for key in downs:
        module = key[: -len(".lora_down.weight")]
        assert f"{module}.lora_up.weight" in tensors
        assert float(tensors[f"{module}.alpha"]) == 4.0


def test_resume_after_interruption_matches_uninterrupted_run(trained, sample_catalogue, tmp_path):
    workdir, _ = trained
    source = _source(sample_catalogue)
    with pytest.raises(InterruptedError):
        train_class(source, "ring", ["band"], tmp_path, tiny_config(), progress=crash_in_training_step(4))
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints" / "ring" / "band")] == [2]
    assert not (tmp_path / "adapters" / "ring" / "band").exists()

    # Without --resume, existing checkpoints are never silently thrown away.
    summary = train_class(source, "ring", ["band"], tmp_path, tiny_config())
    assert summary.outcomes[0].status == "failed" and "--resume" in summary.outcomes[0].detail

    summary = train_class(source, "ring", ["band"], tmp_path, tiny_config(), resume=True)
    assert summary.outcomes[0].status == "trained"
    resumed = read_adapter(tmp_path / "adapters" / "ring" / "band")
    reference = read_adapter(workdir / "adapters" / "ring" / "band")
    assert resumed.record["steps"] == 6 and resumed.record["resumed_from_step"] == 2
    assert resumed.record["loss_curve"] == reference.record["loss_curve"]
    a, b = load_file(str(resumed.diffusers_file)), load_file(str(reference.diffusers_file))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_changed_settings_refuse_to_resume_foreign_checkpoints(sample_catalogue, tmp_path):
    source = _source(sample_catalogue)
    with pytest.raises(InterruptedError):
        train_class(source, "ring", ["band"], tmp_path, tiny_config(), progress=crash_in_training_step(3))
    summary = train_class(source, "ring", ["band"], tmp_path, tiny_config(learning_rate=5e-3), resume=True)
    assert summary.outcomes[0].status == "failed"
    assert "different training settings" in summary.outcomes[0].detail


def test_prior_preservation_draws_class_images_once_per_class(sample_catalogue, tmp_path, monkeypatch):
    from catalog_gen.models import sampling

    calls = []
    real_draw = sampling.draw
    monkeypatch.setattr(sampling, "draw", lambda *a, **k: calls.append(len(a[1])) or real_draw(*a, **k))
    config = tiny_config(prior_preservation=True, num_class_images=3, checkpoint_every=0, validation_images=0)
    source = _source(sample_catalogue)
    heard = []
    summary = train_class(source, "ring", ["band"], tmp_path, config, steps_progress=lambda *r: heard.append(r))
    assert summary.outcomes[0].status == "trained"
    class_images = sorted((tmp_path / "class_images" / "ring").rglob("*.png"))
    assert len(class_images) == 3 and sum(calls) == 3
    assert heard == [("ring: class images", 0, 3), ("ring: class images", 3, 3)]
    stamps = [p.stat().st_mtime_ns for p in class_images]

    summary = train_class(source, "ring", ["signet"], tmp_path, config)
    assert summary.outcomes[0].status == "trained"
    assert sum(calls) == 3, "class images were drawn again for the second instance"
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "class_images" / "ring").rglob("*.png"))] == stamps
    assert read_adapter(tmp_path / "adapters" / "ring" / "signet").record["class_images"] == 3


def test_unknown_class_and_instance_are_clear_errors(sample_catalogue, tmp_path):
    with pytest.raises(CatalogError, match="unknown class 'bracelet'"):
        train_class(_source(sample_catalogue), "bracelet", [], tmp_path, tiny_config())
    with pytest.raises(CatalogError, match="unknown instance"):
        train_class(_source(sample_catalogue), "ring", ["hexagon"], tmp_path, tiny_config())


def test_empty_photo_folder_is_a_clear_error(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(CatalogError, match="is empty"):
        PhotoSource(photos_dir=tmp_path / "photos")


def test_fp16_on_cpu_is_refused_with_advice():
    from catalog_gen.train.training import weight_dtype_for

    with pytest.raises(CatalogError, match="fp16.*CUDA"):
        weight_dtype_for(tiny_config(mixed_precision="fp16"), torch.device("cpu"))


def test_latent_cache_changes_speed_not_results(sample_catalogue, tmp_path):
    source = _source(sample_catalogue)
    train_class(source, "ring", ["band"], tmp_path / "cached", tiny_config(steps=3, checkpoint_every=0))
    train_class(source, "ring", ["band"], tmp_path / "uncached",
                tiny_config(steps=3, checkpoint_every=0, cache_latents=False))
    a = read_adapter(tmp_path / "cached" / "adapters" / "ring" / "band")
    b = read_adapter(tmp_path / "uncached" / "adapters" / "ring" / "band")
    assert a.record["loss_curve"] == pytest.approx(b.record["loss_curve"], rel=1e-4)


def test_text_encoder_lora_is_saved_in_both_formats_and_loads(sample_catalogue, tmp_path, tiny_model):
    from diffusers import StableDiffusionPipeline

    import warnings

    config = tiny_config(steps=3, checkpoint_every=0, validation_images=0, train_text_encoder=True,
                         text_encoder_lr=1e-2, gradient_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train_class(_source(sample_catalogue), "ring", ["band"], tmp_path, config)
    assert summary.outcomes[0].status == "trained"
    assert not [w for w in caught if "checkpointing" in str(w.message)], "deprecated checkpointing API used"
    info = read_adapter(tmp_path / "adapters" / "ring" / "band")
    # The names every reader matches (diffusers under transformers 4 and 5, kohya-ss, A1111, ComfyUI), though
    # transformers 5's CLIPTextModel names its modules without text_model. (lora_files.text_model_names).
    text_keys = [k for k in load_file(str(info.diffusers_file)) if k.startswith("text_encoder.")]
    assert text_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text_keys)
    kohya_text = [k for k in load_file(str(info.kohya_file)) if k.startswith("lora_te")]
    assert kohya_text and all(k.startswith("lora_te_text_model_encoder_layers_") for k in kohya_text)

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model.path, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    prompt = info.record["instance_prompt"]
    ids = pipeline.tokenizer([prompt], padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
    with torch.no_grad():
        base_text = pipeline.text_encoder(ids)[0]
    pipeline.load_lora_weights(str(info.folder), weight_name=info.diffusers_file.name)
    with torch.no_grad():  # the text encoder's LoRA is on, not left out under names it does not know
        assert not torch.allclose(pipeline.text_encoder(ids)[0], base_text, atol=1e-3)
    from_diffusers = _pipeline_image(pipeline, prompt)
    pipeline.unload_lora_weights()
    pipeline.load_lora_weights(str(info.folder), weight_name=info.kohya_file.name)
    assert torch.allclose(_pipeline_image(pipeline, prompt), from_diffusers, atol=1e-4)


def test_removing_the_lora_restores_the_base_model(sample_catalogue, tmp_path, tiny_model):
    from catalog_gen.train import training

    config = tiny_config(steps=2, checkpoint_every=0, validation_images=0, train_text_encoder=True)
    components = training.load_components(tiny_model, config, torch.device("cpu"))
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in components.text_encoder.state_dict().items()}
    photos = tuple(sorted((sample_catalogue.photos_dir).glob("rg-sign-*")))[:3]
    from catalog_gen.catalog.intake import IntakeConfig, intake_photos, save_training_set

    dataset = save_training_set(intake_photos(photos, sample_catalogue.photos_dir, IntakeConfig(resolution=64)),
                                tmp_path / "set")
    job = training.InstanceJob("ring", "signet", "kqi", "photo of a kqi signet ring", "photo of a ring",
                               tuple(sorted(dataset.glob("*.png"))), tmp_path / "ckpt")
    training.fit(components, config, job, "test", resume=False)
    training.remove_lora(components)
    assert not getattr(components.unet, "peft_config", None)
    after = components.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    text_after = components.text_encoder.state_dict()
    assert text_before.keys() == text_after.keys()
    assert all(torch.equal(text_before[k], text_after[k]) for k in text_before)


def test_eight_bit_adam_trains_and_resumes_exactly(sample_catalogue, tmp_path):
    config = tiny_config(optimizer="adamw8bit", steps=4, checkpoint_every=2, validation_images=0)
    source = _source(sample_catalogue)
    train_class(source, "ring", ["slim"], tmp_path / "straight", config)
    with pytest.raises(InterruptedError):
        train_class(source, "ring", ["slim"], tmp_path / "resumed", config, progress=crash_in_training_step(4))
    train_class(source, "ring", ["slim"], tmp_path / "resumed", config, resume=True)
    a = load_file(str(read_adapter(tmp_path / "straight" / "adapters" / "ring" / "slim").diffusers_file))
    b = load_file(str(read_adapter(tmp_path / "resumed" / "adapters" / "ring" / "slim").diffusers_file))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_adapter(tmp_path / "resumed" / "adapters" / "ring" / "slim").record["recipe"]["optimizer"] == "adamw8bit"


def test_relative_photo_paths_work(sample_catalogue, tmp_path, monkeypatch):
    monkeypatch.chdir(sample_catalogue.root.parent)
    relative = Path(sample_catalogue.root.name)
    source = PhotoSource(photos_dir=relative / "photos", products_csv=relative / "products.csv")
    summary = train_class(source, "ring", ["band"], tmp_path,
                          tiny_config(steps=1, checkpoint_every=0, validation_images=0))
    assert summary.outcomes[0].status == "trained"
    assert len(read_adapter(tmp_path / "adapters" / "ring" / "band").record["photos"]) == 4


def test_lora_alpha_follows_the_rank_unless_set():
    assert TrainConfig(lora_rank=16).resolved_lora_alpha == 16.0
    assert TrainConfig(lora_rank=16, lora_alpha=4.0).resolved_lora_alpha == 4.0
    assert TrainConfig(lora_rank=16, lora_alpha=4).resolved_lora_alpha == 4.0  # a TOML integer is fine
    with pytest.raises(CatalogError, match="lora_alpha must be float"):
        TrainConfig(lora_alpha="8")
    with pytest.raises(CatalogError, match="lora_alpha must be > 0"):
        TrainConfig(lora_alpha=0.0)


def test_a_rank_8_adapter_without_alpha_has_scale_1_in_both_files(sample_catalogue, tmp_path):
    """A rank sweep must change the rank alone: with alpha left unset, alpha = rank (scale alpha / rank = 1)."""
    from safetensors import safe_open

    config = tiny_config(lora_rank=8, steps=1, checkpoint_every=0, validation_images=0)
    train_class(_source(sample_catalogue), "ring", ["band"], tmp_path, config)
    info = read_adapter(tmp_path / "adapters" / "ring" / "band")
    alphas = [tensor for name, tensor in load_file(str(info.kohya_file)).items() if name.endswith(".alpha")]
    assert alphas and all(float(a) == 8.0 for a in alphas)
    with safe_open(str(info.diffusers_file), "pt") as handle:
        lora_config = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert lora_config["unet.lora_alpha"] == 8.0 and lora_config["unet.r"] == 8


def test_training_leaves_the_process_global_generator_as_it_found_it(sample_catalogue, tmp_path):
    """LoRA init and dropout draw from torch's global generator inside seeds.isolated_rng only."""
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    config = tiny_config(steps=2, checkpoint_every=0, validation_images=0, lora_dropout=0.1)
    summary = train_class(_source(sample_catalogue), "ring", ["band"], tmp_path, config)
    assert summary.outcomes[0].status == "trained"
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_crashed_runs_checkpoint_converts_on_its_own_with_its_trained_alpha(sample_catalogue, tmp_path, trained):
    """Checkpoints carry the resolved recipe and LoRA configs: no adapter.json is needed to use them, and
    rank and alpha in every file come from the one config the LoRA was trained with."""
    from safetensors import safe_open

    from catalog_gen.evaluate.evaluation import checkpoint_as_adapter_file

    config = tiny_config(lora_rank=8, lora_alpha=2.0)
    with pytest.raises(InterruptedError):
        train_class(_source(sample_catalogue), "ring", ["band"], tmp_path, config, progress=crash_in_training_step(3))
    assert not (tmp_path / "adapters" / "ring" / "band").exists()
    (step, folder), = list_checkpoints(tmp_path / "checkpoints" / "ring" / "band")
    state = json.loads((folder / "state.json").read_text())
    assert state["recipe"]["lora_rank"] == 8 and state["lora_configs"]["unet"]["lora_alpha"] == 2.0
    converted = checkpoint_as_adapter_file(folder, tmp_path / "converted")
    with safe_open(str(converted), "pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["unet.lora_alpha"] == 2.0 and metadata["unet.r"] == 8

    # A finished run: its last checkpoint converts to exactly the adapter's own diffusers file.
    workdir, _ = trained
    adapter = read_adapter(workdir / "adapters" / "ring" / "band")
    last = list_checkpoints(workdir / "checkpoints" / "ring" / "band")[-1][1]
    again = load_file(str(checkpoint_as_adapter_file(last, tmp_path / "again")))
    shipped = load_file(str(adapter.diffusers_file))
    assert again.keys() == shipped.keys() and all(torch.equal(again[k], shipped[k]) for k in again)
    assert adapter.record["lora"]["unet"]["lora_alpha"] == float(adapter.record["recipe"]["lora_rank"])  # follows rank


def test_a_damaged_checkpoint_file_is_named_not_a_traceback(sample_catalogue, tmp_path):
    with pytest.raises(InterruptedError):
        train_class(_source(sample_catalogue), "ring", ["band"], tmp_path, tiny_config(),
                    progress=crash_in_training_step(3))
    (_, folder), = list_checkpoints(tmp_path / "checkpoints" / "ring" / "band")
    (folder / "lora.safetensors").write_bytes(b"not safetensors")
    summary = train_class(_source(sample_catalogue), "ring", ["band"], tmp_path, tiny_config(), resume=True)
    assert summary.outcomes[0].status == "failed"
    assert "lora.safetensors cannot be read" in summary.outcomes[0].detail


def test_a_rerun_removes_the_staging_a_killed_run_left(sample_catalogue, tmp_path):
    with pytest.raises(InterruptedError):
        train_class(_source(sample_catalogue), "ring", ["band"], tmp_path, tiny_config(),
                    progress=crash_in_training_step(3))
    checkpoints, adapters = tmp_path / "checkpoints" / "ring" / "band", tmp_path / "adapters" / "ring"
    # What a kill -9 inside the atomic writers leaves: staging folders, a retired folder, temp files.
    left = [checkpoints / ".step-000004.abc123.partial", checkpoints / ".step-000002.old-4242",
            adapters / ".band.x1y2.partial", checkpoints / "validation" / ".step-000002-0.png.q.png"]
    for path in left:
        (path.mkdir(parents=True) if path.suffix != ".png" else (path.parent.mkdir(parents=True, exist_ok=True),
                                                                 path.write_bytes(b"")))
    other = adapters / ".signet.z9.partial"  # another instance's staging: its own train cleans it
    other.mkdir()
    summary = train_class(_source(sample_catalogue), "ring", ["band"], tmp_path, tiny_config(), resume=True)
    assert summary.outcomes[0].status == "trained"
    assert [path for path in left if path.exists()] == []
    assert other.exists()
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".")] == [".train.lock"]


def test_a_second_train_of_the_same_instance_is_refused_while_the_first_runs(sample_catalogue, tmp_path):
    from catalog_gen.layout import TRAIN_LOCK
    from catalog_gen.storage import exclusive_lock

    with exclusive_lock(tmp_path / "checkpoints" / "ring" / "band" / TRAIN_LOCK):  # "the first run"
        summary = train_class(_source(sample_catalogue), "ring", ["band", "signet"], tmp_path, tiny_config(steps=2))
    band, signet = summary.outcomes
    assert band.status == "failed" and "another catalog train is training ring/band" in band.detail
    assert signet.status == "trained"


def test_the_training_reporter_hears_when_validation_images_are_drawn(sample_catalogue, tmp_path):
    heard = []

    class Reporter:
        def __call__(self, step, loss, rate):
            heard.append(step)

        def note(self, text):
            heard.append(text)

    train_class(_source(sample_catalogue), "ring", ["band"], tmp_path, tiny_config(steps=2, checkpoint_every=2),
                progress=lambda job: Reporter())
    assert heard == [1, 2, "drawing 1 validation image(s) at step 2"]


def test_without_a_recipe_the_defaults_follow_the_base_model_and_the_device(sample_catalogue, tmp_path):
    """TrainConfig() on the 64 px tiny preset, on this CPU: 64 px (not 512), AdamW (not 8-bit), no autocast."""
    summary = train_class(_source(sample_catalogue), "ring", ["band"], tmp_path,
                          replace(TrainConfig(), steps=2, checkpoint_every=0, validation_images=0))
    assert summary.outcomes[0].status == "trained"
    recipe = read_adapter(tmp_path / "adapters" / "ring" / "band").record["recipe"]
    assert (recipe["resolution"], recipe["optimizer"], recipe["mixed_precision"]) == (64, "adamw", "no")
    # On a GPU the same "auto" settings become the T4 recipe's.
    on_gpu = TrainConfig().resolve_for(512, on_gpu=True)
    assert (on_gpu.resolution, on_gpu.optimizer, on_gpu.mixed_precision) == (512, "adamw8bit", "fp16")
    assert TrainConfig(resolution=128, optimizer="adamw").resolve_for(512, on_gpu=True).resolution == 128


def test_a_token_chosen_by_hand_is_trained_with_and_kept(sample_catalogue, tmp_path, tokenizer):
    import json

    from catalog_gen.catalog.tokens import candidate_tokens

    mine = candidate_tokens(tokenizer)[-2]
    summary = train_class(_source(sample_catalogue), "ring", ["band"], tmp_path,
                          tiny_config(steps=1, checkpoint_every=0, validation_images=0), chosen_tokens={"band": mine})
    record = read_adapter(tmp_path / "adapters" / "ring" / "band").record
    assert summary.outcomes[0].status == "trained" and record["token"] == mine
    assert f"{mine} " in record["instance_prompt"]
    assert json.loads((tmp_path / "tokens.json").read_text())["ring/band"] == mine
    with pytest.raises(CatalogError, match="unknown instance"):
        train_class(_source(sample_catalogue), "ring", ["band"], tmp_path, tiny_config(steps=1),
                    chosen_tokens={"hexagon": mine})


def test_attach_keeps_a_lora_alpha_that_differs_from_the_rank(sample_catalogue, tmp_path, tiny_model):
    """The generator's hash-checked load must scale the LoRA by alpha / rank as plain diffusers does from the
    file (a bare state dict loses the file's LoRA config, and diffusers then takes alpha = rank)."""
    import numpy as np

    from catalog_gen.models.loading import load_pipeline
    from catalog_gen.models.sampling import draw
    from catalog_gen.train.adapters import adapter_weights, attach, detach

    train_class(_source(sample_catalogue), "ring", ["band"], tmp_path,
                tiny_config(lora_rank=4, lora_alpha=16.0, checkpoint_every=0, validation_images=0))
    info = read_adapter(tmp_path / "adapters" / "ring" / "band")
    pipeline = load_pipeline(tiny_model)
    prompt = info.record["instance_prompt"]

    def image():
        return np.asarray(draw(pipeline, [prompt], [3], steps=3, resolution=64)[0])

    pipeline.load_lora_weights(str(info.folder), weight_name=info.diffusers_file.name)
    from_file = image()
    pipeline.unload_lora_weights()
    attached = attach(pipeline, adapter_weights(info), "sku_adapter")
    assert np.array_equal(image(), from_file)
    detach(pipeline, attached)
