"""Full DreamBooth's single-file checkpoint (the whole pipeline in the original CompVis layout, for A1111 /
ComfyUI): its names for every architecture we ship, read back by diffusers' own single-file reader, and the
file a tiny-preset training writes, loaded with plain diffusers' from_single_file and drawn with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from catalog_gen.errors import CatalogError
from catalog_gen.train.single_file import SINGLE_FILE_DTYPE, original_layout

FP16_IMAGE_TOLERANCE = 2
"""Largest pixel difference (of 255) allowed between the fp16 single file's image and the fp32 diffusers
folders' one. Measured: 1 level at most (mean 0.02) on the tiny preset's 3-step draw, where the fine-tune
moves pixels by up to 107 levels from the base model's; so fp16 stays (single_file.SINGLE_FILE_DTYPE)."""


# ---------------------------------------------------------------- names: every architecture we ship

def _meta_models(architecture: str):
    """(unet, vae, text_encoder) of an architecture on the meta device: every name and shape, no weights,
    so sd15-shape's billion parameters cost nothing. Built as presets.py builds them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from catalog_gen.models import presets

    with torch.device("meta"):
        if architecture == "toy":
            from catalog_gen.toy.shipped import weights_root

            folder = weights_root() / "toy-sd"
            return (UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text())),
                    AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text())),
                    CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")))
        spec = {"tiny": presets._TINY, "sd15-shape": presets._SD15}[architecture]
        levels = len(spec["vae"]["block_out_channels"])
        return (UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"]),
                AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                              down_block_types=("DownEncoderBlock2D",) * levels,
                              up_block_types=("UpDecoderBlock2D",) * levels, **spec["vae"]),
                CLIPTextModel(CLIPTextConfig(max_position_embeddings=77, hidden_act="quick_gelu",
                                             **spec["text_encoder"])))


def _numbered_states(architecture: str):
    """Each weight replaced by a one-element tensor of its own number (same ndim), so a weight read back from
    the wrong name shows as the wrong number."""
    unet, vae, text_encoder = _meta_models(architecture)
    numbered, number = {}, 0
    for part, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        numbered[part] = {}
        for key, tensor in model.state_dict().items():
            number += 1
            numbered[part][key] = torch.full((1,) * tensor.ndim, float(number))
    return numbered, dict(unet.config), dict(vae.config)


def _read_back_problems(original: dict, states: dict, unet_config: dict, vae_config: dict) -> list[str]:
    """What diffusers' own single-file reader (the code from_single_file runs) makes of `original`, compared
    with the diffusers state dicts it came from: a weight not read back, read back under another name, or
    an original name nothing reads, each named."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    read = {"unet": convert_ldm_unet_checkpoint(original, unet_config),
            "vae": convert_ldm_vae_checkpoint(original, vae_config),
            "text_encoder": {key.removeprefix("text_model."): tensor
                             for key, tensor in convert_ldm_clip_checkpoint(original).items()}}
    problems = []
    for part, state in states.items():
        got = read[part]
        problems += [f"{part}: {key} not read back" for key in state if got.get(key) is None]
        problems += [f"{part}: {key} read back from a name that is not its own" for key in state
                     if got.get(key) is not None and not torch.equal(got[key], state[key])]
        problems += [f"{part}: {key} read back but is no weight" for key in got if key not in state]
    read_count = sum(len(part) for part in read.values())
    if read_count != len(original):
        problems.append(f"{len(original)} tensors written, {read_count} read back")
    return problems


@pytest.mark.parametrize("architecture", ["tiny", "toy", "sd15-shape"])
def test_every_weight_has_one_original_name_that_diffusers_reads_back(architecture):
    states, unet_config, vae_config = _numbered_states(architecture)
    original = original_layout(states["unet"], unet_config, states["vae"], vae_config, states["text_encoder"])
    assert len(original) == sum(len(state) for state in states.values())  # none dropped, none merged
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(key.startswith(prefixes) for key in original)
    assert _read_back_problems(original, states, unet_config, vae_config) == []


def test_sd15_shape_has_the_names_and_shapes_of_published_sd15_checkpoints():
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    states, unet_config, vae_config = _numbered_states("sd15-shape")
    original = original_layout(states["unet"], unet_config, states["vae"], vae_config, states["text_encoder"])
    # Names every v1-5-pruned file has: each level's downsampler and upsampler, the last blocks, the VAE's
    # shortcuts and mid attention, CLIP's last layer.
    for key in ("model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.input_blocks.9.0.op.bias",
                "model.diffusion_model.input_blocks.11.0.in_layers.2.weight",
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.middle_block.2.emb_layers.1.weight",
                "model.diffusion_model.output_blocks.2.1.conv.weight", "model.diffusion_model.output_blocks.5.2.conv.weight",
                "model.diffusion_model.output_blocks.8.2.conv.weight",
                "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
                "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
                "model.diffusion_model.time_embed.2.weight", "model.diffusion_model.out.2.weight",
                "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
                "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
                "first_stage_model.decoder.up.3.upsample.conv.weight", "first_stage_model.encoder.down.2.downsample.conv.weight",
                "first_stage_model.encoder.norm_out.weight", "first_stage_model.post_quant_conv.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.bias"):
        assert key in original, key
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in original  # the full-size level
    assert "model.diffusion_model.input_blocks.12.0.op.weight" not in original  # the deepest level
    # The original VAE attends with 1x1 convolutions: 4-D weights where diffusers has linear layers.
    for name in ("q", "k", "v", "proj_out"):
        assert original[f"first_stage_model.decoder.mid.attn_1.{name}.weight"].ndim == 4
    assert original["first_stage_model.decoder.mid.attn_1.q.bias"].ndim == 1
    assert infer_diffusers_model_type(original) == "v1"  # what single-file loaders tell SD 1.x by


def test_a_swapped_or_missing_name_is_caught():
    """The read-back check itself: a mapping that swaps two same-shaped weights, or loses one, fails it."""
    states, unet_config, vae_config = _numbered_states("tiny")
    original = original_layout(states["unet"], unet_config, states["vae"], vae_config, states["text_encoder"])
    q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    k = q.replace("to_q", "to_k")
    swapped = {**original, q: original[k], k: original[q]}
    problems = _read_back_problems(swapped, states, unet_config, vae_config)
    assert sorted(problems) == sorted(f"unet: {name} read back from a name that is not its own" for name in (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight"))
    dropped = {key: tensor for key, tensor in original.items() if key != "first_stage_model.encoder.mid.attn_1.v.bias"}
    assert "vae: encoder.mid_block.attentions.0.to_v.bias not read back" in _read_back_problems(
        dropped, states, unet_config, vae_config)


def test_a_weight_or_block_the_layout_has_no_place_for_is_refused():
    states, unet_config, vae_config = _numbered_states("tiny")
    unet, vae, text = states["unet"], states["vae"], states["text_encoder"]
    with pytest.raises(CatalogError, match=r"UNet weight 'add_embedding.linear_1.weight' has no place"):
        original_layout({**unet, "add_embedding.linear_1.weight": torch.zeros(1, 1)}, unet_config, vae, vae_config, text)
    with pytest.raises(CatalogError, match=r"'conv3.weight' is not a part of down_blocks.0.resnets.0"):
        original_layout({**unet, "down_blocks.0.resnets.0.conv3.weight": torch.zeros(1, 1)}, unet_config, vae,
                        vae_config, text)
    # A config with more layers than the weights: the places it calls for are named, not left empty.
    with pytest.raises(CatalogError, match=r"UNet: its config calls for down_blocks.0.resnets.1"):
        original_layout(unet, {**unet_config, "layers_per_block": 2}, vae, vae_config, text)
    with pytest.raises(CatalogError, match=r"only .* have a place in the SD 1.x single-file layout"):
        original_layout(unet, {**unet_config, "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]},
                        vae, vae_config, text)
    with pytest.raises(CatalogError, match=r"text encoder weight 'text_projection.weight' has no place"):
        original_layout(unet, unet_config, vae, vae_config, {**text, "text_projection.weight": torch.zeros(1, 1)})


def test_weights_fp16_cannot_hold_are_refused_not_written_as_inf():
    from catalog_gen.train.single_file import in_single_file_dtype

    assert in_single_file_dtype("w", torch.tensor([1.0, -65504.0])).dtype == SINGLE_FILE_DTYPE
    with pytest.raises(CatalogError, match=r"weight 'w' has values fp16 cannot hold .* largest magnitude 70000"):
        in_single_file_dtype("w", torch.tensor([1.0, 7e4]))
    with pytest.raises(CatalogError, match=r"weight 'w' has values fp16 cannot hold"):
        in_single_file_dtype("w", torch.tensor([float("nan")]))


# ---------------------------------------------------------------- end to end: train, write, reload, draw

@pytest.fixture(scope="module")
def dreambooth(sample_catalogue, tmp_path_factory):
    """ring/band, full DreamBooth with the text encoder trained too, on the tiny preset."""
    from catalog_gen.train.adapters import read_adapter
    from catalog_gen.train.workflow import train_class
    from test_methods import method_config
    from test_training import _source

    workdir = tmp_path_factory.mktemp("single-file")
    config = method_config("dreambooth", train_text_encoder=True, checkpoint_every=0, validation_images=0)
    summary = train_class(_source(sample_catalogue), "ring", ["band"], workdir, config)
    assert [o.status for o in summary.outcomes] == ["trained"], summary.outcomes
    return read_adapter(workdir / "adapters" / "ring" / "band")


def _from_single_file(path: Path, config_folder: Path):
    """Plain diffusers, offline: `config=` a local diffusers folder gives every component's config (and the
    tokenizer and scheduler), so neither the hub nor an original .yaml config is needed."""
    from diffusers import StableDiffusionPipeline

    from catalog_gen.models.loading import own_aligned_memory

    pipeline = StableDiffusionPipeline.from_single_file(str(path), config=str(config_folder), local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        own_aligned_memory(module)  # as load_pipeline does: CPU results must not depend on the file's layout
    return pipeline


def _rounded_like_the_file(state: dict) -> dict:
    return {key: tensor.to(SINGLE_FILE_DTYPE).float() for key, tensor in state.items()}


def _assert_loaded(module, expected: dict, what: str) -> None:
    loaded = module.state_dict()
    assert module.dtype == torch.float32, what
    assert loaded.keys() == expected.keys(), what
    different = [key for key in expected if not torch.equal(loaded[key], expected[key])]
    assert not different, f"{what}: {len(different)} weights differ, e.g. {different[:3]}"


def test_full_dreambooth_writes_a_single_file_plain_diffusers_loads_and_draws_with(dreambooth, tiny_model):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from catalog_gen.models.loading import load_pipeline, own_aligned_memory
    from catalog_gen.storage import sha256_file
    from test_methods import _image

    info = dreambooth
    assert info.record["files"]["single_file"] == "ring_band.safetensors"
    assert info.single_file == info.folder / "ring_band.safetensors"
    assert info.record["single_file_sha256"] == sha256_file(info.single_file)
    with safe_open(str(info.single_file), "pt") as handle:
        assert handle.metadata()["catalog_gen_token"] == info.token
        assert {handle.get_slice(key).get_dtype() for key in handle.keys()} == {"F16"}

    # 1. The weights: the fine-tuned UNet and text encoder as the diffusers folders hold them, the base's
    # VAE, each rounded to fp16 and nothing else.
    reloaded = _from_single_file(info.single_file, tiny_model.path)
    base = load_pipeline(tiny_model)
    trained = {part: load_file(str(info.folder / info.record["files"][part])) for part in ("unet", "text_encoder")}
    # The text encoder's file keeps CLIP's text_model. level, which transformers 5's CLIPTextModel drops.
    trained["text_encoder"] = {k.removeprefix("text_model."): v for k, v in trained["text_encoder"].items()}
    _assert_loaded(reloaded.unet, _rounded_like_the_file(trained["unet"]), "unet")
    _assert_loaded(reloaded.text_encoder, _rounded_like_the_file(trained["text_encoder"]), "text encoder")
    _assert_loaded(reloaded.vae, _rounded_like_the_file(base.vae.state_dict()), "vae")

    # 2. The images: the diffusers-folder version of the same adapter, as test_methods loads it.
    prompt = info.record["instance_prompt"]
    folders = StableDiffusionPipeline.from_pretrained(
        tiny_model.path, unet=UNet2DConditionModel.from_pretrained(info.folder, subfolder="unet"),
        text_encoder=CLIPTextModel.from_pretrained(info.folder, subfolder="text_encoder"),
        safety_checker=None, requires_safety_checker=False, local_files_only=True)
    folders.set_progress_bar_config(disable=True)
    for module in (folders.unet, folders.vae, folders.text_encoder):
        own_aligned_memory(module)
    from_file, from_folders, from_base = _image(reloaded, prompt), _image(folders, prompt), _image(base, prompt)
    assert np.abs(from_file - from_folders).max() <= FP16_IMAGE_TOLERANCE
    assert np.abs(from_base - from_folders).max() > 10 * FP16_IMAGE_TOLERANCE  # the fine-tune shows, the rounding not
    # fp16 rounding is the only difference: the folders' weights rounded the same way draw the very same image.
    with torch.no_grad():
        for module in (folders.unet, folders.vae, folders.text_encoder):
            for parameter in module.parameters():
                parameter.copy_(parameter.to(SINGLE_FILE_DTYPE).float())
    assert np.array_equal(_image(folders, prompt), from_file)


@pytest.mark.slow  # builds models (conftest marks by fixture; this one needs none)
def test_the_toy_world_base_model_maps_and_reloads_too(tmp_path):
    """The toy preset's VAE has no mid-block attention and 4x down-sampling, its UNet attends deeper down:
    written from its shipped folder (nothing trained) and read back by from_single_file, weight for weight."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from catalog_gen.toy.shipped import weights_root
    from catalog_gen.train.single_file import write_single_file

    folder = weights_root() / "toy-sd"
    path = write_single_file(tmp_path / "toy.safetensors", folder, {}, {})
    reloaded = _from_single_file(path, folder)
    for part, model_class in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        shipped = model_class.from_pretrained(folder, subfolder=part, local_files_only=True).float().state_dict()
        _assert_loaded(getattr(reloaded, part), _rounded_like_the_file(shipped), part)


def test_an_adapter_whose_single_file_went_missing_is_refused(dreambooth, tmp_path):
    import shutil

    from catalog_gen.train.adapters import read_adapter

    copy = tmp_path / "band"
    shutil.copytree(dreambooth.folder, copy)
    (copy / "ring_band.safetensors").unlink()
    with pytest.raises(CatalogError, match=r"ring_band.safetensors is missing"):
        read_adapter(copy)
    # An adapter written before single files existed records none, and reads as it always did.
    record = json.loads((copy / "adapter.json").read_text())
    del record["files"]["single_file"], record["single_file_sha256"]
    (copy / "adapter.json").write_text(json.dumps(record))
    assert read_adapter(copy).single_file is None
