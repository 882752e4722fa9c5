"""Which model family a diffusers folder holds, read from the folder's own files, never from a flag.

    sd1   StableDiffusionPipeline with a CLIP ViT-L text encoder (quick-GELU) and conv projections in the
          UNet's transformer blocks; epsilon prediction
    sd2   StableDiffusionPipeline with an OpenCLIP ViT-H text encoder (GELU) and linear projections;
          epsilon (the 512 px base) or v-prediction (the 768 px SD 2.x), from scheduler_config.json
    sdxl  StableDiffusionXLPipeline: two text encoders (CLIP-L, OpenCLIP-bigG with its pooled projection) and
          size/crop micro-conditioning; epsilon

Everything else (SDXL, SD3, Flux, ...) is refused by name. The prediction type decides the training target
(the noise, or the velocity for v-prediction); the scheduler the folder ships keeps it for sampling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from catalog_gen.errors import CatalogError

SUPPORTED = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
PIPELINES = {"StableDiffusionPipeline": ("sd1", "sd2"), "StableDiffusionXLPipeline": ("sdxl",)}
"""The diffusers pipeline class of each family."""
PREDICTION_TYPES = ("epsilon", "v_prediction")
OTHER_FAMILIES = {
    "StableDiffusionXLImg2ImgPipeline": "the SDXL refiner",
    "StableDiffusion3Pipeline": "SD3", "FluxPipeline": "Flux", "StableCascadeDecoderPipeline": "Stable Cascade",
    "PixArtAlphaPipeline": "PixArt-alpha", "PixArtSigmaPipeline": "PixArt-sigma", "KandinskyV22Pipeline":
    "Kandinsky 2.2", "StableDiffusionUpscalePipeline": "the SD x4 upscaler", "AuraFlowPipeline": "AuraFlow",
    "SanaPipeline": "Sana", "HunyuanDiTPipeline": "Hunyuan-DiT", "LuminaText2ImgPipeline": "Lumina",
}
"""Pipeline classes of families catalog-gen does not train, by the name their users know them by."""


@dataclass(frozen=True)
class ModelFamily:
    name: str
    """"sd1", "sd2" or "sdxl"."""
    prediction_type: str
    """What the UNet predicts: "epsilon" (the noise) or "v_prediction" (the velocity)."""

    @property
    def pipeline_class(self) -> str:
        return next(cls for cls, names in PIPELINES.items() if self.name in names)

    @property
    def two_text_encoders(self) -> bool:
        return self.name == "sdxl"

    @property
    def label(self) -> str:
        return SUPPORTED[self.name] + (" (v-prediction)" if self.prediction_type == "v_prediction" else "")


def _read_json(path: Path, spec: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise CatalogError(f"base model '{spec}': cannot read {path.parent.name}/{path.name} ({error})") from None


def detect_family(path: Path, spec: str) -> ModelFamily:
    """The family of the diffusers folder at `path`, or a one-line error naming what was found instead."""
    path = Path(path)
    index = _read_json(path / "model_index.json", spec)
    pipeline_class = index.get("_class_name")
    supported = ", ".join(SUPPORTED.values())
    if pipeline_class not in PIPELINES:
        found = OTHER_FAMILIES.get(pipeline_class, f"a {pipeline_class} folder" if pipeline_class else
                                   "a folder whose model_index.json names no pipeline")
        raise CatalogError(f"base model '{spec}' is {found} ({pipeline_class or 'no _class_name'}); catalog-gen "
                           f"trains {supported} ({' and '.join(PIPELINES)} folders)")
    unet = _read_json(path / "unet" / "config.json", spec)
    text = _read_json(path / "text_encoder" / "config.json", spec)
    if pipeline_class == "StableDiffusionXLPipeline":
        name = "sdxl"
    else:  # SD 2 changed both towers at once: OpenCLIP's GELU text encoder and linear projections in the UNet.
        name = "sd2" if unet.get("use_linear_projection") or text.get("hidden_act") == "gelu" else "sd1"
    scheduler = _read_json(path / "scheduler" / "scheduler_config.json", spec)
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise CatalogError(f"base model '{spec}': its scheduler predicts {prediction!r}; catalog-gen trains "
                           f"{' and '.join(PREDICTION_TYPES)} models")
    return ModelFamily(name, prediction)


def check_adapter_family(trained_on: dict, family: ModelFamily, what: str, spec: str) -> None:
    """Refuse an adapter trained on another family than this base model's, naming both (an SD 1.x LoRA
    does not fit an SD 2.x UNet: its cross-attention widths differ). Adapters recorded before families were
    (no "family") pass: the base-model fingerprint check still guards them."""
    recorded = trained_on.get("family")
    if recorded is None or recorded == family.name:
        return
    raise CatalogError(f"{what} was trained on {SUPPORTED.get(recorded, recorded)} ({trained_on.get('spec')!r}); "
                       f"base model '{spec}' is {family.label}; an adapter only fits the family it was trained on")
