"""Built-in base models made from code, so the demo, the tests and the benchmarks run offline.

Presets, each materialised once as an ordinary diffusers folder in the cache and then
loaded through exactly the same loader as a user's real model folder:

- `tiny`: a few MB, 64 px, a small real BPE tokenizer; fast enough to train on a CPU.
- `tiny-sd2`: `tiny` with SD 2.x's architecture changes and v-prediction, for the SD 2 code paths.
- `tiny-sdxl`: `tiny` as SDXL is built (two text encoders, micro-conditioning), for the SDXL code paths.
- `sd15-shape`: the Stable Diffusion 1.5 architecture (UNet 860M, CLIP ViT-L/14 text
  encoder, VAE) with random weights, for speed and memory figures. It draws noise.
- `sdxl-shape`: the SDXL base 1.0 architecture (UNet 2.6B, CLIP-L and OpenCLIP-bigG), random weights, likewise.

Weights are drawn from a fixed seed, so a preset is the same on every machine.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from catalog_gen.models import bpe
from catalog_gen.errors import CatalogError
from catalog_gen.seeds import isolated_rng
from catalog_gen.storage import atomic_write_json, build_once

# Bump when a preset's architecture or recipe changes, so old cache folders are not reused.
PRESET_FORMAT = 1
_COMPLETE_MARKER = "catalog_gen_preset.json"

# Stable Diffusion's noise schedule (scaled-linear betas); both presets share it.
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    resolution: int
    build: Callable[[Path], None]
    version: Callable[[], str] | None = None
    """A tag of what the build makes (the toy world's weight hashes; a changed spec's number), so a changed
    preset gets a new cache folder and the other presets keep theirs."""
    embedders: tuple[str, str] = ("tiny-clip", "tiny-dino")
    """The CLIP and DINO models the gates use with this base when a recipe names none."""


def cache_root() -> Path:
    """Where built-in models live: $CATALOG_GEN_CACHE, else ~/.cache/catalog-gen."""
    configured = os.environ.get("CATALOG_GEN_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "catalog-gen"


def materialise_preset(name: str, cache_dir: Path | None = None) -> Path:
    """Return the diffusers folder of a preset, building it the first time."""
    preset = PRESETS.get(name)
    if preset is None:
        raise CatalogError(f"unknown preset '{name}'; built-in presets: {', '.join(PRESETS)}")
    tag = f"-{preset.version()}" if preset.version else ""
    folder = (cache_dir or cache_root()) / "presets" / f"{name}-v{PRESET_FORMAT}{tag}"

    def build(staging: Path) -> None:
        preset.build(staging)
        atomic_write_json(staging / _COMPLETE_MARKER, {"preset": name, "format": PRESET_FORMAT})

    return build_once(folder, _is_complete_pipeline, build)


def _is_complete_pipeline(folder: Path) -> bool:
    # The weights are checked too: a build made off rank 0 by an earlier release has the marker and no text encoder.
    return (folder / _COMPLETE_MARKER).is_file() and all(
        any((folder / component).glob("*.safetensors")) for component in ("unet", "vae", "text_encoder"))


def save_transformers_model(model, folder: Path) -> None:
    """config.json and model.safetensors of a transformers model, written by whichever process calls.

    transformers 5's save_pretrained writes no weights on a process other than rank 0 once
    torch.distributed is up (as under accelerate launch), and a preset is built by whichever
    process asks first: that left a preset with a completion marker and no model in it.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def save_pipeline(out_dir: Path, unet, vae, text_encoder, tokenizer_dir: Path, dtype: torch.dtype,
                  scheduler: dict | None = None) -> None:
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    if dtype != torch.float32:
        vae, text_encoder, unet = vae.to(dtype), text_encoder.to(dtype), unet.to(dtype)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(**(scheduler or SD_SCHEDULER)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    save_transformers_model(text_encoder, out_dir / "text_encoder")  # see save_transformers_model
    # Ship the tokenizer as SD 1.5 does (vocab.json + merges.txt), not only transformers' tokenizer.json.
    for source in tokenizer_dir.iterdir():
        shutil.copyfile(source, out_dir / "tokenizer" / source.name)


# Per preset: text encoder, VAE and UNet constructor arguments, and the storage dtype.
_TINY = dict(
    text_encoder=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      projection_dim=32),
    # Four VAE levels give SD's 8x down-sampling: 64 px images -> 8x8 latents.
    vae=dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),
    unet=dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8),
    dtype=torch.float32,
)
# SD 2.x's changes, at the tiny size: an OpenCLIP-style text encoder (GELU), linear projections in the
# UNet's transformer blocks, a head width per block, and v-prediction as SD 2.1 (768 px) trains.
_TINY_SD2 = dict(
    text_encoder={**_TINY["text_encoder"], "hidden_act": "gelu"},
    vae=_TINY["vae"],
    unet={**_TINY["unet"], "use_linear_projection": True, "attention_head_dim": (2, 4)},
    scheduler={**SD_SCHEDULER, "prediction_type": "v_prediction"},
    dtype=torch.float32,
)
# The published SD 1.5 configurations; only the weights are random.
_SD15 = dict(
    # vocab_size is the real CLIP one, so the embedding costs what it really costs.
    text_encoder=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, projection_dim=768),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
    unet=dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
              cross_attention_dim=768, attention_head_dim=8),
    # Stored in fp16 like the published checkpoint: half the disk, same shapes.
    dtype=torch.float16,
)


def _build(out_dir: Path, spec: dict) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer_dir = out_dir / "_tokenizer_build"
    bpe.write_clip_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_settings = dict(vocab_size=len(tokenizer), max_position_embeddings=77, hidden_act="quick_gelu",
                         **_special_token_ids(tokenizer))
    text_settings.update(spec["text_encoder"])
    with isolated_rng(0):
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_settings))
    with isolated_rng(1):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            **spec["vae"])
    with isolated_rng(2):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
    save_pipeline(out_dir, unet, vae, text_encoder, tokenizer_dir, spec["dtype"], spec.get("scheduler"))
    shutil.rmtree(tokenizer_dir, ignore_errors=True)


# SDXL at the tiny size: two text encoders (CLIP-L-style, and an OpenCLIP-bigG-style one with a projection whose
# pooled output conditions the UNet), size/crop micro-conditioning ("text_time"), linear projections, no
# attention in the first block and more transformer layers deeper down, as SDXL's UNet has; its VAE scaling
# factor and force_upcast (SDXL's VAE overflows in fp16). The second encoder is wider than the first, as bigG (1280)
# is than CLIP-L (768): with equal widths a mix-up of the two (which diffusers' single-file loader tells apart by
# width) would pass unseen.
_TINY_SDXL = dict(
    text_encoder=_TINY["text_encoder"],
    text_encoder_2={**_TINY["text_encoder"], "hidden_size": 48, "intermediate_size": 96, "projection_dim": 48,
                    "hidden_act": "gelu"},
    vae={**_TINY["vae"], "scaling_factor": 0.13025, "force_upcast": True},
    unet=dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
              cross_attention_dim=32 + 48, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
              addition_embed_type="text_time", addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=6 * 8 + 48),  # 6 size/crop numbers, then the pooled text
    dtype=torch.float32,
)
# The published SDXL base 1.0 configurations; only the weights are random.
_SDXL = dict(
    text_encoder=_SD15["text_encoder"],
    text_encoder_2=dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                        num_attention_heads=20, projection_dim=1280, hidden_act="gelu"),
    vae={**_SD15["vae"], "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    unet=dict(sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=2816),
    dtype=torch.float16,
)
SDXL_SCHEDULER = {**{k: v for k, v in SD_SCHEDULER.items() if k != "clip_sample"}, "timestep_spacing": "leading"}
"""SDXL base's EulerDiscreteScheduler settings (the same noise schedule as SD 1.x)."""


def _build_sdxl(out_dir: Path, spec: dict) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer_dir = out_dir / "_tokenizer_build"
    bpe.write_clip_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=77, hidden_act="quick_gelu",
                  **_special_token_ids(tokenizer))
    with isolated_rng(0):
        text_encoder = CLIPTextModel(CLIPTextConfig(**{**common, **spec["text_encoder"]}))
    with isolated_rng(3):
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**common, **spec["text_encoder_2"]}))
    with isolated_rng(1):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            **spec["vae"])
    with isolated_rng(2):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
    modules = (vae, text_encoder, text_encoder_2, unet)
    if spec["dtype"] != torch.float32:
        modules = tuple(module.to(spec["dtype"]) for module in modules)
    vae, text_encoder, text_encoder_2, unet = modules
    pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                         scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER))
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    for part, encoder in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        save_transformers_model(encoder, out_dir / part)  # see save_transformers_model
    for folder in ("tokenizer", "tokenizer_2"):  # vocab.json + merges.txt, as the published SDXL ships them
        for source in tokenizer_dir.iterdir():
            shutil.copyfile(source, out_dir / folder / source.name)
    shutil.rmtree(tokenizer_dir, ignore_errors=True)


def _special_token_ids(tokenizer) -> dict[str, int]:
    # CLIP pools the text embedding at the end-of-text token, so the config must know its id.
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def _copy_toy_world(out_dir: Path) -> None:
    from catalog_gen.toy import shipped

    shipped.copy_checked("toy-sd", out_dir)


def _toy_world_tag() -> str:
    from catalog_gen.toy import shipped

    return shipped.weights_digest()


PRESETS: dict[str, Preset] = {
    "toy": Preset("toy", "the pretrained toy world: a small SD that draws jewelry, 64 px (NOT Stable Diffusion; "
                  "catalog_gen/toy/MODEL_CARD.md)", 64, _copy_toy_world, _toy_world_tag, ("toy-clip", "toy-dino")),
    "tiny": Preset("tiny", "tiny SD-style model, 64 px, trains on a CPU (demo and tests)", 64,
                   lambda out_dir: _build(out_dir, _TINY)),
    "tiny-sd2": Preset("tiny-sd2", "tiny SD 2.x-style model (v-prediction, GELU text encoder, linear projections), "
                       "64 px (tests)", 64, lambda out_dir: _build(out_dir, _TINY_SD2)),
    "tiny-sdxl": Preset("tiny-sdxl", "tiny SDXL-style model (two text encoders, size/crop conditioning), 64 px "
                        "(tests)", 64, lambda out_dir: _build_sdxl(out_dir, _TINY_SDXL),
                        version=lambda: "2"),  # 2: the second text encoder 48 wide (was 32, as the first)
    "sd15-shape": Preset(
        "sd15-shape", "Stable Diffusion 1.5 architecture with random weights (benchmarks)", 512,
        lambda out_dir: _build(out_dir, _SD15)  # random towers: its images are noise, real CLIP would add nothing
    ),
    "sdxl-shape": Preset("sdxl-shape", "SDXL base 1.0 architecture with random weights (benchmarks)", 1024,
                         lambda out_dir: _build_sdxl(out_dir, _SDXL)),
}
