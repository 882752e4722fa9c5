"""Drawing images from a (possibly LoRA-carrying) Stable Diffusion model.

Used for prior-preservation class images, validation images at checkpoints and,
later, the nightly generator. Every image has its own seeded generator, so an image
depends only on its prompt and seed, not on batch size or order.
"""

from __future__ import annotations

from typing import Sequence

import torch

from catalog_gen.errors import CatalogError

SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


def make_scheduler(name: str, base_config):
    import diffusers

    if name not in SCHEDULERS:
        raise CatalogError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(base_config)


def pipeline_from_components(components, scheduler: str = "ddim"):
    """A pipeline sharing the already-loaded modules (no second copy in memory): StableDiffusionPipeline, or
    StableDiffusionXLPipeline when the components have SDXL's second text encoder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    shared = dict(vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
                  unet=components.unet, scheduler=make_scheduler(scheduler, components.noise_scheduler.config))
    if components.text_encoder_2 is not None:
        pipeline = StableDiffusionXLPipeline(**shared, text_encoder_2=components.text_encoder_2,
                                             tokenizer_2=components.tokenizer_2)
    else:
        pipeline = StableDiffusionPipeline(**shared, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def draw(pipeline, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, resolution: int,
         guidance: float = 7.5, negative_prompt: str | None = None, batch_size: int = 4):
    """Generate one image per (prompt, seed) as PIL images, in batches."""
    if len(prompts) != len(seeds):
        raise CatalogError(f"draw: {len(prompts)} prompts but {len(seeds)} seeds")
    images = []
    latent_side = resolution // pipeline.vae_scale_factor  # SD: 8x; the toy world's VAE: 4x
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds[chunk]]
        # Latents drawn on the CPU from per-image generators: identical on any device and batch size.
        latents = torch.stack([
            torch.randn((pipeline.unet.config.in_channels, latent_side, latent_side), generator=g)
            for g in generators
        ]).to(pipeline.device, dtype=pipeline.unet.dtype)
        result = pipeline(
            list(prompts[chunk]),
            negative_prompt=[negative_prompt] * len(generators) if negative_prompt else None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=resolution,
            width=resolution,
            latents=latents,
            generator=generators,
        )
        images.extend(result.images)
    return images
