"""Textual inversion, pivotal tuning and full DreamBooth end to end on the tiny preset: what each trains and
writes, exact resume (learned tokens included), loading in plain diffusers, and attach/detach leaving the
base model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import crash_in_training_step
from safetensors import safe_open
from safetensors.torch import load_file

from catalog_gen.config import TrainConfig, build_config, read_recipe
from catalog_gen.errors import CatalogError
from catalog_gen.train.adapters import adapter_weights, attach, detach, read_adapter
from catalog_gen.train.checkpoints import list_checkpoints
from catalog_gen.train.workflow import train_class
from test_training import _source, tiny_config

pytestmark = pytest.mark.slow


def method_config(method: str, **overrides) -> TrainConfig:
    # embedding_lr high enough that 6 steps move the tiny model's embeddings visibly.
    return tiny_config(**{"method": method, "embedding_lr": 5e-2, **overrides})


@pytest.fixture(scope="module")
def trained(sample_catalogue, tmp_path_factory):
    """ring/band with each method; textual inversion with two vectors, to cover multi-vector tokens."""
    found = {}
    for method, extra in (("textual-inversion", {"embedding_vectors": 2}), ("pivotal", {}),
                          ("dreambooth", {"train_text_encoder": True}), ("lora-captions", {})):
        workdir = tmp_path_factory.mktemp(method)
        summary = train_class(_source(sample_catalogue), "ring", ["band"], workdir, method_config(method, **extra))
        assert [o.status for o in summary.outcomes if o.key == "ring/band"] == ["trained"], summary.outcomes
        found[method] = read_adapter(workdir / "adapters" / "ring" / "band")
    return found


def _image(pipeline, prompt: str) -> np.ndarray:
    from catalog_gen.models.sampling import draw

    return np.asarray(draw(pipeline, [prompt], [3], steps=3, resolution=64)[0]).astype(np.int16)


def _initial_vector(tiny_model, noun: str) -> torch.Tensor:
    from catalog_gen.models.loading import load_tokenizer
    from transformers import CLIPTextModel

    tokenizer = load_tokenizer(tiny_model)
    encoder = CLIPTextModel.from_pretrained(tiny_model.path, subfolder="text_encoder")
    ids = tokenizer(noun, add_special_tokens=False).input_ids
    return encoder.get_input_embeddings().weight[ids].mean(dim=0).detach()


def test_textual_inversion_learns_new_tokens_and_nothing_else(trained, tiny_model):
    info = trained["textual-inversion"]
    record = info.record
    assert record["method"] == "textual-inversion" and info.token == "<ring-band>"
    assert info.tokens == ["<ring-band>", "<ring-band>_1"]
    assert "<ring-band>" in record["instance_prompt"]
    assert record["files"] == {"diffusers": None, "kohya": None, "embeddings": "learned_embeds.safetensors"}
    assert not info.has_lora and not (info.folder / "pytorch_lora_weights.safetensors").exists()
    vectors = load_file(str(info.embeddings_file))
    assert list(vectors) == ["<ring-band>"] and vectors["<ring-band>"].shape[0] == 2
    # Both vectors started at the class noun's embedding and moved from it.
    start = _initial_vector(tiny_model, "ring")
    assert all(not torch.allclose(row, start, atol=1e-4) for row in vectors["<ring-band>"])
    assert len(record["loss_curve"]) == 6
    # Every checkpoint holds the embeddings and nothing of a LoRA.
    for _, folder in list_checkpoints(info.folder.parents[2] / "checkpoints" / "ring" / "band"):
        assert list(load_file(str(folder / "lora.safetensors"))) == ["token_embeddings"]


def test_textual_inversion_loads_in_plain_diffusers_and_detach_restores_the_base(trained, tiny_model):
    from catalog_gen.models.loading import load_pipeline

    info = trained["textual-inversion"]
    prompt = info.record["instance_prompt"]
    pipeline = load_pipeline(tiny_model)
    base = _image(pipeline, prompt)
    vocab_before = len(pipeline.tokenizer)
    embedding_before = pipeline.text_encoder.get_input_embeddings()

    # Plain diffusers, from the file alone: the multi-vector embedding gets tokens <ring-band>, <ring-band>_1.
    plain = load_pipeline(tiny_model)
    plain.load_textual_inversion(str(info.embeddings_file))
    assert "<ring-band>_1" in plain.tokenizer.get_vocab()
    from_diffusers = _image(plain, prompt)
    assert not np.array_equal(from_diffusers, base)

    attached = attach(pipeline, adapter_weights(info), "test")
    assert np.array_equal(_image(pipeline, prompt), from_diffusers)
    detach(pipeline, attached)
    assert len(pipeline.tokenizer) == vocab_before
    assert pipeline.text_encoder.get_input_embeddings() is embedding_before
    assert np.array_equal(_image(pipeline, prompt), base)


def test_pivotal_trains_embeddings_for_a_fraction_then_only_the_lora(trained):
    info = trained["pivotal"]
    assert info.record["method"] == "pivotal" and info.tokens == ["<ring-band>"]
    checkpoints = dict(list_checkpoints(info.folder.parents[2] / "checkpoints" / "ring" / "band"))
    at = {step: load_file(str(folder / "lora.safetensors")) for step, folder in checkpoints.items()}
    # embedding_fraction 0.5 of 6 steps: the embeddings learn in steps 1-3 and hold still after.
    assert not torch.equal(at[2]["token_embeddings"], at[4]["token_embeddings"])
    assert torch.equal(at[4]["token_embeddings"], at[6]["token_embeddings"])
    lora_keys = [k for k in at[4] if "lora" in k]
    assert lora_keys and any(not torch.equal(at[4][k], at[6][k]) for k in lora_keys)
    # The finished files: the LoRA (diffusers, kohya) and the embeddings as the advanced scripts write them.
    embeddings = load_file(str(info.embeddings_file))
    assert info.embeddings_file.name == "ring_band_emb.safetensors" and list(embeddings) == ["clip_l"]
    assert torch.equal(embeddings["clip_l"], at[6]["token_embeddings"])
    kohya = load_file(str(info.kohya_file))
    assert torch.equal(kohya["bundle_emb.<ring-band>.string_to_param.*"], embeddings["clip_l"])


def test_pivotal_loads_in_plain_diffusers_like_the_advanced_scripts(trained, tiny_model):
    from catalog_gen.models.loading import load_pipeline

    info = trained["pivotal"]
    prompt = info.record["instance_prompt"]
    pipeline = load_pipeline(tiny_model)
    base = _image(pipeline, prompt)
    pipeline.load_lora_weights(str(info.folder), weight_name=info.diffusers_file.name)
    lora_only = _image(pipeline, prompt)
    state = load_file(str(info.embeddings_file))
    pipeline.load_textual_inversion(state["clip_l"][0], token="<ring-band>", text_encoder=pipeline.text_encoder,
                                    tokenizer=pipeline.tokenizer)
    both = _image(pipeline, prompt)
    assert not np.array_equal(lora_only, base) and not np.array_equal(both, lora_only)

    fresh = load_pipeline(tiny_model)
    attached = attach(fresh, adapter_weights(info), "test")
    assert np.array_equal(_image(fresh, prompt), both)
    detach(fresh, attached)
    assert np.array_equal(_image(fresh, prompt), base)


@pytest.mark.parametrize("method", ["textual-inversion", "pivotal", "dreambooth", "lora-captions"])
def test_resume_after_interruption_gives_the_same_weights(method, trained, sample_catalogue, tmp_path):
    source = _source(sample_catalogue)
    extra = {"textual-inversion": {"embedding_vectors": 2}, "dreambooth": {"train_text_encoder": True}}.get(method, {})
    with pytest.raises(InterruptedError):
        train_class(source, "ring", ["band"], tmp_path, method_config(method, **extra),
                    progress=crash_in_training_step(4))
    summary = train_class(source, "ring", ["band"], tmp_path, method_config(method, **extra), resume=True)
    assert [o.status for o in summary.outcomes if o.key == "ring/band"] == ["trained"]
    resumed, reference = read_adapter(tmp_path / "adapters" / "ring" / "band"), trained[method]
    assert resumed.record["resumed_from_step"] == 2
    assert resumed.record["loss_curve"] == reference.record["loss_curve"]
    assert resumed.record["fingerprint"] == reference.record["fingerprint"]
    files = [name for name in resumed.record["files"].values() if name]
    assert files
    for name in files:
        a, b = load_file(str(resumed.folder / name)), load_file(str(reference.folder / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_dreambooth_writes_diffusers_components_that_plain_diffusers_loads(trained, tiny_model):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from catalog_gen.models.loading import load_pipeline

    info = trained["dreambooth"]
    assert info.record["method"] == "dreambooth" and info.full_parts == ["unet", "text_encoder"]
    assert not info.has_lora and info.embeddings_file is None
    prompt = info.record["instance_prompt"]
    pipeline = load_pipeline(tiny_model)
    base = _image(pipeline, prompt)
    base_unet = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}

    # Plain diffusers: the base pipeline with the fine-tuned components swapped in.
    plain = StableDiffusionPipeline.from_pretrained(
        tiny_model.path, unet=UNet2DConditionModel.from_pretrained(info.folder, subfolder="unet"),
        text_encoder=CLIPTextModel.from_pretrained(info.folder, subfolder="text_encoder"),
        safety_checker=None, requires_safety_checker=False, local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    tuned = _image(plain, prompt)
    assert not np.array_equal(tuned, base)
    # The text encoder's file has CLIP's standard names (transformers 4 and ComfyUI read only those), and
    # transformers 5 loads every trained tensor from it.
    text_file = load_file(str(info.folder / info.record["files"]["text_encoder"]))
    assert all(k.startswith("text_model.") for k in text_file)
    loaded = plain.text_encoder.state_dict()
    assert all(torch.equal(loaded[k.removeprefix("text_model.")], v) for k, v in text_file.items())
    # Every UNet weight moved, not a few.
    trained_unet = plain.unet.state_dict()
    moved = sum(not torch.equal(trained_unet[k], base_unet[k]) for k in base_unet)
    assert moved > 0.9 * len(base_unet)

    attached = attach(pipeline, adapter_weights(info), "test")
    assert np.array_equal(_image(pipeline, prompt), tuned)
    detach(pipeline, attached)
    assert all(torch.equal(pipeline.unet.state_dict()[k], base_unet[k]) for k in base_unet)
    assert np.array_equal(_image(pipeline, prompt), base)


def test_training_full_dreambooth_leaves_the_shared_base_model_as_loaded(sample_catalogue, tmp_path, tiny_model):
    from catalog_gen.train import training

    config = method_config("dreambooth", steps=2, checkpoint_every=0, validation_images=0, train_text_encoder=True)
    config = config.resolve_for(64, on_gpu=False)
    components = training.load_components(tiny_model, config, torch.device("cpu"))
    before = {name: {k: v.clone() for k, v in getattr(components, name).state_dict().items()}
              for name in ("unet", "text_encoder")}
    job = training.InstanceJob("ring", "band", "kqi", "photo of a kqi ring", "photo of a ring",
                               tuple(sorted((tmp_path / "none").glob("*"))), tmp_path / "ckpt")
    photos = sorted(sample_catalogue.photos_dir.glob("rg-band-*"))[:2]
    from catalog_gen.catalog.intake import IntakeConfig, intake_photos, save_training_set

    dataset = save_training_set(intake_photos(photos, sample_catalogue.photos_dir, IntakeConfig(resolution=64)),
                                tmp_path / "set")
    job = replace(job, photos=tuple(sorted(dataset.glob("*.png"))))
    result = training.fit(components, config, job, "test", resume=False)
    assert any(not torch.equal(result.full_weights["unet"][k], before["unet"][k]) for k in before["unet"])
    for name, state in before.items():
        module = getattr(components, name)
        assert not any(p.requires_grad for p in module.parameters())
        after = module.state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state), name


def test_a_new_token_already_in_the_vocabulary_is_refused(sample_catalogue, tmp_path):
    with pytest.raises(CatalogError, match=r"ring/band: new token 'ring' is already in the tokenizer's vocabulary"):
        train_class(_source(sample_catalogue), "ring", ["band"], tmp_path, method_config("textual-inversion"),
                    chosen_tokens={"band": "ring"})


def test_method_settings_are_validated():
    with pytest.raises(CatalogError, match="method must be one of dreambooth-lora, textual-inversion, pivotal, "
                                           "dreambooth, lora-captions, two-stage"):
        TrainConfig(method="hypernetwork")
    with pytest.raises(CatalogError, match="textual-inversion trains token embeddings only"):
        TrainConfig(method="textual-inversion", train_text_encoder=True)
    with pytest.raises(CatalogError, match="embedding_fraction"):
        TrainConfig(method="pivotal", embedding_fraction=0.0)


def test_each_methods_fingerprint_leaves_out_the_settings_it_does_not_use():
    from catalog_gen.train.training import InstanceJob, training_fingerprint

    job = InstanceJob("ring", "band", "kqi", "photo of kqi ring", "photo of ring", (), Path("unused"))
    config = TrainConfig(resolution=64, optimizer="adamw", mixed_precision="no")
    assert training_fingerprint(config, job, "base", ["h"]) == training_fingerprint(
        replace(config, embedding_lr=1.0, embedding_vectors=3), job, "base", ["h"])
    ti = replace(config, method="textual-inversion")
    assert training_fingerprint(ti, job, "base", ["h"]) == training_fingerprint(
        replace(ti, lora_rank=16), job, "base", ["h"])
    assert training_fingerprint(ti, job, "base", ["h"]) != training_fingerprint(
        replace(ti, embedding_lr=1.0), job, "base", ["h"])


def test_catalog_generate_takes_each_methods_adapter_and_leaves_nothing_behind(sample_catalogue, tmp_path):
    """band (full DreamBooth), dome (lora-captions), signet (pivotal), slim (textual inversion) and stacker
    (two-stage) in one nightly run, the base model's images drawn for each: a base image drawn after another
    instance's adapter came off equals one
    from a run that never loaded it, and each adapter changes its candidates. (A textual-inversion leftover
    could only show in prompts with its own token; attach/detach's own test checks that one.)"""
    import polars as pl
    from PIL import Image

    from catalog_gen.config import GenerateConfig
    from catalog_gen.generate.generation import GenerationRequest, generate
    from catalog_gen.layout import BASE_DIR

    workdir, source = tmp_path / "work", _source(sample_catalogue)
    quick = dict(checkpoint_every=0, validation_images=0)
    train_class(source, "ring", ["band"], workdir, method_config("dreambooth", **quick))
    train_class(source, "ring", ["signet"], workdir, method_config("pivotal", **quick))
    train_class(source, "ring", ["slim"], workdir, method_config("textual-inversion", embedding_vectors=2, **quick))
    train_class(source, "ring", ["stacker"], workdir, method_config("two-stage", class_stage_steps=3, **quick))
    train_class(source, "ring", ["dome"], workdir, method_config("lora-captions", **quick))
    config = replace(build_config(GenerateConfig, read_recipe("tiny_nightly", "generate"), {}), base_images=1,
                     n_images=1, max_extra=0)
    rows = {"band": "RG-BAND-1,ring,band\n", "dome": "RG-DOME-1,ring,dome\n", "signet": "RG-SIGN-1,ring,signet\n",
            "slim": "RG-SLIM-1,ring,slim\n", "stacker": "RG-STCK-1,ring,stacker\n"}

    def run(name: str, instances: list[str]):
        sheet = tmp_path / f"{name}.csv"
        sheet.write_text("sku,class,instance\n" + "".join(rows[i] for i in instances))
        summary = generate(GenerationRequest(sheet, workdir, tmp_path / name), config)
        assert not summary.errors, summary.errors
        return tmp_path / name

    # Instances run in key order: band's weights, if left on, would change signet's base images, and signet's
    # LoRA slim's; slim's leftover tokens would show only in its own prompts (see the docstring).
    both, alone = run("all", list(rows)), {i: run(i, [i]) for i in rows}
    manifest = pl.read_parquet(both / "manifest.parquet")
    for instance, sku in (("band", "RG-BAND-1"), ("dome", "RG-DOME-1"), ("signet", "RG-SIGN-1"),
                          ("slim", "RG-SLIM-1"), ("stacker", "RG-STCK-1")):
        [folder] = [p.parent.name for p in (alone[instance] / BASE_DIR).glob("*/0.png")]
        base = np.asarray(Image.open(both / BASE_DIR / folder / "0.png"))
        assert np.array_equal(base, np.asarray(Image.open(alone[instance] / BASE_DIR / folder / "0.png")))
        candidate = manifest.filter((pl.col("sku") == sku) & (pl.col("candidate") == 0))["path"][0]
        assert not np.array_equal(base, np.asarray(Image.open(both / candidate)))


def test_catalog_compare_trains_and_evaluates_every_method_on_the_same_photos(sample_catalogue, tmp_path):
    import polars as pl
    from PIL import Image
    from typer.testing import CliRunner

    from catalog_gen.cli.main import app

    from catalog_gen.config import _recipe_path

    recipe = tmp_path / "compare.toml"
    recipe.write_text(_recipe_path("tiny_sweep").read_text() + "\n[compare.dreambooth]\nlearning_rate = 1e-5\n"
                      "\n[compare.two-stage]\nclass_stage_steps = 5\n")
    args = ["compare", "--class", "ring", "--instance", "band", "--photos", str(sample_catalogue.photos_dir),
            "--products", str(sample_catalogue.products_csv), "--workdir", str(tmp_path), "--recipe", str(recipe),
            "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "sweeps" / "compare-ring-band"
    assert "| dreambooth-lora |" in result.output and "| pivotal |" in result.output
    table = pl.read_parquet(out / "compare.parquet")
    assert table["method"].to_list() == ["base model (no fine-tuning)", "dreambooth-lora", "textual-inversion",
                                         "pivotal", "dreambooth", "lora-captions", "two-stage"]
    for metric in ("clip_i", "dino", "clip_t", "kid_photos", "fid_photos", "kid_base", "fid_base"):
        assert table[metric].is_finite().all(), metric
    assert table["train_seconds"][1:].is_finite().all()
    rows = {row["method"]: row for row in table.iter_rows(named=True)}
    # The base row scores the base model's images against themselves: no distance to the base.
    assert abs(rows["base model (no fine-tuning)"]["fid_base"]) < 1e-6
    # One 32-dimensional vector for textual inversion; the LoRA's A and B matrices for the others.
    assert rows["textual-inversion"]["trained_parameters"] == 32
    assert rows["pivotal"]["trained_parameters"] == rows["dreambooth-lora"]["trained_parameters"] + 32
    assert rows["lora-captions"]["trained_parameters"] == rows["dreambooth-lora"]["trained_parameters"]
    assert rows["textual-inversion"]["weights_bytes"] < rows["dreambooth-lora"]["weights_bytes"]
    assert rows["dreambooth-lora"]["weights_bytes"] < rows["dreambooth"]["weights_bytes"]  # seed 003's sizes
    # [compare.dreambooth] set that method's learning rate and no other's.
    records = [json.loads(p.read_text()) for p in out.glob("points/*/adapters/ring/band/adapter.json")]
    rates = {record["method"]: record["recipe"]["learning_rate"] for record in records}
    assert rates == {"dreambooth-lora": 1e-3, "textual-inversion": 1e-3, "pivotal": 1e-3, "dreambooth": 1e-5,
                     "lora-captions": 1e-3, "two-stage": 1e-3}
    assert table["peak_cuda_memory_bytes"].is_null().all()  # a CPU run: not measured, not zero
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (130 + 4 * 96, 8 * 96)  # photos, base model, six methods
    # A rerun finds every method finished and only tabulates again.
    finished = {p: p.stat().st_mtime_ns for p in out.glob("points/*/adapters/ring/band/adapter.json")}
    assert len(finished) == 6
    # Every method's final evaluation images are kept for the grid (two-stage's too, whose class stage ran
    # another number of steps): tiny_sweep draws 2 prompts x 3 images.
    for point in out.glob("points/*"):
        assert len(list((point / "images" / "final").glob("*.png"))) == 6, point.name
    rerun = CliRunner().invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert pl.read_parquet(out / "compare.parquet").drop("train_seconds").equals(table.drop("train_seconds"))


def test_compare_refuses_an_unknown_method_before_training():
    from catalog_gen.evaluate.compare import parse_methods

    with pytest.raises(CatalogError, match="unknown method.*hypernetwork.*choose from dreambooth-lora"):
        parse_methods("dreambooth-lora,hypernetwork")


def test_compare_method_settings_name_a_method_and_known_settings():
    from catalog_gen.evaluate.compare import parse_method_settings

    assert parse_method_settings({"dreambooth": {"learning_rate": 1e-6}}, "r") == {"dreambooth": {"learning_rate": 1e-6}}
    with pytest.raises(CatalogError, match=r"r: \[compare.hypernetwork\] is not a method"):
        parse_method_settings({"hypernetwork": {"learning_rate": 1e-6}}, "r")
    with pytest.raises(CatalogError, match=r"r: \[compare.dreambooth\] unknown setting\(s\) lr"):
        parse_method_settings({"dreambooth": {"lr": 1e-6}}, "r")


@pytest.mark.parametrize("method", ["textual-inversion", "pivotal", "dreambooth", "lora-captions"])
def test_catalog_eval_scores_every_checkpoint_of_each_method(method, trained):
    """Seed 000 follows pivotal tuning over its checkpoints: every checkpoint's own weights are drawn with."""
    import polars as pl

    from catalog_gen.evaluate.evaluation import EvalConfig, run_eval

    evaluation = build_config(EvalConfig, read_recipe("tiny_sweep", "eval"), {})
    workdir = trained[method].folder.parents[2]
    out = run_eval(workdir, "ring", ["band"], evaluation)
    table = pl.read_parquet(out / "eval.parquet")
    assert table["step"].to_list() == [2, 4, 6]
    assert table["clip_i"].is_finite().all()
    assert table["fid_base"][0] != table["fid_base"][2]  # different checkpoints, different images


@pytest.fixture(scope="module")
def two_stage(sample_catalogue, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two-stage")
    config = method_config("two-stage", class_stage_steps=4, class_stage_weight=0.8)
    summary = train_class(_source(sample_catalogue), "ring", ["band", "signet"], workdir, config)
    return workdir, config, summary


def test_two_stage_trains_the_class_lora_once_then_each_instance_on_top(two_stage, sample_catalogue, tmp_path):
    workdir, config, summary = two_stage
    assert [(o.key, o.status, o.steps) for o in summary.outcomes] == [
        ("ring/class-stage", "trained", 4), ("ring/band", "trained", 6), ("ring/signet", "trained", 6)]
    stage = read_adapter(workdir / "class_stages" / "ring" / "adapter")
    # The class stage saw every photo of every ring instance, with the class prompt and no identifier.
    assert len(stage.record["photos"]) > 2 * len(read_adapter(workdir / "adapters" / "ring" / "band").record["photos"])
    assert stage.record["instance_prompt"] == stage.record["class_prompt"]
    for instance in ("band", "signet"):
        info = read_adapter(workdir / "adapters" / "ring" / instance)
        assert info.record["method"] == "two-stage"
        assert info.record["class_stage"] == {"folder": "class_stages/ring/adapter",
                                              "weights_sha256": stage.record["weights_sha256"], "weight": 0.8}
        # The instance's files hold its own LoRA only; the class LoRA stayed frozen under it.
        checkpoint = load_file(str(workdir / "checkpoints" / "ring" / instance / "step-000006" / "lora.safetensors"))
        assert checkpoint and not any("class_stage" in key for key in checkpoint)
    # The class LoRA was on during training: the same run without it (plain DreamBooth-LoRA, same seeds)
    # ends with other weights.
    train_class(_source(sample_catalogue), "ring", ["band"], tmp_path, replace(config, method="dreambooth-lora"))
    alone = load_file(str(read_adapter(tmp_path / "adapters" / "ring" / "band").diffusers_file))
    stacked = load_file(str(read_adapter(workdir / "adapters" / "ring" / "band").diffusers_file))
    assert alone.keys() == stacked.keys() and any(not torch.equal(alone[k], stacked[k]) for k in alone)


def test_two_stage_stacks_in_plain_diffusers_as_in_generation(two_stage, tiny_model):
    from catalog_gen.models.loading import load_pipeline

    workdir, _, _ = two_stage
    info = read_adapter(workdir / "adapters" / "ring" / "band")
    stage = read_adapter(workdir / "class_stages" / "ring" / "adapter")
    prompt = info.record["instance_prompt"]
    pipeline = load_pipeline(tiny_model)
    base = _image(pipeline, prompt)
    pipeline.load_lora_weights(str(info.folder), weight_name=info.diffusers_file.name, adapter_name="band")
    alone = _image(pipeline, prompt)
    pipeline.load_lora_weights(str(stage.folder), weight_name=stage.diffusers_file.name, adapter_name="ring")
    pipeline.set_adapters(["band", "ring"], adapter_weights=[1.0, 0.8])
    stacked = _image(pipeline, prompt)
    assert not np.array_equal(stacked, alone)
    pipeline.unload_lora_weights()

    attached = attach(pipeline, adapter_weights(info), "sku_adapter")
    assert np.array_equal(_image(pipeline, prompt), stacked)
    detach(pipeline, attached)
    assert np.array_equal(_image(pipeline, prompt), base)


def test_two_stage_resumes_exactly_and_keeps_the_finished_class_stage(two_stage, sample_catalogue, tmp_path):
    import shutil

    workdir, config, _ = two_stage
    # A new workdir holding the finished class stage: a rerun must reuse it, not retrain it.
    shutil.copytree(workdir / "class_stages", tmp_path / "class_stages")
    stage_json = tmp_path / "class_stages" / "ring" / "adapter" / "adapter.json"
    before = stage_json.stat().st_mtime_ns
    with pytest.raises(InterruptedError):
        train_class(_source(sample_catalogue), "ring", ["band"], tmp_path, config, progress=crash_in_training_step(4))
    summary = train_class(_source(sample_catalogue), "ring", ["band"], tmp_path, config, resume=True)
    assert [(o.key, o.status) for o in summary.outcomes] == [("ring/class-stage", "already trained"),
                                                             ("ring/band", "trained")]
    assert stage_json.stat().st_mtime_ns == before
    resumed, reference = read_adapter(tmp_path / "adapters" / "ring" / "band"), read_adapter(
        workdir / "adapters" / "ring" / "band")
    assert resumed.record["resumed_from_step"] == 2
    assert resumed.record["fingerprint"] == reference.record["fingerprint"]
    a, b = load_file(str(resumed.diffusers_file)), load_file(str(reference.diffusers_file))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_two_stage_adapter_without_its_class_stage_is_named(two_stage, tmp_path):
    import shutil

    workdir, _, _ = two_stage
    shutil.copytree(workdir / "adapters", tmp_path / "adapters")
    info = read_adapter(tmp_path / "adapters" / "ring" / "band")
    with pytest.raises(CatalogError, match=r"ring/band is two-stage, but its class stage .* is missing; run catalog "
                                           r"train --class ring --method two-stage"):
        adapter_weights(info)
