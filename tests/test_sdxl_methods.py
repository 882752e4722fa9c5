"""Textual inversion, pivotal tuning and full DreamBooth on SDXL (tiny-sdxl): a new token gets vectors in both
text encoders (clip_l, clip_g), full DreamBooth trains both encoders beside the UNet; each resumes exactly,
loads in plain StableDiffusionXLPipeline to the image the generator draws, and detaches to the base model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import crash_in_training_step
from safetensors.torch import load_file, save_file

from catalog_gen.errors import CatalogError
from catalog_gen.models.loading import load_pipeline, resolve_base_model
from catalog_gen.train.adapters import adapter_weights, attach, detach, read_adapter
from catalog_gen.train.checkpoints import list_checkpoints
from catalog_gen.train.workflow import train_class
from test_methods import _image
from test_training import _source, tiny_config

pytestmark = pytest.mark.slow

EXTRA = {"textual-inversion": {"embedding_vectors": 2}, "pivotal": {}, "dreambooth": {"train_text_encoder": True}}


def sdxl_config(method: str):
    # embedding_lr high enough that 6 steps move the tiny model's embeddings visibly (as in test_methods.py).
    return tiny_config(base_model="tiny-sdxl", method=method, embedding_lr=5e-2, validation_images=0,
                       **EXTRA[method])


@pytest.fixture(scope="module")
def trained(sample_catalogue, tmp_path_factory):
    found = {}
    for method in EXTRA:
        workdir = tmp_path_factory.mktemp(method)
        summary = train_class(_source(sample_catalogue), "ring", ["band"], workdir, sdxl_config(method))
        assert [o.status for o in summary.outcomes] == ["trained"], summary.outcomes
        found[method] = read_adapter(workdir / "adapters" / "ring" / "band")
    return found


@pytest.fixture(scope="module")
def sdxl():
    return resolve_base_model("tiny-sdxl")


def _plain(model):
    import diffusers

    return diffusers.StableDiffusionXLPipeline.from_pretrained(model.path, local_files_only=True)


def _initial(model, noun: str) -> tuple[torch.Tensor, torch.Tensor]:
    pipeline = _plain(model)
    means = []
    for tokenizer, encoder in ((pipeline.tokenizer, pipeline.text_encoder), (pipeline.tokenizer_2, pipeline.text_encoder_2)):
        ids = tokenizer(noun, add_special_tokens=False).input_ids
        means.append(encoder.get_input_embeddings().weight[ids].mean(dim=0).detach())
    return tuple(means)


def test_textual_inversion_learns_a_vector_per_token_in_each_text_encoder(trained, sdxl):
    info = trained["textual-inversion"]
    assert info.tokens == ["<ring-band>", "<ring-band>_1"] and not info.has_lora
    assert info.record["files"]["embeddings"] == "learned_embeds.safetensors"
    file = load_file(str(info.embeddings_file))
    pipeline = _plain(sdxl)
    widths = (pipeline.text_encoder.config.hidden_size, pipeline.text_encoder_2.config.hidden_size)
    assert sorted(file) == ["clip_g", "clip_l"]
    assert (tuple(file["clip_l"].shape), tuple(file["clip_g"].shape)) == ((2, widths[0]), (2, widths[1]))
    # Every vector started at its encoder's embedding of the class noun and moved from it.
    for key, start in zip(("clip_l", "clip_g"), _initial(sdxl, "ring")):
        assert all(not torch.allclose(row, start, atol=1e-4) for row in file[key]), key
    checkpoints = list_checkpoints(info.folder.parents[2] / "checkpoints" / "ring" / "band")
    for _, folder in checkpoints:
        assert sorted(load_file(str(folder / "lora.safetensors"))) == ["token_embeddings", "token_embeddings_2"]
    last = load_file(str(checkpoints[-1][1] / "lora.safetensors"))
    assert torch.equal(last["token_embeddings"], file["clip_l"]) and torch.equal(last["token_embeddings_2"], file["clip_g"])


def test_pivotal_bundles_both_encoders_embeddings_in_the_kohya_file(trained):
    info = trained["pivotal"]
    file = load_file(str(info.embeddings_file))
    assert info.embeddings_file.name == "ring_band_emb.safetensors" and sorted(file) == ["clip_g", "clip_l"]
    kohya = load_file(str(info.kohya_file))
    # The keys A1111 and ComfyUI read an SDXL embedding bundled in a LoRA by.
    assert sorted(k for k in kohya if k.startswith("bundle_emb.")) == ["bundle_emb.<ring-band>.clip_g",
                                                                        "bundle_emb.<ring-band>.clip_l"]
    for key in ("clip_l", "clip_g"):
        assert torch.equal(kohya[f"bundle_emb.<ring-band>.{key}"], file[key])
    assert {k.split("_")[1] for k in kohya if not k.startswith("bundle_emb.")} == {"unet"}


@pytest.mark.parametrize("method", ["textual-inversion", "pivotal"])
def test_embeddings_load_in_plain_sdxl_pipeline_as_the_generator_attaches_them(method, trained, sdxl):
    """As diffusers documents loading an SDXL embedding: clip_l into text_encoder, clip_g into text_encoder_2."""
    info = trained[method]
    prompt = info.record["instance_prompt"]
    plain = _plain(sdxl)
    base = _image(plain, prompt)
    if info.has_lora:
        plain.load_lora_weights(str(info.folder), weight_name=info.diffusers_file.name)
    file = load_file(str(info.embeddings_file))
    token = info.tokens if len(info.tokens) > 1 else info.tokens[0]
    plain.load_textual_inversion(file["clip_l"], token=token, text_encoder=plain.text_encoder, tokenizer=plain.tokenizer)
    plain.load_textual_inversion(file["clip_g"], token=token, text_encoder=plain.text_encoder_2,
                                 tokenizer=plain.tokenizer_2)
    from_diffusers = _image(plain, prompt)
    assert not np.array_equal(from_diffusers, base)

    ours = load_pipeline(sdxl, "cpu")
    ours_base = _image(ours, prompt)
    before = [(len(t), e.get_input_embeddings()) for t, e in ((ours.tokenizer, ours.text_encoder),
                                                             (ours.tokenizer_2, ours.text_encoder_2))]
    attached = attach(ours, adapter_weights(info), "sku_adapter")
    assert all(info.tokens[-1] in t.get_vocab() for t in (ours.tokenizer, ours.tokenizer_2))
    # Within one level: our loader's aligned CPU memory rounds differently (models.loading.own_aligned_memory).
    assert np.abs(_image(ours, prompt) - from_diffusers).max() <= 1
    detach(ours, attached)
    after = [(len(t), e.get_input_embeddings()) for t, e in ((ours.tokenizer, ours.text_encoder),
                                                            (ours.tokenizer_2, ours.text_encoder_2))]
    assert [n for n, _ in after] == [n for n, _ in before] and all(a is b for (_, a), (_, b) in zip(after, before))
    assert np.array_equal(_image(ours, prompt), ours_base)


def test_full_dreambooth_writes_all_three_trained_parts_and_loads_in_plain_diffusers(trained, sdxl):
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    info = trained["dreambooth"]
    assert info.full_parts == ["unet", "text_encoder", "text_encoder_2"]
    assert info.single_file == info.folder / "ring_band.safetensors" and not info.record.get("notes")
    prompt = info.record["instance_prompt"]
    plain = diffusers.StableDiffusionXLPipeline.from_pretrained(
        sdxl.path, local_files_only=True,
        unet=diffusers.UNet2DConditionModel.from_pretrained(info.folder, subfolder="unet"),
        text_encoder=CLIPTextModel.from_pretrained(info.folder, subfolder="text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(info.folder, subfolder="text_encoder_2"))
    tuned = _image(plain, prompt)
    for part in ("text_encoder", "text_encoder_2"):  # CLIP's standard names, as transformers 4 and ComfyUI read
        assert all(k.startswith("text_model.") or k == "text_projection.weight"
                   for k in load_file(str(info.folder / info.record["files"][part]))), part
    base_pipeline = _plain(sdxl)
    for part in ("unet", "text_encoder", "text_encoder_2"):  # each part learned
        ours_part, base_part = getattr(plain, part).state_dict(), getattr(base_pipeline, part).state_dict()
        assert any(not torch.equal(ours_part[k], base_part[k]) for k in base_part), part
    ours = load_pipeline(sdxl, "cpu")
    ours_base = _image(ours, prompt)
    attached = attach(ours, adapter_weights(info), "sku_adapter")
    assert np.abs(_image(ours, prompt) - tuned).max() <= 1 and not np.array_equal(tuned, ours_base)
    detach(ours, attached)
    assert np.array_equal(_image(ours, prompt), ours_base)


@pytest.mark.parametrize("method", ["textual-inversion", "pivotal", "dreambooth"])
def test_resume_after_interruption_gives_the_same_files(method, trained, sample_catalogue, tmp_path):
    source = _source(sample_catalogue)
    with pytest.raises(InterruptedError):
        train_class(source, "ring", ["band"], tmp_path, sdxl_config(method), progress=crash_in_training_step(4))
    train_class(source, "ring", ["band"], tmp_path, sdxl_config(method), resume=True)
    resumed, reference = read_adapter(tmp_path / "adapters" / "ring" / "band"), trained[method]
    assert resumed.record["resumed_from_step"] == 2
    assert resumed.record["loss_curve"] == reference.record["loss_curve"]
    names = [name for name in resumed.record["files"].values() if name]
    assert names
    for name in names:
        assert (resumed.folder / name).read_bytes() == (reference.folder / name).read_bytes(), name


def test_an_sdxl_embedding_missing_an_encoder_is_refused_by_name(trained, tmp_path):
    import json
    import shutil

    from catalog_gen.storage import sha256_file

    info = trained["textual-inversion"]
    folder = tmp_path / "band"
    shutil.copytree(info.folder, folder)
    file = folder / info.embeddings_file.name
    save_file({"clip_l": load_file(str(file))["clip_l"]}, str(file))
    record = json.loads((folder / "adapter.json").read_text())
    record["embeddings_sha256"] = sha256_file(file)
    (folder / "adapter.json").write_text(json.dumps(record))
    with pytest.raises(CatalogError, match=r"learned_embeds.safetensors holds \['clip_l'\], expected an SDXL "
                                           r"embedding's \['clip_l', 'clip_g'\]"):
        adapter_weights(read_adapter(folder))


@pytest.mark.parametrize("method", ["textual-inversion", "dreambooth"])
def test_catalog_eval_draws_with_each_checkpoints_own_weights(method, trained):
    """A checkpoint holds both encoders' vectors (or all three trained parts); eval puts them all on."""
    import polars as pl

    from catalog_gen.config import build_config, read_recipe
    from catalog_gen.evaluate.evaluation import EvalConfig, run_eval

    out = run_eval(trained[method].folder.parents[2], "ring", ["band"],
                   build_config(EvalConfig, read_recipe("tiny_sweep", "eval"), {}))
    table = pl.read_parquet(out / "eval.parquet")
    assert table["step"].to_list() == [2, 4, 6] and table["clip_i"].is_finite().all()
    assert table["fid_base"][0] != table["fid_base"][2]


def test_catalog_generate_takes_an_sdxl_pivotal_adapter(trained, tmp_path):
    from dataclasses import replace

    import polars as pl

    from catalog_gen.config import GenerateConfig, build_config, read_recipe
    from catalog_gen.generate.generation import GenerationRequest, generate

    config = replace(build_config(GenerateConfig, read_recipe("tiny_nightly", "generate"), {}), base_model="tiny-sdxl",
                     n_images=1, max_extra=0, base_images=1, allow_base_mismatch=True)
    sheet = tmp_path / "skus.csv"
    sheet.write_text("sku,class,instance,metal,view,setting\nRG-BAND-1,ring,band,gold,front view,on marble\n")
    summary = generate(GenerationRequest(sheet, trained["pivotal"].folder.parents[2], tmp_path / "run"), config)
    assert not summary.errors and summary.candidates == 1
    [prompt] = pl.read_parquet(tmp_path / "run" / "manifest.parquet")["prompt"].to_list()
    assert "<ring-band>" in prompt


def test_full_dreambooths_sdxl_single_file_reloads_weight_for_weight(trained, sdxl):
    """The SGM single file (what A1111 and ComfyUI load as an SDXL checkpoint), read by plain diffusers'
    StableDiffusionXLPipeline.from_single_file: every component as the adapter's folders (and the base's VAE)
    hold it, rounded to fp16, and the image as the folders draw it once they are rounded the same way."""
    import diffusers
    from safetensors import safe_open
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from catalog_gen.models.loading import own_aligned_memory
    from test_single_file import SINGLE_FILE_DTYPE, _assert_loaded, _rounded_like_the_file

    info = trained["dreambooth"]
    with safe_open(str(info.single_file), "pt") as handle:
        keys = list(handle.keys())
        assert {handle.get_slice(key).get_dtype() for key in keys} == {"F16"}
    assert {key.split(".")[0] for key in keys} == {"model", "first_stage_model", "conditioner"}
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight") for k in keys)
    assert any(k.startswith("model.diffusion_model.label_emb.0.0.") for k in keys)

    reloaded = diffusers.StableDiffusionXLPipeline.from_single_file(str(info.single_file), config=str(sdxl.path),
                                                                    local_files_only=True)
    folders = diffusers.StableDiffusionXLPipeline.from_pretrained(
        sdxl.path, local_files_only=True,
        unet=diffusers.UNet2DConditionModel.from_pretrained(info.folder, subfolder="unet"),
        text_encoder=CLIPTextModel.from_pretrained(info.folder, subfolder="text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(info.folder, subfolder="text_encoder_2"))
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_loaded(getattr(reloaded, part), _rounded_like_the_file(getattr(folders, part).state_dict()), part)
    with torch.no_grad():
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            for parameter in getattr(folders, part).parameters():
                parameter.copy_(parameter.to(SINGLE_FILE_DTYPE).float())
    for pipeline in (reloaded, folders):
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            own_aligned_memory(getattr(pipeline, part))
    prompt = info.record["instance_prompt"]
    assert np.array_equal(_image(reloaded, prompt), _image(folders, prompt))
