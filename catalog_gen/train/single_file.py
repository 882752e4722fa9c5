"""A whole SD 1.x or SDXL pipeline as one single-file checkpoint, in the original CompVis/LDM (SDXL: Stability's
SGM) key layout that AUTOMATIC1111 and ComfyUI load from their checkpoint folders (and diffusers'
from_single_file):

    model.diffusion_model.*                   the UNet, with ldm's UNetModel names (input_blocks.N.M, middle_block,
                                              output_blocks.N.M, time_embed, out; SDXL's label_emb)
    first_stage_model.*                       the VAE (encoder.down.N.block.M, mid.attn_1, decoder.up.N...)
    cond_stage_model.transformer.text_model.* SD 1.x: the CLIP text encoder, with transformers' CLIPTextModel names
    conditioner.embedders.0.transformer.text_model.*
                                              SDXL: CLIP-L, the same way
    conditioner.embedders.1.model.*           SDXL: OpenCLIP-bigG in open_clip's own layout (transformer.resblocks.N
                                              with one in_proj for q, k and v; ln_final; text_projection as
                                              width x projection, the transpose of transformers' linear weight)

The mapping is pure: diffusers state dicts and configs in, one renamed state dict out. It is derived from
the configs (block_out_channels, layers_per_block, which blocks attend), not from a table of SD 1.5's keys,
so the tiny and toy presets map by the same rules as SD 1.5. A weight with no place in the original layout,
or a place the config calls for that no weight fills, is an error: nothing is dropped or guessed silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from catalog_gen.errors import CatalogError
from catalog_gen.storage import sort_safetensors_metadata

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."
SDXL_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."
COMPONENTS = ("unet", "vae", "text_encoder")
SDXL_COMPONENTS = COMPONENTS + ("text_encoder_2",)

SINGLE_FILE_DTYPE = torch.float16
"""fp16: what A1111 / ComfyUI users download as a "pruned fp16" checkpoint. Half the size (2 GB for an SD 1.5
model rather than 4), and both tools run SD 1.x in fp16 on a GPU by default, so the rounding (at most a
relative 5e-4 per weight) costs nothing they would see: on the tiny preset the image moves by 1 level of 255
(tests/test_single_file.py). The fp32 weights stay in the adapter's diffusers folders for further training."""


@dataclass(frozen=True)
class Place:
    """Where one diffusers module's tensors go in the original layout."""

    diffusers: str
    """The module's name in the diffusers model: "down_blocks.0.resnets.1"."""
    original: str
    """Its name in the original model: "input_blocks.2.0"."""
    parts: tuple[tuple[str, str], ...]
    """Every sub-name the module may hold, diffusers' then the original's ("conv_shortcut" -> "skip_connection");
    whatever follows a sub-name is kept as it is. A sub-name not listed is an error."""
    conv_1x1: bool = False
    """The original is a 1x1 convolution where diffusers has a linear layer: 2-D weights become (out, in, 1, 1)."""


_PARAMETERS = (("weight", "weight"), ("bias", "bias"))  # a single layer, named as it is
_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
# diffusers' Transformer2DModel keeps the names of ldm's SpatialTransformer, inner blocks included.
_UNET_TRANSFORMER = tuple((name, name) for name in ("norm", "proj_in", "transformer_blocks", "proj_out"))
_VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
               ("conv_shortcut", "nin_shortcut"))
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))

TEXT_ENCODER_PLACES = (
    Place("embeddings", "embeddings", tuple((name, name) for name in ("token_embedding", "position_embedding",
                                                                      "position_ids"))),
    Place("encoder", "encoder", (("layers", "layers"),)),
    Place("final_layer_norm", "final_layer_norm", _PARAMETERS),
)
"""The text encoder keeps transformers' names under the original prefix (ldm's FrozenCLIPEmbedder wraps the
same CLIPTextModel); only transformers' own `text_model.` level, which newer releases drop, is normalised."""


def _per_block(value, blocks: int, what: str) -> list[int]:
    """layers_per_block: one number for every block, or one per block."""
    values = [int(value)] * blocks if isinstance(value, int) else [int(v) for v in value]
    if len(values) != blocks:
        raise CatalogError(f"{what}: layers_per_block {value} does not give one number per block ({blocks} blocks)")
    return values


def unet_places(config: Mapping) -> list[Place]:
    """Where each module of an SD 1.x-architecture UNet2DConditionModel goes in ldm's UNetModel, from its config.

    ldm numbers its blocks in order: input_blocks.0 is conv_in, then per level one block per resnet (with its
    attention beside it) and one for the downsampler; output_blocks run from the deepest level up, layers + 1
    per level, the upsampler joining the level's last block."""
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    levels = len(config["block_out_channels"])
    if len(down_types) != levels or len(up_types) != levels:
        raise CatalogError(f"UNet: {len(down_types)} down and {len(up_types)} up blocks for {levels} "
                           "block_out_channels; not an SD 1.x-architecture UNet")
    known_down, known_up = {"CrossAttnDownBlock2D", "DownBlock2D"}, {"CrossAttnUpBlock2D", "UpBlock2D"}
    if set(down_types) - known_down or set(up_types) - known_up:
        raise CatalogError(f"UNet blocks {down_types} / {up_types}: only {sorted(known_down)} and {sorted(known_up)} "
                           "have a place in the SD 1.x single-file layout")
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise CatalogError(f"UNet mid block {mid_type!r}: the SD 1.x single-file layout has UNetMidBlock2DCrossAttn")
    down_attends = [kind == "CrossAttnDownBlock2D" for kind in down_types]
    up_attends = [kind == "CrossAttnUpBlock2D" for kind in up_types]
    # ldm derives both sides from one list of attention resolutions, so it cannot hold a lopsided UNet.
    if up_attends != down_attends[::-1]:
        raise CatalogError(f"UNet attends at down blocks {down_types} but up blocks {up_types}; the original "
                           "layout needs the same resolutions attended on the way down and up")
    layers = _per_block(config["layers_per_block"], levels, "UNet")

    places = [Place("conv_in", "input_blocks.0.0", _PARAMETERS),
              Place("time_embedding.linear_1", "time_embed.0", _PARAMETERS),
              Place("time_embedding.linear_2", "time_embed.2", _PARAMETERS)]
    block = 1
    for level in range(levels):
        for layer in range(layers[level]):
            places.append(Place(f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{block}.0", _UNET_RESNET))
            if down_attends[level]:
                places.append(Place(f"down_blocks.{level}.attentions.{layer}", f"input_blocks.{block}.1",
                                    _UNET_TRANSFORMER))
            block += 1
        if level < levels - 1:
            places.append(Place(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{block}.0.op", _PARAMETERS))
            block += 1
    places += [Place("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
               Place("mid_block.attentions.0", "middle_block.1", _UNET_TRANSFORMER),
               Place("mid_block.resnets.1", "middle_block.2", _UNET_RESNET)]
    block = 0
    for level, level_layers in enumerate(reversed(layers)):  # up_blocks.0 is the deepest level
        for layer in range(level_layers + 1):
            places.append(Place(f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{block}.0", _UNET_RESNET))
            if up_attends[level]:
                places.append(Place(f"up_blocks.{level}.attentions.{layer}", f"output_blocks.{block}.1",
                                    _UNET_TRANSFORMER))
            block += 1
        if level < levels - 1:
            # The upsampler sits in the level's last block, after its resnet (and attention).
            slot = 2 if up_attends[level] else 1
            places.append(Place(f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{block - 1}.{slot}.conv",
                                _PARAMETERS))
    places += [Place("conv_norm_out", "out.0", _PARAMETERS), Place("conv_out", "out.2", _PARAMETERS)]
    if config.get("addition_embed_type") == "text_time":  # SDXL: the pooled text and size/crop conditioning
        places += [Place("add_embedding.linear_1", "label_emb.0.0", _PARAMETERS),
                   Place("add_embedding.linear_2", "label_emb.0.2", _PARAMETERS)]
    return places


def vae_places(config: Mapping) -> list[Place]:
    """Where each module of an SD-style AutoencoderKL goes in ldm's Encoder / Decoder, from its config.

    ldm numbers the decoder's levels by resolution (up.0 is the full-size one, without an upsampler),
    diffusers in the order they run (up_blocks.0 is the smallest): up_blocks.i is up.(levels - 1 - i)."""
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    levels = len(config["block_out_channels"])
    if set(down_types) != {"DownEncoderBlock2D"} or set(up_types) != {"UpDecoderBlock2D"} or \
            len(down_types) != levels or len(up_types) != levels:
        raise CatalogError(f"VAE blocks {down_types} / {up_types}: the SD 1.x single-file layout has "
                           f"{levels} DownEncoderBlock2D and UpDecoderBlock2D blocks")
    layers = int(config["layers_per_block"])
    attends = config.get("mid_block_add_attention", True)  # the toy world's VAE has none

    def mid(side: str) -> list[Place]:
        attention = [Place(f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", _VAE_ATTENTION, conv_1x1=True)]
        return [Place(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", _VAE_RESNET),
                *(attention if attends else []),
                Place(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", _VAE_RESNET)]

    places = [Place("encoder.conv_in", "encoder.conv_in", _PARAMETERS)]
    for level in range(levels):
        places += [Place(f"encoder.down_blocks.{level}.resnets.{layer}", f"encoder.down.{level}.block.{layer}",
                         _VAE_RESNET) for layer in range(layers)]
        if level < levels - 1:
            places.append(Place(f"encoder.down_blocks.{level}.downsamplers.0.conv",
                                f"encoder.down.{level}.downsample.conv", _PARAMETERS))
    places += [*mid("encoder"), Place("encoder.conv_norm_out", "encoder.norm_out", _PARAMETERS),
               Place("encoder.conv_out", "encoder.conv_out", _PARAMETERS),
               Place("decoder.conv_in", "decoder.conv_in", _PARAMETERS), *mid("decoder")]
    for level in range(levels):
        resolution = levels - 1 - level
        places += [Place(f"decoder.up_blocks.{level}.resnets.{layer}", f"decoder.up.{resolution}.block.{layer}",
                         _VAE_RESNET) for layer in range(layers + 1)]
        if level < levels - 1:
            places.append(Place(f"decoder.up_blocks.{level}.upsamplers.0.conv",
                                f"decoder.up.{resolution}.upsample.conv", _PARAMETERS))
    places += [Place("decoder.conv_norm_out", "decoder.norm_out", _PARAMETERS),
               Place("decoder.conv_out", "decoder.conv_out", _PARAMETERS)]
    if config.get("use_quant_conv", True):
        places.append(Place("quant_conv", "quant_conv", _PARAMETERS))
    if config.get("use_post_quant_conv", True):
        places.append(Place("post_quant_conv", "post_quant_conv", _PARAMETERS))
    return places


def place_tensors(state: Mapping[str, torch.Tensor], places: Sequence[Place], prefix: str, what: str
                  ) -> dict[str, torch.Tensor]:
    """One component's tensors under their original names (prefix + place + sub-name). Every tensor must
    have a place, every place a tensor, and no two tensors one name."""
    by_module = {place.diffusers: place for place in places}
    placed: dict[str, torch.Tensor] = {}
    filled: set[str] = set()
    for key, tensor in state.items():
        place, rest = _place_of(key, by_module)
        if place is None:
            raise CatalogError(f"{what} weight '{key}' has no place in the SD 1.x single-file layout; "
                               "its model is not an SD 1.x architecture, or its config does not describe it")
        name = f"{prefix}{place.original}.{_renamed(rest, place, key, what)}"
        if name in placed:
            raise CatalogError(f"{what}: two weights map to '{name}' (the second is '{key}')")
        placed[name] = tensor[:, :, None, None] if place.conv_1x1 and tensor.ndim == 2 else tensor
        filled.add(place.diffusers)
    empty = [place.diffusers for place in places if place.diffusers not in filled]
    if empty:
        raise CatalogError(f"{what}: its config calls for {', '.join(empty[:3])}{' ...' if len(empty) > 3 else ''}, "
                           "which its weights do not have; the config does not describe these weights")
    return placed


def _place_of(key: str, by_module: Mapping[str, Place]) -> tuple[Place | None, str]:
    parts = key.split(".")
    for cut in range(1, len(parts)):
        place = by_module.get(".".join(parts[:cut]))
        if place is not None:
            return place, ".".join(parts[cut:])
    return None, ""


def _renamed(rest: str, place: Place, key: str, what: str) -> str:
    for diffusers_name, original_name in place.parts:
        if rest == diffusers_name or rest.startswith(diffusers_name + "."):
            return original_name + rest[len(diffusers_name):]
    raise CatalogError(f"{what} weight '{key}': '{rest}' is not a part of {place.diffusers} the single-file "
                       f"layout knows ({', '.join(name for name, _ in place.parts)})")


def original_layout(unet: Mapping[str, torch.Tensor], unet_config: Mapping, vae: Mapping[str, torch.Tensor],
                    vae_config: Mapping, text_encoder: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The three components' diffusers state dicts as one state dict in the original single-file layout.
    Tensors keep their dtype; none is copied (the VAE attention's 1x1 convolutions are views)."""
    text = {key.removeprefix("text_model."): tensor for key, tensor in text_encoder.items()}
    return {**place_tensors(unet, unet_places(unet_config), UNET_PREFIX, "UNet"),
            **place_tensors(vae, vae_places(vae_config), VAE_PREFIX, "VAE"),
            **place_tensors(text, TEXT_ENCODER_PLACES, TEXT_ENCODER_PREFIX, "text encoder")}


_OPEN_CLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
                    ("self_attn.out_proj", "attn.out_proj"))


def open_clip_layout(text_encoder: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's state dict (SDXL's OpenCLIP-bigG, as diffusers converts it) back in
    open_clip's layout, under no prefix. Every tensor is placed or the call fails; position_ids, a buffer
    transformers keeps, has no place there and is left out."""
    state = {key.removeprefix("text_model."): tensor for key, tensor in text_encoder.items()
             if not key.endswith("position_ids")}
    out = {"token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": state.pop("final_layer_norm.weight"), "ln_final.bias": state.pop("final_layer_norm.bias"),
           "text_projection": state.pop("text_projection.weight").T}
    for layer in range(layers):
        source, target = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{target}attn.in_proj_{kind}"] = torch.cat([state.pop(f"{source}self_attn.{part}_proj.{kind}")
                                                             for part in ("q", "k", "v")])
            for ours, theirs in _OPEN_CLIP_LAYER:
                out[f"{target}{theirs}.{kind}"] = state.pop(f"{source}{ours}.{kind}")
    if state:
        raise CatalogError(f"SDXL second text encoder: weights {sorted(state)[:3]} have no place in open_clip's "
                           "layout; its config does not describe it")
    return out


def sdxl_layout(states: Mapping[str, Mapping[str, torch.Tensor]], unet_config: Mapping, vae_config: Mapping,
                text_encoder_2_layers: int) -> dict[str, torch.Tensor]:
    """SDXL's four components (diffusers state dicts) as one state dict in the SGM single-file layout."""
    clip_l = {key.removeprefix("text_model."): tensor for key, tensor in states["text_encoder"].items()}
    big_g = open_clip_layout(states["text_encoder_2"], text_encoder_2_layers)
    return {**place_tensors(states["unet"], unet_places(unet_config), UNET_PREFIX, "UNet"),
            **place_tensors(states["vae"], vae_places(vae_config), VAE_PREFIX, "VAE"),
            **place_tensors(clip_l, TEXT_ENCODER_PLACES, SDXL_TEXT_ENCODER_PREFIX, "text encoder"),
            **{SDXL_TEXT_ENCODER_2_PREFIX + key: tensor for key, tensor in big_g.items()}}


def in_single_file_dtype(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A floating tensor rounded to SINGLE_FILE_DTYPE, refused if fp16 cannot hold it (beyond +-65504, or
    already NaN / inf from a diverged run): a checkpoint that draws black images is worse than none."""
    if not tensor.is_floating_point():
        return tensor.contiguous()
    rounded = tensor.to(SINGLE_FILE_DTYPE).contiguous()
    if not torch.isfinite(rounded).all():
        raise CatalogError(f"single-file checkpoint: weight '{key}' has values fp16 cannot hold (beyond "
                           f"+-65504, or NaN / inf); largest magnitude {tensor.abs().max().item():g}")
    return rounded


def write_single_file(path: Path, base_model: Path, trained: Mapping[str, Mapping[str, torch.Tensor]],
                      metadata: Mapping[str, str], sdxl: bool = False) -> Path:
    """Write the whole pipeline to `path`: the `trained` components (the fit's "unet", maybe the text
    encoders) and the rest from the base model's diffusers folder, in fp16, in the original layout (sdxl: SGM's)."""
    from safetensors.torch import save_file

    # 1. Every component's weights: the fine-tuned ones, else the base model's.
    states = {part: trained[part] if part in trained else _base_weights(base_model, part)
              for part in (SDXL_COMPONENTS if sdxl else COMPONENTS)}
    # 2. The architecture the names follow: the base model's configs (a fine-tune does not change it).
    unet_config, vae_config = (_read_config(base_model / part / "config.json") for part in ("unet", "vae"))
    # 3. Renamed, then rounded.
    if sdxl:
        layers = int(_read_config(base_model / "text_encoder_2" / "config.json")["num_hidden_layers"])
        placed = sdxl_layout(states, unet_config, vae_config, layers)
    else:
        placed = original_layout(states["unet"], unet_config, states["vae"], vae_config, states["text_encoder"])
    tensors = {key: in_single_file_dtype(key, tensor) for key, tensor in placed.items()}
    save_file(tensors, str(path), metadata={"format": "pt", **metadata})
    sort_safetensors_metadata(path)  # the same bytes from the same weights: single_file_sha256 is recorded
    return path


def _base_weights(base_model: Path, part: str) -> dict[str, torch.Tensor]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from catalog_gen.models.loading import quiet_model_loading

    model_class = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
                   "text_encoder_2": CLIPTextModelWithProjection}[part]
    with quiet_model_loading():
        # Loaded straight into the file's dtype: the same single rounding as later, at half the memory.
        model = model_class.from_pretrained(base_model, subfolder=part, use_safetensors=True, local_files_only=True,
                                            torch_dtype=SINGLE_FILE_DTYPE)
    return model.state_dict()


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CatalogError(f"single-file checkpoint: cannot read {path} ({error})") from error
