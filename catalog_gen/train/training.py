"""Fine-tuning of one adapter per product instance: DreamBooth-LoRA, textual inversion, pivotal tuning, full
DreamBooth, and the instance stage of two-stage training (methods.py says what each trains).

The flow follows a setup -> load -> fit split:
    load_components()  the frozen base model, once per process, reused by every instance
    fit()              1. encode photos and prompts once   2. add what the method trains (a fresh LoRA,
                       new token embeddings, the base model's own weights; a frozen class LoRA under it)
                       3. resume from the latest checkpoint   4. the loop:
                       noise, denoise, loss, step, checkpoint

Resume is exact because nothing in the loop depends on hidden state: every random draw
(which photos, the noise and its offset, the timesteps, LoRA dropout) comes from a generator seeded by
(seed, instance, step), the learning rate is a function of the step, and the optimizer
state is saved with each checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from catalog_gen.train.checkpoints import (
    TrainingState, list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint,
)
from catalog_gen.config import TrainConfig
from catalog_gen import seeds
from catalog_gen.errors import CatalogError
from catalog_gen.models.loading import BaseModel
from catalog_gen.train import embeddings, losses, methods
from catalog_gen.train.adapters import STACKED_ADAPTER as STACKED  # a two-stage class LoRA's adapter name

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass(frozen=True)
class InstanceJob:
    """Everything needed to train one instance's adapter."""

    class_key: str
    instance_key: str
    token: str
    instance_prompt: str
    class_prompt: str
    photos: tuple[Path, ...]
    """Normalised training photos (square RGB PNGs written by intake)."""
    checkpoint_dir: Path
    class_images: tuple[Path, ...] = ()
    """Prior-preservation images of the class (empty without prior preservation)."""
    initializer: str = ""
    """Text whose token embeddings new tokens start from (the class noun); textual inversion and pivotal."""
    stacked_lora: Path | None = None
    """two-stage: the class LoRA (diffusers file) this instance's LoRA trains on top of, frozen."""
    stacked_weight: float = 1.0
    stacked_sha256: str | None = None
    captions: tuple[str, ...] = ()
    """lora-captions: one prompt per photo (same order), used instead of instance_prompt."""

    @property
    def key(self) -> str:
        return f"{self.class_key}/{self.instance_key}"


@dataclass
class Components:
    """The frozen base model on its device, loaded once per process."""

    model: BaseModel
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    device: torch.device
    weight_dtype: torch.dtype
    text_encoder_2: torch.nn.Module | None = None
    """SDXL's second text encoder (OpenCLIP-bigG with the pooled projection); None for SD 1.x and 2.x."""
    tokenizer_2: object | None = None


@dataclass
class FitResult:
    """The trained LoRA tensors and what it took to make them."""

    unet_layers: dict[str, torch.Tensor] | None
    """The UNet's LoRA tensors (None: the method trains no LoRA)."""
    text_encoder_layers: dict[str, torch.Tensor] | None
    text_encoder_2_layers: dict[str, torch.Tensor] | None
    """SDXL with train_text_encoder: the second text encoder's LoRA tensors."""
    unet_lora_config: dict | None
    text_encoder_lora_config: dict | None
    state: TrainingState
    resumed_from: int | None
    steps_per_second: float
    checkpoints: list[int] = field(default_factory=list)
    embeddings: tuple[torch.Tensor, ...] | None = None
    """The learned token embeddings, one (len(tokens), dim) tensor per text encoder (textual inversion, pivotal)."""
    tokens: tuple[str, ...] = ()
    full_weights: dict[str, dict[str, torch.Tensor]] | None = None
    """method dreambooth: the trained state dict of "unet" (and "text_encoder", SDXL's "text_encoder_2"), by
    module parameter name."""


def weight_dtype_for(config: TrainConfig, device: torch.device) -> torch.dtype:
    if config.mixed_precision == "fp16":
        if device.type != "cuda":
            raise CatalogError("mixed_precision 'fp16' needs a CUDA GPU; on this device use 'no' or 'bf16'")
        return torch.float16
    if config.mixed_precision == "bf16":
        return torch.bfloat16
    return torch.float32


def load_components(model: BaseModel, config: TrainConfig, device: torch.device) -> Components:
    """Load the base model once, frozen, in the training precision."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from catalog_gen.models.loading import own_aligned_memory, quiet_model_loading

    dtype = weight_dtype_for(config, device)
    common = dict(use_safetensors=True, local_files_only=True)
    with quiet_model_loading():
        tokenizer = CLIPTokenizer.from_pretrained(model.path / "tokenizer", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(model.path, subfolder="text_encoder", **common)
        vae = AutoencoderKL.from_pretrained(model.path, subfolder="vae", **common)
        unet = UNet2DConditionModel.from_pretrained(model.path, subfolder="unet", **common)
        noise_scheduler = DDPMScheduler.from_pretrained(model.path, subfolder="scheduler", local_files_only=True)
        tokenizer_2 = text_encoder_2 = None
        if model.family is not None and model.family.two_text_encoders:
            tokenizer_2 = CLIPTokenizer.from_pretrained(model.path / "tokenizer_2", local_files_only=True)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(model.path, subfolder="text_encoder_2",
                                                                         **common)
    for module in (text_encoder, text_encoder_2, vae, unet):
        if module is None:
            continue
        module.requires_grad_(False)
        module.to(device, dtype=dtype)
        if device.type == "cpu":
            own_aligned_memory(module)
    if config.attention == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as error:  # diffusers raises ModuleNotFoundError/ValueError variants
            raise CatalogError(f"attention 'xformers' is not available ({error}); install '.[gpu]' or use 'sdpa'") from error
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in (text_encoder, text_encoder_2) if config.train_text_encoder else ():
            if encoder is None:
                continue
            # transformers 5 renamed it (the old name warns); older releases know only the old one.
            enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
            enable()
    return Components(model, tokenizer, text_encoder, vae, unet, noise_scheduler, device, dtype, text_encoder_2,
                      tokenizer_2)


def learning_rate_at(step: int, config: TrainConfig, base_lr: float) -> float:
    """Pure schedule: linear warm-up, then constant, cosine or linear decay to zero."""
    if config.warmup_steps and step < config.warmup_steps:
        return base_lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return base_lr
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.lr_schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (1.0 - progress)


def photo_positions(step: int, batch_size: int, count: int, seed: int) -> list[int]:
    """Which photos a step sees: a fresh seeded shuffle per epoch, so every photo is used equally."""
    chosen = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, count)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seeds.epoch_order(seed, epoch)))
        chosen.append(int(order[offset]))
    return chosen


def load_image_tensor(path: Path, resolution: int) -> torch.Tensor:
    """A training image as a (3, H, W) tensor in [-1, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (resolution, resolution):
            raise CatalogError(f"{path}: training image is {image.size[0]}x{image.size[1]}, expected {resolution}px square")
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@torch.no_grad()
def encode_prompts(components: Components, prompts: Sequence[str]) -> torch.Tensor:
    return encode_text(components, tokenize(components, prompts))[0]


def tokenize(components: Components, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids, (n, 77); SDXL's two tokenizers give (n, 2, 77), so a row still indexes one prompt."""
    def ids(tokenizer):
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(components.device)
    if components.text_encoder_2 is None:
        return ids(components.tokenizer)
    return torch.stack([ids(components.tokenizer), ids(components.tokenizer_2)], dim=1)


def encode_text(components: Components, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The UNet's text conditioning: the text encoder's last hidden states (SD 1.x, 2.x; pooled None), or for
    SDXL both encoders' penultimate hidden states side by side and the second's pooled projection, as
    StableDiffusionXLPipeline.encode_prompt builds them."""
    if components.text_encoder_2 is None:
        return components.text_encoder(ids)[0], None
    first = components.text_encoder(ids[:, 0], output_hidden_states=True).hidden_states[-2]
    second = components.text_encoder_2(ids[:, 1], output_hidden_states=True)
    return torch.cat([first, second.hidden_states[-2]], dim=-1), second.text_embeds


def added_conditioning(components: Components, resolution: int, pooled: torch.Tensor | None) -> dict | None:
    """The UNet's added_cond_kwargs: for SDXL the pooled text and the size/crop conditioning of each sample, in
    the training precision; None for SD 1.x and 2.x."""
    if pooled is None:
        return None
    return {"text_embeds": pooled.to(components.weight_dtype),
            "time_ids": micro_conditioning(components, resolution, len(pooled)).to(components.weight_dtype)}


def micro_conditioning(components: Components, resolution: int, count: int) -> torch.Tensor:
    """SDXL's size and crop conditioning per sample: original size, crop top-left, target size. Intake pads
    every photo to a square at the training resolution and never crops: (res, res, 0, 0, res, res)."""
    values = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
    return values.repeat(count, 1).to(components.device)


VAE_ENCODE_BATCH = 4
"""Images per VAE encoder call. SD's encoder holds about 1 GB of activations per 512 px image in
fp32, so 100 class images in one call would need the memory of a much larger GPU than a T4."""


@torch.no_grad()
def encode_latent_distribution(components: Components, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's posterior mean and std per image; latents are sampled from it every step."""
    vae = components.vae
    # A VAE that says it overflows in fp16 (SDXL's: force_upcast) encodes in fp32, then goes back to fp16, as
    # diffusers' SDXL pipeline decodes with it; the photos are encoded once, so the fp32 copy is brief.
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    means, stds = [], []
    try:
        for chunk in images.split(VAE_ENCODE_BATCH):
            dist = vae.encode(chunk.to(components.device, dtype=vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    finally:
        if upcast:
            vae.to(torch.float16)
    return torch.cat(means), torch.cat(stds)


def sample_latents(components: Components, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    eps = torch.randn(mean.shape, generator=generator).to(mean.device)
    return (mean + std * eps) * components.vae.config.scaling_factor


ADDED_SINCE_FIRST_ADAPTERS = ("min_snr_gamma", "noise_offset", "use_dora", "prodigy_d_coef")
"""Settings newer than adapters already trained. At their defaults they change nothing, and they are left out
of the fingerprint there, so such an adapter is still found finished (and its checkpoints resumable)."""


def training_fingerprint(config: TrainConfig, job: InstanceJob, base_fingerprint: str, photo_hashes: Sequence[str]) -> str:
    """What a checkpoint must share with the run that resumes it. `steps` is left out on purpose,
    so a finished run can be extended; checkpoint and validation settings change no weights."""
    ignored = {"checkpoint_every", "keep_checkpoints", "validation_images", "validation_steps", "base_model"}
    ignored |= methods.method_of(config).unused
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    ignored |= {name for name in ADDED_SINCE_FIRST_ADAPTERS if getattr(config, name) == defaults[name]}
    if config.optimizer != "prodigy":
        ignored.add("prodigy_d_coef")
    if config.method == "dreambooth-lora":
        ignored.add("method")  # the only method before there were others: its adapters stay recognised
    if config.lr_schedule == "constant" and config.method != "pivotal":
        ignored.add("steps")  # a decaying schedule depends on the total, a constant one does not; nor does
        #                       pivotal's, whose embeddings stop at a fraction of it
    settings = {k: v for k, v in config.to_dict().items() if k not in ignored}
    record = {"settings": settings, "base": base_fingerprint, "photos": list(photo_hashes),
              "class_images": len(job.class_images), "token": job.token,
              "prompts": [job.instance_prompt, job.class_prompt]}
    if job.stacked_sha256 is not None:  # two-stage: trained on top of exactly this class LoRA
        record["stacked_on"] = job.stacked_sha256
    if job.captions:  # lora-captions: every caption is a prompt trained on
        record["captions"] = list(job.captions)
    payload = json.dumps(record, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def optimizer_step(loss: torch.Tensor, optimizer, scaler, params: list[torch.nn.Parameter],
                   max_grad_norm: float, frozen: Sequence[torch.nn.Parameter] = ()) -> None:
    """Backward and one optimizer step. Under fp16 the gradients are unscaled before clipping,
    so the clip threshold means the same as without a scaler.

    `frozen` parameters lose their gradient after the clip (which still sees it), so no optimizer moves them:
    setting their group's lr to 0 would not do, as Prodigy steps every parameter that has a gradient by its
    one global step size whatever the group's lr."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    for param in frozen:
        param.grad = None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def lora_config_record(lora_config) -> dict:
    """A peft LoraConfig as plain JSON (sets as sorted lists): stored in checkpoints and adapter files."""
    def plain(value):
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
    return plain(lora_config.to_dict())


def _add_lora(components: Components, config: TrainConfig, instance_key: str):
    from peft import LoraConfig

    unet_config = LoraConfig(r=config.lora_rank, lora_alpha=config.resolved_lora_alpha, lora_dropout=config.lora_dropout,
                             init_lora_weights=True, target_modules=UNET_LORA_TARGETS, use_dora=config.use_dora)
    text_config = None
    # LoRA's A matrices start random (peft draws them from torch's global generator): seeded, so a rerun
    # starts from the same point, and isolated, so the caller's generator is left as it was.
    with seeds.isolated_rng(seeds.lora_init(config.seed, instance_key), cuda=components.device.type == "cuda"):
        components.unet.add_adapter(unet_config)
        if config.train_text_encoder:
            text_config = LoraConfig(r=config.lora_rank, lora_alpha=config.resolved_lora_alpha,
                                     lora_dropout=config.lora_dropout, init_lora_weights=True,
                                     target_modules=TEXT_ENCODER_LORA_TARGETS, use_dora=config.use_dora)
            _inject_text_encoder_lora(components.text_encoder, text_config)
            if components.text_encoder_2 is not None:  # SDXL: both encoders, one setting
                _inject_text_encoder_lora(components.text_encoder_2, copy.deepcopy(text_config))
    return unet_config, text_config




def _stack_under(components: Components, lora_file: Path, weight: float) -> None:
    """Load a LoRA beside the trainable one, frozen, both active: the instance learns what the class LoRA
    does not already draw. A text-encoder part, if the file has one, is not stacked (class stages train
    the UNet only)."""
    import warnings

    # From the file, so its metadata (rank, alpha) gives the stacked LoRA its trained scale.
    with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        components.unet.load_lora_adapter(str(lora_file.parent), weight_name=lora_file.name, prefix="unet",
                                          adapter_name=STACKED, local_files_only=True)
    components.unet.set_adapters(["default", STACKED], weights=[1.0, weight])
    for name, param in components.unet.named_parameters():
        if STACKED in name:
            param.requires_grad_(False)
        elif ".default." in name:
            param.requires_grad_(True)


def _inject_text_encoder_lora(text_encoder: torch.nn.Module, lora_config) -> None:
    """Add LoRA layers to the text encoder with peft itself.

    transformers' own `add_adapter` demands a peft release newer than any published yet
    (transformers 5.24 asks for peft >= 0.22), so we inject through peft and record the
    config where transformers and diffusers look for it.
    """
    from peft import inject_adapter_in_model

    inject_adapter_in_model(lora_config, text_encoder, adapter_name="default")
    text_encoder.peft_config = {"default": lora_config}
    text_encoder._hf_peft_config_loaded = True


def remove_lora(components: Components) -> None:
    """Take the instance's LoRA out again so the next instance starts from the pure base model.

    The peft wrapper modules are removed too (not only the adapter weights), so the model
    is exactly the loaded base model again, module for module.
    """
    from diffusers.utils import recurse_remove_peft_layers

    for module in (components.unet, components.text_encoder, components.text_encoder_2):
        if getattr(module, "peft_config", None):
            recurse_remove_peft_layers(module)
            del module.peft_config
            module._hf_peft_config_loaded = False


def _trainable(module: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Parameter]:
    found = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            # LoRA weights live in fp32 even under fp16: an fp16 master copy is what makes
            # GradScaler fail with "Attempting to unscale FP16 gradients".
            param.data = param.data.float()
            found[prefix + name] = param
    return found


def _make_optimizer(config: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """One parameter group per trained part, each {"params": [...], "lr": its base learning rate}."""
    kwargs = dict(betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                  eps=config.adam_epsilon)
    if config.optimizer == "prodigy":
        return _make_prodigy(config, groups, kwargs)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise CatalogError("optimizer 'adamw8bit' needs bitsandbytes (pip install bitsandbytes)") from error
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def _make_prodigy(config: TrainConfig, groups: list[dict], adam_kwargs: dict) -> torch.optim.Optimizer:
    """Prodigy: Adam whose step size it estimates as it goes (its group lr multiplies the estimate). Its
    estimate lives in the param groups (d, d_max, d_numerator, k), which checkpoints save with the rest."""
    import io

    try:
        from prodigyopt import Prodigy
    except ImportError as error:
        raise CatalogError("optimizer 'prodigy' needs prodigyopt (pip install prodigyopt)") from error
    # Bias correction and safeguard warm-up as the diffusers advanced DreamBooth scripts default them:
    # safeguard keeps a warm-up's small learning rate out of the estimate's denominator.
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice about decoupled weight decay
        return Prodigy(groups, decouple=True, use_bias_correction=True, safeguard_warmup=True,
                       d_coef=config.prodigy_d_coef, **adam_kwargs)


def fit(components: Components, config: TrainConfig, job: InstanceJob, fingerprint: str, *, resume: bool,
        progress: Callable | None = None, on_checkpoint: Callable[[int], None] | None = None) -> FitResult:
    """Train one LoRA on one instance. The base model must carry no adapter on entry.

    Dropout draws from torch's global generator; the whole fit runs in seeds.isolated_rng, so the
    caller's generator state is the same after it as before.
    """
    with seeds.isolated_rng(cuda=components.device.type == "cuda"):
        return _fit(components, config, job, fingerprint, resume=resume, progress=progress,
                    on_checkpoint=on_checkpoint)


def _fit(components: Components, config: TrainConfig, job: InstanceJob, fingerprint: str, *, resume: bool,
         progress: Callable | None, on_checkpoint: Callable[[int], None] | None) -> FitResult:
    method = methods.method_of(config)
    if method.full:
        # The base model's own weights are trained: put back afterwards, for the next instance.
        with base_weights_restored(components, config.train_text_encoder):
            return _fit_with(components, config, job, fingerprint, None, resume=resume, progress=progress,
                             on_checkpoint=on_checkpoint)
    if not method.new_tokens:
        return _fit_with(components, config, job, fingerprint, None, resume=resume, progress=progress,
                         on_checkpoint=on_checkpoint)
    # New tokens: the tokenizer and the text encoder know them only inside this block.
    from catalog_gen.catalog.tokens import new_token_names

    new = embeddings.start_tokens(components, new_token_names(job.token, config.embedding_vectors),
                                  job.initializer or job.token)
    with embeddings.new_tokens_applied(components, new):
        return _fit_with(components, config, job, fingerprint, new, resume=resume, progress=progress,
                         on_checkpoint=on_checkpoint)


@contextlib.contextmanager
def base_weights_restored(components: Components, text_encoder_too: bool):
    """Within: the UNet (and the text encoders) may be trained in place; on exit their weights, dtype and
    frozen state are the loaded base model's again, bit for bit (a copy is kept in CPU memory)."""
    modules = [components.unet] + (list(trained_text_encoders(components).values()) if text_encoder_too else [])
    saved = [{name: tensor.detach().to("cpu", copy=True) for name, tensor in module.state_dict().items()}
             for module in modules]
    try:
        yield
    finally:
        for module, state in zip(modules, saved):
            module.to(dtype=components.weight_dtype)
            module.load_state_dict(state)
            module.requires_grad_(False)
            module.eval()


def trained_text_encoders(components: Components) -> dict[str, torch.nn.Module]:
    """What train_text_encoder trains, by attribute name: the text encoder, and SDXL's second one beside it."""
    return {encoder: getattr(components, encoder) for _, encoder in embeddings.encoder_pairs(components)}


def _fit_with(components: Components, config: TrainConfig, job: InstanceJob, fingerprint: str,
              new_tokens: embeddings.NewTokens | None, *, resume: bool,
              progress: Callable | None, on_checkpoint: Callable[[int], None] | None) -> FitResult:
    device = components.device
    method = methods.method_of(config)
    # 1. Encode every photo and prompt once: the encoders are frozen, so this is exact.
    #    (cache_latents=false re-encodes the drawn photos every step instead: same numbers, more time.)
    photos = torch.stack([load_image_tensor(p, config.resolution) for p in job.photos])
    class_photos = (torch.stack([load_image_tensor(p, config.resolution) for p in job.class_images])
                    if job.class_images else None)
    latent_cache = {}
    if config.cache_latents:
        latent_cache["photos"] = encode_latent_distribution(components, photos)
        if class_photos is not None:
            latent_cache["class"] = encode_latent_distribution(components, class_photos)
        photos = class_photos = None  # not needed again; 100 class images at 512 px are 300 MB of pixels

    def latents_for(kind: str, images: torch.Tensor, picks: list[int], generator) -> torch.Tensor:
        mean, std = latent_cache[kind] if kind in latent_cache else encode_latent_distribution(components, images[picks])
        if kind in latent_cache:
            mean, std = mean[picks], std[picks]
        return sample_latents(components, mean, std, generator)

    instance_prompt = (embeddings.expand_prompt(job.instance_prompt, new_tokens.names) if new_tokens
                       else job.instance_prompt)
    # Prompts by index: a photo's own caption (lora-captions) or the one instance prompt, then the class prompt.
    photo_prompts = list(job.captions) or [instance_prompt]
    prompts = photo_prompts + [job.class_prompt]
    class_prompt_index = len(photo_prompts)
    prompt_ids = tokenize(components, prompts)
    # The text embeddings can be cached unless something inside the text encoder learns.
    text_learns = config.train_text_encoder or new_tokens is not None
    cached_text = None
    if not text_learns:
        with torch.no_grad():
            cached_text = encode_text(components, prompt_ids)

    # 2. What the method trains: a fresh LoRA on the frozen base model, new token embeddings, or both.
    unet_lora_config = text_lora_config = None
    if method.lora:
        unet_lora_config, text_lora_config = _add_lora(components, config, job.instance_key)
    if job.stacked_lora is not None:
        _stack_under(components, job.stacked_lora, job.stacked_weight)
    # What a checkpoint needs to stand on its own (evaluated or converted without the finished adapter):
    # the resolved recipe and the LoRA configs, the same objects the adapter files are written from.
    lora_configs = {"unet": lora_config_record(unet_lora_config) if unet_lora_config else None,
                    "text_encoder": lora_config_record(text_lora_config) if text_lora_config else None,
                    **({"text_encoder_2": lora_config_record(text_lora_config)}
                       if text_lora_config and components.text_encoder_2 is not None else {})}
    checkpoint_record = {"recipe": config.to_dict(), "lora_configs": lora_configs, "method": config.method,
                         "tokens": list(new_tokens.names) if new_tokens else []}
    vectors = new_tokens.vectors if new_tokens else ()
    if method.full:  # every weight of the UNet (and of the text encoders) learns, in fp32 like LoRA weights
        components.unet.requires_grad_(True)
        for encoder in trained_text_encoders(components).values() if config.train_text_encoder else ():
            encoder.requires_grad_(True)
            encoder.train()
    unet_params = ({name: p for name, p in _trainable(components.unet, "unet.").items() if STACKED not in name}
                   if method.lora or method.full else {})
    # train_text_encoder: each text encoder's LoRA (or, full, its weights); on SDXL "text_encoder_2." beside it.
    text_params = {name: p for attribute, encoder in trained_text_encoders(components).items()
                   for name, p in _trainable(encoder, attribute + ".").items()
                   if not (new_tokens and new_tokens.is_vector(p))} if config.train_text_encoder else {}
    embedding_params = dict(zip(embeddings.EMBEDDINGS_KEYS, vectors))
    trainable = {**unet_params, **text_params, **embedding_params}
    # Parameter groups with their base learning rates; the embeddings' is 0 once embedding_steps are done.
    groups = [{"params": list(part.values()), "lr": lr} for part, lr in
              ((unet_params, config.learning_rate), (text_params, config.text_encoder_lr),
               (embedding_params, config.embedding_lr)) if part]
    base_lrs = [group["lr"] for group in groups]
    optimizer = _make_optimizer(config, groups)
    scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None
    embedding_until = methods.embedding_steps(config)

    # 3. Carry on from the newest complete checkpoint.
    state, resumed_from = TrainingState(), None
    existing = list_checkpoints(job.checkpoint_dir)
    if existing and resume:
        resumed_from, folder = existing[-1]
        state = load_checkpoint(folder, trainable, optimizer, fingerprint)
        if scaler is not None and state.grad_scale is not None:
            scaler.update(state.grad_scale)
    elif existing:
        raise CatalogError(
            f"{job.key}: checkpoints up to step {existing[-1][0]} exist in {job.checkpoint_dir}; "
            "pass --resume to continue them or --force to start over"
        )

    # 4. The loop.
    components.unet.train()
    scheduler = components.noise_scheduler
    autocast_dtype = components.weight_dtype if config.mixed_precision != "no" else None
    start_step, started = state.step, time.perf_counter()
    session_started = started
    checkpoints_written: list[int] = []
    for step in range(state.step, config.steps):
        generator = torch.Generator().manual_seed(seeds.training_step(config.seed, job.key, step))
        torch.manual_seed(seeds.dropout(config.seed, job.key, step))  # LoRA dropout, inside isolated_rng
        picks = photo_positions(step, config.batch_size, len(job.photos), seeds.photo_order(config.seed, job.key))
        latents = latents_for("photos", photos, picks, generator)
        text_index = list(picks) if job.captions else [0] * len(picks)
        if job.class_images:
            class_picks = photo_positions(step, config.batch_size, len(job.class_images),
                                          seeds.class_image_order(config.seed))
            latents = torch.cat([latents, latents_for("class", class_photos, class_picks, generator)])
            text_index += [class_prompt_index] * len(class_picks)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(device)
        if config.noise_offset:
            # One draw per image and channel, from the step's generator (so resume stays exact), drawn last and
            # only when on: the photos, noise and timesteps drawn before it are those of a run without it.
            offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator).to(device)
            noise = noise + config.noise_offset * offset
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = losses.training_target(scheduler, latents, noise, timesteps)

        lr_scale = learning_rate_at(step, config, 1.0)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * lr_scale
        # Pivotal's second phase: the embeddings hold still while the LoRA goes on.
        frozen = list(vectors) if embedding_params and step >= embedding_until else []
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if cached_text is not None:
                text, pooled = (part[text_index] if part is not None else None for part in cached_text)
            else:
                text, pooled = encode_text(components, prompt_ids[text_index])
            prediction = components.unet(noisy.to(components.weight_dtype), timesteps, text.to(components.weight_dtype),
                                         added_cond_kwargs=added_conditioning(components, config.resolution,
                                                                              pooled)).sample
        weights = (losses.min_snr_weights(scheduler.alphas_cumprod, timesteps, config.min_snr_gamma,
                                          scheduler.config.prediction_type)
                   if config.min_snr_gamma is not None else None)
        loss = losses.dreambooth_loss(prediction.float(), target.float(), len(picks), config.prior_loss_weight, weights)
        if not torch.isfinite(loss):
            raise CatalogError(f"{job.key}: loss became {loss.item()} at step {step + 1}; lower the learning rate "
                               "or use mixed_precision 'no'/'bf16'")
        optimizer_step(loss, optimizer, scaler, list(trainable.values()), config.max_grad_norm, frozen)

        state.step = step + 1
        state.losses.append(round(float(loss.item()), 6))
        elapsed = time.perf_counter() - session_started
        if progress is not None:
            progress(state.step, float(loss.item()), (state.step - start_step) / max(elapsed, 1e-9))
        at_checkpoint = config.checkpoint_every and state.step % config.checkpoint_every == 0
        if at_checkpoint or state.step == config.steps:
            state.seconds += time.perf_counter() - started
            started = time.perf_counter()
            state.grad_scale = float(scaler.get_scale()) if scaler is not None else None
            save_checkpoint(job.checkpoint_dir, trainable, optimizer, state, fingerprint, extra=checkpoint_record)
            checkpoints_written.append(state.step)
            if on_checkpoint is not None:
                on_checkpoint(state.step)
            prune_checkpoints(job.checkpoint_dir, config.keep_checkpoints)

    ran = state.step - start_step
    from catalog_gen.train.lora_files import peft_layers

    return FitResult(
        unet_layers=peft_layers(components.unet) if method.lora else None,
        text_encoder_layers=peft_layers(components.text_encoder) if method.lora and config.train_text_encoder else None,
        text_encoder_2_layers=(peft_layers(components.text_encoder_2) if method.lora and config.train_text_encoder
                               and components.text_encoder_2 is not None else None),
        unet_lora_config=lora_configs["unet"],
        text_encoder_lora_config=lora_configs["text_encoder"],
        state=state,
        resumed_from=resumed_from,
        steps_per_second=ran / max(time.perf_counter() - session_started, 1e-9) if ran else 0.0,
        checkpoints=checkpoints_written,
        embeddings=tuple(v.detach().float().cpu().clone() for v in vectors) if vectors else None,
        full_weights=({part: {name: t.detach().float().cpu().clone() for name, t in module.state_dict().items()}
                       for part, module in (("unet", components.unet),
                                            *(trained_text_encoders(components).items()
                                              if config.train_text_encoder else ()))}
                      if method.full else None),
        tokens=tuple(new_tokens.names) if new_tokens else (),
    )
