"""Typed, validated configuration, merged in one place: recipe file < command line.

A config object is built once, validated in `__post_init__`, never mutated, and saved
beside every output (adapter.json, checkpoints) so each result says how it was made.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from catalog_gen.errors import CatalogError

OPTIMIZERS = ("auto", "adamw8bit", "adamw", "prodigy")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
AUTO = "auto"
"""A setting that follows the base model or the device; resolve_for() turns it into a value before use."""
INFERENCE_PRECISION = ("auto", "fp32", "fp16", "bf16")
ATTENTION = ("sdpa", "xformers")
LR_SCHEDULES = ("constant", "cosine", "linear")
METHODS = ("dreambooth-lora", "textual-inversion", "pivotal", "dreambooth", "lora-captions", "two-stage")
"""Fine-tuning methods `catalog train --method` runs (catalog_gen.train.methods says what each trains)."""


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyperparameters for one adapter per instance (DreamBooth-LoRA unless `method` says otherwise)."""

    method: str = "dreambooth-lora"
    """dreambooth-lora (a LoRA bound to a rare existing token), textual-inversion (new token embeddings only),
    pivotal (new token embeddings and a LoRA, trained together), dreambooth (the whole UNet, and the text
    encoder with train_text_encoder; learning_rate is then the UNet's: seed 004 used 1e-6), lora-captions (one
    LoRA over every chosen instance of the class, each photo prompted by its own caption, no identifier token)
    or two-stage (a class LoRA on every photo of the class first, then each instance's LoRA on top of it)."""
    base_model: str = "tiny"
    """Preset name (toy, tiny, tiny-sd2, tiny-sdxl, sd15-shape, sdxl-shape), local diffusers folder, or cached hub id."""
    resolution: int | None = None
    """Training image side in pixels; photos are padded to square, never cropped. None: the base model's
    native resolution (512 for SD 1.5, 64 for the tiny and toy presets)."""
    steps: int = 200
    """Optimizer steps per instance (seed 004: 200; more over-fits)."""
    learning_rate: float = 1e-4
    """LoRA learning rate (full fine-tuning in seed 004 used 1e-6; LoRA needs far more)."""
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    batch_size: int = 1
    """Instance images per step (class images are added on top with prior preservation)."""
    lora_rank: int = 4
    lora_alpha: float | None = None
    """LoRA scale numerator (the update is scaled by alpha / rank). Unset, it follows lora_rank (scale 1),
    so changing the rank changes the rank alone; set it to keep one alpha across ranks."""
    lora_dropout: float = 0.0
    train_text_encoder: bool = False
    """Also train the text encoder: a LoRA on it, or for method dreambooth all of it (then text embeddings
    cannot be cached)."""
    text_encoder_lr: float = 5e-5
    """Learning rate of the text-encoder LoRA (its own optimizer parameter group; train_text_encoder)."""
    prior_preservation: bool = False
    """Add the class-prior loss (seed 004 found it no help with 3-7 photos, so off by default)."""
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    class_image_steps: int = 25
    """Inference steps used to draw the class images once per class."""
    optimizer: str = AUTO
    """adamw8bit (bitsandbytes; the T4 recipe), adamw, prodigy, or auto: adamw8bit on a GPU, adamw on a CPU
    (where 8-bit AdamW is slow). prodigy (prodigyopt) estimates the step size itself: learning_rate is then a
    multiplier of its estimate, 1.0 as usual (the 1e-4 default would barely move the LoRA), and every trained
    part shares it, so text_encoder_lr and pivotal's embedding_lr must equal learning_rate. It takes the
    adam_* betas, epsilon and (decoupled) weight decay, with bias correction and safeguard warm-up on (the
    diffusers advanced DreamBooth scripts' defaults)."""
    prodigy_d_coef: float = 1.0
    """prodigy: scales its step-size estimate (Prodigy's preferred knob; 0.5-2 typical)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    min_snr_gamma: float | None = None
    """Min-SNR-gamma loss weighting (Hang et al. 2023): each sample's loss is weighted by min(SNR, gamma) / SNR
    for epsilon prediction, min(SNR, gamma) / (SNR + 1) for v-prediction, SNR at its drawn timestep; the
    class-prior samples alike. None: off; diffusers and kohya use 5.0."""
    noise_offset: float = 0.0
    """Adds noise_offset x one normal draw per image and latent channel to the noise, so the model can learn
    to change an image's overall brightness (Guttenberg's noise offset; 0.05-0.1 typical), in [0, 1]. 0: off."""
    use_dora: bool = False
    """Train the LoRA(s) as DoRA (peft's use_dora: a learned magnitude per output feature beside the low-rank
    direction update). The diffusers file carries the magnitudes and loads with load_lora_weights; no kohya
    file is written (A1111 and ComfyUI apply a DoRA magnitude otherwise than peft: see lora_files.py)."""
    mixed_precision: str = AUTO
    """fp16 or bf16 autocast for the frozen model (LoRA weights always stay in fp32), no, or auto: fp16 on a
    GPU, no on a CPU."""
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    cache_latents: bool = True
    """Encode each photo through the VAE once instead of every step."""
    seed: int = 0
    checkpoint_every: int = 50
    """Save a resumable checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 0
    """How many intermediate checkpoints to keep (0: all, needed by `catalog eval`)."""
    validation_images: int = 2
    """Images drawn from the instance prompt at each checkpoint (0: none)."""
    validation_steps: int = 20
    min_photos: int | None = None
    """Override the class map's minimum photo count per instance."""
    max_photos: int | None = None
    """Train on only the first N usable photos (the sweeps' number-of-photos axis)."""
    embedding_vectors: int = 1
    """textual-inversion, pivotal: embedding vectors learned per instance (its token and token_1, token_2, ...)."""
    embedding_lr: float = 5e-4
    """textual-inversion, pivotal: learning rate of the new token embeddings."""
    embedding_fraction: float = 0.5
    """pivotal: the embeddings train for this fraction of the steps, then freeze while the LoRA goes on (the
    diffusers advanced scripts' train_text_encoder_ti_frac)."""
    class_stage_steps: int | None = None
    """two-stage: steps of the class LoRA (None: `steps`)."""
    class_stage_weight: float = 1.0
    """two-stage: the class LoRA's weight under each instance's, in training and in generation alike."""

    def __post_init__(self) -> None:
        check_field_types(self)
        check_choice("method", self.method, METHODS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_choice("attention", self.attention, ATTENTION)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        for name in ("steps", "batch_size", "lora_rank", "class_image_steps", "validation_steps"):
            check_positive(name, getattr(self, name))
        if self.resolution is not None:
            check_positive("resolution", self.resolution)
        for name in ("learning_rate", "text_encoder_lr", "prior_loss_weight", "embedding_vectors", "embedding_lr",
                     "class_stage_weight"):
            check_positive(name, getattr(self, name))
        if self.lora_alpha is not None:
            check_positive("lora_alpha", self.lora_alpha)
        for name in ("warmup_steps", "checkpoint_every", "keep_checkpoints", "validation_images", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise CatalogError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.resolution is not None and self.resolution % 8:
            raise CatalogError(f"resolution must be a multiple of 8 (the VAE downsamples 8x), got {self.resolution}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise CatalogError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.prior_preservation and self.num_class_images < 1:
            raise CatalogError("prior_preservation needs num_class_images >= 1")
        if self.warmup_steps > self.steps:
            raise CatalogError(f"warmup_steps ({self.warmup_steps}) is longer than steps ({self.steps})")
        if self.max_photos is not None and self.max_photos < 1:
            raise CatalogError(f"max_photos must be >= 1, got {self.max_photos}")
        if self.min_photos is not None and self.min_photos < 1:
            raise CatalogError(f"min_photos must be >= 1, got {self.min_photos}")
        if self.class_stage_steps is not None:
            check_positive("class_stage_steps", self.class_stage_steps)
        if not 0.0 < self.embedding_fraction <= 1.0:
            raise CatalogError(f"embedding_fraction must be in (0, 1], got {self.embedding_fraction}")
        if self.min_snr_gamma is not None:
            check_positive("min_snr_gamma", self.min_snr_gamma)
        if not 0.0 <= self.noise_offset <= 1.0:
            raise CatalogError(f"noise_offset must be in [0, 1], got {self.noise_offset!r}")
        check_positive("prodigy_d_coef", self.prodigy_d_coef)
        if self.method == "textual-inversion" and self.train_text_encoder:
            raise CatalogError("method textual-inversion trains token embeddings only; train_text_encoder "
                               "(a text-encoder LoRA) needs method pivotal or dreambooth-lora")
        if self.optimizer == "prodigy":
            self._check_prodigy_groups()

    def _check_prodigy_groups(self) -> None:
        """Prodigy adapts one step size for all parameter groups and refuses groups with other learning rates
        (only 0 is allowed): a text-encoder LoRA or pivotal's embeddings must share learning_rate."""
        shared = []
        if self.train_text_encoder:
            shared.append("text_encoder_lr")
        if self.method == "pivotal":
            shared.append("embedding_lr")
        for name in shared:
            if getattr(self, name) != self.learning_rate:
                raise CatalogError(f"optimizer prodigy shares one step size between the trained parts; {name} "
                                   f"({getattr(self, name)!r}) must equal learning_rate ({self.learning_rate!r})")

    def resolve_for(self, native_resolution: int, on_gpu: bool) -> "TrainConfig":
        """The settings left to the base model and the device, made concrete (what adapter.json records)."""
        return dataclasses.replace(
            self, resolution=self.resolution or native_resolution,
            optimizer=("adamw8bit" if on_gpu else "adamw") if self.optimizer == AUTO else self.optimizer,
            mixed_precision=("fp16" if on_gpu else "no") if self.mixed_precision == AUTO else self.mixed_precision)

    @property
    def resolved_lora_alpha(self) -> float:
        """The alpha every LoRA file and adapter.json record: lora_alpha, or lora_rank when it is unset."""
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_field_types(config) -> None:
    """Reject a value of the wrong type (a TOML string where a number belongs) before using it."""
    for field in fields(config):
        value = getattr(config, field.name)
        default = field.default
        if value is None or default is dataclasses.MISSING:
            continue
        optional_float = default is None and str(field.type).startswith("float")
        expected = (float if optional_float else int) if default is None else type(default)
        if default is None and not optional_float:  # Optional[int] fields
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif expected is float:  # float fields, Optional[float] ones included
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, expected)
        if not ok:
            raise CatalogError(f"{field.name} must be {expected.__name__}, got {value!r}")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise CatalogError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise CatalogError(f"{name} must be > 0, got {value!r}")


def read_recipe(path: Path | str | None, section: str) -> dict[str, Any]:
    """One section of a TOML recipe (a path, or a built-in name from pipelines/), as a plain dict."""
    if path is None:
        return {}
    recipe_path = _recipe_path(path)
    try:
        with open(recipe_path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise CatalogError(f"recipe {recipe_path}: cannot read ({error.strerror})") from error
    except tomllib.TOMLDecodeError as error:
        raise CatalogError(f"recipe {recipe_path}: not valid TOML ({error})") from error
    values = document.get(section, {})
    if not isinstance(values, dict):
        raise CatalogError(f"recipe {recipe_path}: [{section}] must be a table")
    if section == "templates":
        for key, value in values.items():
            if not isinstance(value, str):
                raise CatalogError(f"recipe {recipe_path}: [templates] {key} must be a prompt template string, "
                                   f"got {value!r}")
    return values


def _recipe_path(path: Path | str) -> Path:
    candidate = Path(path)
    if candidate.exists():
        return candidate
    from importlib.resources import files

    builtin = Path(str(files("catalog_gen.pipelines"))) / f"{Path(path).stem}.toml"
    if builtin.exists():
        return builtin
    raise CatalogError(f"recipe '{path}' not found (neither a file nor a built-in recipe in pipelines/)")


def resolve_embedders(clip_model: str, dino_model: str, own: tuple[str, str]) -> tuple[str, str]:
    """The CLIP and DINO to load: each one asked for, or for "auto" the base model's own (`own`)."""
    return (own[0] if clip_model == AUTO else clip_model, own[1] if dino_model == AUTO else dino_model)


RENAMED = {"steps": "inference_steps"}
"""Settings renamed so that one name means one thing everywhere ([generate] and [eval] `steps` were denoising
steps, [train] `steps` training steps): an old recipe's key is named with its new name."""


def build_config(cls, recipe: Mapping[str, Any], overrides: Mapping[str, Any], origin: str = "recipe"):
    """Merge recipe values under command-line overrides (None means 'not given') and validate once."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(recipe) - known)
    if unknown:
        renamed = [f"{old} is now {RENAMED[old]}" for old in unknown if RENAMED.get(old) in known]
        hint = f" ({'; '.join(renamed)})" if renamed else ""
        raise CatalogError(f"{origin}: unknown setting(s) {', '.join(unknown)}{hint}; known: {', '.join(sorted(known))}")
    merged = dict(recipe)
    merged.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return cls(**merged)
    except TypeError as error:
        raise CatalogError(f"{origin}: {error}") from error


@dataclass(frozen=True)
class GenerateConfig:
    """Nightly generation and quality-gate settings."""

    base_model: str = "tiny"
    resolution: int | None = None
    """Image side in pixels; None: the base model's native resolution."""
    scheduler: str = "dpm++"
    """ddpm, ddim, pndm, lms, euler or dpm++."""
    inference_steps: int = 25
    """Denoising steps per image (`steps` is training's, in [train])."""
    guidance: float = 7.5
    batch_size: int = 4
    """Candidates drawn per UNet batch (does not change any image)."""
    n_images: int = 4
    """Images kept per SKU (k); a sheet's n_images column overrides it per row."""
    max_extra: int = 4
    """Extra candidates drawn (with new seeds) when fewer than k pass the gates (M)."""
    seed: int = 0
    """Run seed; each candidate's seed is derived from (sku, candidate index, run seed)."""
    negative_prompt: str = "blurry, lowres, watermark, text, cropped, deformed"
    template: str = "{instance_prompt}"
    """Prompt template; SKU sheet columns and token, instance, noun, instance_prompt are variables."""
    clip_model: str = AUTO
    """The gates' CLIP (CLIP-I, CLIP-T): a preset, folder or cached hub id; auto: the base model's own
    (toy-clip for toy, tiny-clip for tiny, openai/clip-vit-base-patch32 for a real model)."""
    dino_model: str = AUTO
    """The gates' DINO: as clip_model (toy-dino, tiny-dino, facebook/dino-vits16)."""
    embedder_backend: str = "torch"
    """torch or onnx (exported once, run on onnxruntime)."""
    precision: str = "auto"
    """Pipeline dtype: auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16 or bf16."""
    min_clip_i: float = 0.70
    min_dino: float = 0.50
    min_clip_t: float = 0.20
    calibrate: bool = True
    """Per-instance CLIP-I / DINO thresholds from the reference photos' leave-one-out similarity."""
    calibration_ratio: float = 0.85
    """Calibrated threshold = ratio x the instance's real-to-real similarity (DreamBooth paper: ~0.86-0.91)."""
    memorisation_dino: float = 0.97
    """A candidate this close (DINO) to one training photo is a near copy and fails."""
    min_pixel_std: float = 4.0
    """Images whose pixel standard deviation (0-255) is below this are blank / near-uniform."""
    base_images: int = 0
    """Per SKU, draw this many images from the base model alone (no adapter) with the same prompts and seeds
    as its first candidates, for comparison in the report (0: none)."""
    allow_base_mismatch: bool = False
    """Apply adapters trained on another base model (their base fingerprint differs from this run's). Off:
    such SKUs are refused before any image is drawn. Each manifest row records the adapter's base."""

    def __post_init__(self) -> None:
        check_field_types(self)
        from catalog_gen.models.sampling import SCHEDULERS

        check_choice("scheduler", self.scheduler, tuple(SCHEDULERS))
        check_choice("embedder_backend", self.embedder_backend, ("torch", "onnx"))
        check_choice("precision", self.precision, INFERENCE_PRECISION)
        for name in ("inference_steps", "batch_size", "n_images", "calibration_ratio"):
            check_positive(name, getattr(self, name))
        if self.resolution is not None:
            check_positive("resolution", self.resolution)
        for name in ("max_extra", "seed", "guidance", "min_pixel_std", "base_images"):
            if getattr(self, name) < 0:
                raise CatalogError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.resolution is not None and self.resolution % 8:
            raise CatalogError(f"resolution must be a multiple of 8, got {self.resolution}")
        for name in ("min_clip_i", "min_dino", "min_clip_t", "memorisation_dino"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise CatalogError(f"{name} is a cosine similarity threshold in [-1, 1], got {getattr(self, name)}")

    def resolve_for(self, native_resolution: int, embedders: tuple[str, str]) -> "GenerateConfig":
        """The settings left to the base model made concrete (what run.json records)."""
        clip_model, dino_model = resolve_embedders(self.clip_model, self.dino_model, embedders)
        return dataclasses.replace(self, resolution=self.resolution or native_resolution,
                                   clip_model=clip_model, dino_model=dino_model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
