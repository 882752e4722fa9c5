"""Base models: presets built offline, loaded through the same loader as a real folder; clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from catalog_gen.errors import CatalogError
from catalog_gen.models.loading import load_pipeline, load_tokenizer, model_fingerprint, resolve_base_model
from catalog_gen.models.presets import materialise_preset


def test_tiny_preset_is_an_ordinary_diffusers_folder(tiny_model):
    index = json.loads((tiny_model.path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for component in ("unet", "vae", "text_encoder"):
        assert list((tiny_model.path / component).glob("*.safetensors")), component
    assert (tiny_model.path / "tokenizer" / "vocab.json").is_file()
    assert (tiny_model.path / "tokenizer" / "merges.txt").is_file()
    size = sum(f.stat().st_size for f in tiny_model.path.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"tiny preset is {size / 2**20:.1f} MB"


def test_tiny_preset_loads_back_as_a_local_folder_and_generates(tiny_model, tmp_path):
    copy = tmp_path / "my-model"
    shutil.copytree(tiny_model.path, copy)
    local = resolve_base_model(str(copy))
    assert local.source == "local"
    pipeline = load_pipeline(local)
    image = pipeline("photo of a ring", num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert model_fingerprint(local) == model_fingerprint(tiny_model)


def test_a_model_stored_in_fp16_loads_in_one_dtype_and_generates(tiny_model, tmp_path):
    # SD 1.5 and sd15-shape are stored in fp16; on a CPU every component must come back fp32
    # (an fp16 text encoder beside an fp32 UNet fails on the first prompt).
    from diffusers import StableDiffusionPipeline

    stored = tmp_path / "fp16-model"
    StableDiffusionPipeline.from_pretrained(tiny_model.path, local_files_only=True).to(torch.float16).save_pretrained(
        stored, safe_serialization=True)
    pipeline = load_pipeline(resolve_base_model(str(stored)), "cpu")
    assert {pipeline.unet.dtype, pipeline.vae.dtype, pipeline.text_encoder.dtype} == {torch.float32}
    image = pipeline("photo of a ring", num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert load_pipeline(resolve_base_model(str(stored)), "cpu", "bf16").text_encoder.dtype == torch.bfloat16
    with pytest.raises(CatalogError, match="fp16.*needs a CUDA GPU"):
        load_pipeline(resolve_base_model(str(stored)), "cpu", "fp16")


def test_preset_build_is_deterministic(tmp_path, tiny_model):
    rebuilt = materialise_preset("tiny", cache_dir=tmp_path)
    for component in ("unet", "vae", "text_encoder"):
        first = next((tiny_model.path / component).glob("*.safetensors")).read_bytes()
        second = next((rebuilt / component).glob("*.safetensors")).read_bytes()
        assert first == second, component


def test_tokenizer_is_a_real_bpe(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    ids = tokenizer("photo of a pair of hoops").input_ids
    assert 3 <= len(ids) <= 10
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


def test_missing_model_names_the_model_and_how_to_get_it():
    with pytest.raises(CatalogError, match="not in the local Hugging Face cache.*never downloads"):
        resolve_base_model("nobody/no-such-model")


def test_nonsense_spec_is_rejected():
    with pytest.raises(CatalogError, match="not found"):
        resolve_base_model("not a model")


def test_pickle_only_folder_is_refused(tiny_model, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model.path, folder)
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.rename(folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CatalogError, match=r"unet/ holds only pickle weights \(diffusion_pytorch_model.bin\)"):
        resolve_base_model(str(folder))


def test_folder_without_model_index_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogError, match="no model_index.json"):
        resolve_base_model(str(tmp_path / "empty"))


def test_single_file_checkpoint_is_refused(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(CatalogError, match="is a single-file checkpoint; catalog-gen trains SD 1.x and SD 2.x "
                                           "diffusers folders"):
        resolve_base_model(str(checkpoint))


def test_unknown_preset_lists_presets(tmp_path):
    with pytest.raises(CatalogError, match="toy, tiny, tiny-sd2, tiny-sdxl, sd15-shape, sdxl-shape"):
        materialise_preset("huge", cache_dir=tmp_path)


def test_fingerprinting_writes_nothing_into_the_model_folder_or_the_hub_cache(tiny_model, tmp_path):
    """Hashes are remembered in catalog-gen's own cache; a hub blob's name already is its sha256."""
    import hashlib
    import os

    from catalog_gen.models.loading import BaseModel

    local = tmp_path / "local"
    shutil.copytree(tiny_model.path, local)
    before = sorted(p.relative_to(local) for p in local.rglob("*"))
    first = model_fingerprint(BaseModel("local", local, "local"))
    assert model_fingerprint(BaseModel("local", local, "local")) == first  # from the memo now
    assert sorted(p.relative_to(local) for p in local.rglob("*")) == before

    # The same weights laid out as a Hugging Face cache: snapshot files link to blobs named by sha256.
    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, blob)
            link = snapshot / path.relative_to(local)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, link.parent), link)
    cached = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    assert model_fingerprint(BaseModel("someone/tiny", snapshot, "hf-cache")) == first
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == cached


def test_native_resolution_and_embedders_follow_the_base_model(tiny_model, tmp_path):
    import json
    import shutil

    from catalog_gen.config import GenerateConfig
    from catalog_gen.models.loading import REAL_EMBEDDERS, BaseModel, default_embedders, native_resolution

    assert native_resolution(tiny_model) == 64 and default_embedders(tiny_model) == ("tiny-clip", "tiny-dino")
    # A real model folder: SD 2.1's layout, 96 x 8 = 768 px; the gates get the real CLIP and DINO.
    folder = tmp_path / "sd21"
    shutil.copytree(tiny_model.path, folder)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**unet, "sample_size": 96}))
    vae = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**vae, "block_out_channels": [8, 16, 32, 32]}))
    real = BaseModel(str(folder), folder, "local")
    assert native_resolution(real) == 768 and default_embedders(real) == REAL_EMBEDDERS
    config = GenerateConfig().resolve_for(native_resolution(real), default_embedders(real))
    assert (config.resolution, config.clip_model, config.dino_model) == (768, *REAL_EMBEDDERS)
    pinned = GenerateConfig(resolution=512, clip_model="toy-clip").resolve_for(768, REAL_EMBEDDERS)
    assert (pinned.resolution, pinned.clip_model, pinned.dino_model) == (512, "toy-clip", REAL_EMBEDDERS[1])


def test_a_download_of_only_what_the_loader_reads_loads(tiny_model, tmp_path):
    """The README's `hf download ... --include` line leaves out safety_checker/ and feature_extractor/, which
    SD 1.5's model_index.json still lists."""
    import json
    import shutil

    from catalog_gen.models.loading import BaseModel, load_pipeline

    folder = tmp_path / "sd15-layout"
    shutil.copytree(tiny_model.path, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    (folder / "model_index.json").write_text(json.dumps(index))
    assert not (folder / "safety_checker").exists() and not (folder / "feature_extractor").exists()
    pipeline = load_pipeline(BaseModel(str(folder), folder, "local"))
    assert pipeline.safety_checker is None and pipeline.feature_extractor is None
