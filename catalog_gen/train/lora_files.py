"""LoRA weight files: the diffusers format and the kohya format that A1111 / ComfyUI load.

diffusers writes `pytorch_lora_weights.safetensors` with peft-style names:
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight
kohya-ss (and so AUTOMATIC1111 and ComfyUI) wants one flat name per module plus its alpha:
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight

DoRA (use_dora) adds one magnitude vector per module, `...to_q.lora_magnitude_vector.weight` in the diffusers file,
whose LoRA config (in the file's metadata) says use_dora, so load_lora_weights rebuilds the DoRA layers.
No kohya file is written for DoRA. The kohya-format key A1111 and ComfyUI read is `dora_scale`, but in the
versions read for this (A1111's extensions-builtin/Lora/network.py, ComfyUI 0.3.77's
comfy/weight_adapter/base.py) neither applies it as peft trains it. peft rescales each output row of W + BA
to its magnitude (magnitude shape (out,)). A1111 rescales the columns instead (shape (1, in)), and no
per-row magnitude can be rewritten as one per column. ComfyUI also takes an (out, 1) scale, but divides
by the row norms of W before the LoRA's update. Neither can be run here to check a file against, and
diffusers drops `dora_scale` keys when it loads a kohya file, so nothing here could show that such a file
draws what was trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from catalog_gen.errors import CatalogError
from catalog_gen.storage import atomic_path, sort_safetensors_metadata

DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
_PREFIXES = {"unet.": "lora_unet_", "text_encoder.": "lora_te_", "text_encoder_2.": "lora_te2_"}
_SDXL_FIRST_ENCODER = "lora_te1_"
"""kohya names SDXL's first text encoder te1 (beside te2), SD 1.x's only one te."""
_MATRICES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
DORA_MAGNITUDE = "lora_magnitude_vector"
"""peft's name for a DoRA module's magnitude (its parameter `...lora_magnitude_vector.default.weight`)."""


def peft_layers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a peft-wrapped model, with the adapter name taken out of the keys: its parameter
    names without ".default", as checkpoints' names become when converted.

    peft's state dict names a DoRA magnitude `...lora_magnitude_vector` (its older name); it is written
    `...lora_magnitude_vector.weight`, which peft's loader (the UNet's) reads as well, and which transformers
    5's (the text encoder's, through load_lora_weights) needs: given the older name it leaves the text
    encoder's magnitudes at their initial values."""
    from peft.utils import get_peft_model_state_dict

    return {(name + ".weight" if name.endswith(DORA_MAGNITUDE) else name): tensor.detach().float().cpu().contiguous()
            for name, tensor in get_peft_model_state_dict(model).items()}


def is_dora(lora_config: Mapping | None) -> bool:
    return bool(lora_config and lora_config.get("use_dora"))


CLIP_TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")
"""What CLIP's text_model holds (its text_projection sits beside it, in CLIPTextModelWithProjection)."""


def text_model_names(layers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A text encoder's tensors (its LoRA's, or full DreamBooth's fine-tuned weights) under the CLIP names every
    reader matches: `text_model.encoder.layers...`.
    transformers 5 drops CLIPTextModel's `text_model.` level (not CLIPTextModelWithProjection's), so peft names
    its LoRA `encoder.layers...`; diffusers loads either name, but ComfyUI, A1111 and kohya-ss, and diffusers
    under transformers 4, know only the first and would leave the text encoder's LoRA out without a word
    (found by bench/comfyui_lora_check.py)."""
    return {("text_model." + name if name.startswith(CLIP_TEXT_MODEL_PARTS) else name): tensor
            for name, tensor in layers.items()}


def save_diffusers_lora(out_dir: Path, unet_layers: Mapping[str, torch.Tensor], text_encoder_layers=None,
                        unet_config: dict | None = None, text_encoder_config: dict | None = None,
                        text_encoder_2_layers=None, text_encoder_2_config: dict | None = None) -> Path:
    """Write the file `load_lora_weights` reads, through diffusers' own writer (SDXL's when there is a second
    text encoder's LoRA)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    # The adapter config (rank, alpha, targets) travels in the file's metadata, so alpha != rank loads with
    # the right scale.
    common = dict(save_directory=str(out_dir), unet_lora_layers=dict(unet_layers),
                  text_encoder_lora_layers=text_model_names(text_encoder_layers) if text_encoder_layers else None,
                  weight_name=DIFFUSERS_WEIGHTS_NAME, safe_serialization=True, unet_lora_adapter_metadata=unet_config,
                  text_encoder_lora_adapter_metadata=text_encoder_config if text_encoder_layers else None)
    if text_encoder_2_layers:
        StableDiffusionXLPipeline.save_lora_weights(**common, text_encoder_2_lora_layers=text_model_names(text_encoder_2_layers),
                                                    text_encoder_2_lora_adapter_metadata=text_encoder_2_config)
    else:
        StableDiffusionPipeline.save_lora_weights(**common)
    return sort_safetensors_metadata(out_dir / DIFFUSERS_WEIGHTS_NAME)


def diffusers_to_kohya(state_dict: Mapping[str, torch.Tensor], alpha: float, text_encoder_alpha: float | None = None,
                       sgm_unet_config: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Rename diffusers/peft LoRA keys to kohya names and add one alpha tensor per module.

    sgm_unet_config (SDXL): the UNet's modules get the SGM names sd-scripts gives SDXL LoRAs
    (lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q), placed from that config as the single-file
    checkpoint's are; without it they keep diffusers' names (lora_unet_down_blocks_1_attentions_0_...), as
    sd-scripts names SD 1.x's. Text encoders are te (SD 1.x), or te1 and te2 (SDXL)."""
    converted: dict[str, torch.Tensor] = {}
    sdxl = sgm_unet_config is not None or any(key.startswith("text_encoder_2.") for key in state_dict)
    unet_names = _sgm_unet_names(sgm_unet_config) if sgm_unet_config is not None else None
    for key, tensor in state_dict.items():
        if DORA_MAGNITUDE in key:
            raise CatalogError(f"LoRA key '{key}' is a DoRA magnitude; no kohya file is written for DoRA "
                               "(see catalog_gen.train.lora_files)")
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        matrix = next((m for m in _MATRICES if key.endswith("." + m)), None)
        if prefix is None or matrix is None:
            raise CatalogError(f"LoRA key '{key}' is not a unet/text_encoder lora_A/lora_B weight")
        module = key[len(prefix): -len(matrix) - 1]
        if prefix == "unet." and unet_names is not None:
            module = unet_names(module, key)
        kohya_prefix = _SDXL_FIRST_ENCODER if sdxl and prefix == "text_encoder." else _PREFIXES[prefix]
        kohya_module = kohya_prefix + module.replace(".", "_")
        converted[f"{kohya_module}.{_MATRICES[matrix]}"] = tensor.contiguous()
        module_alpha = alpha if prefix == "unet." else (text_encoder_alpha or alpha)
        converted[f"{kohya_module}.alpha"] = torch.tensor(float(module_alpha))
    return converted


def _sgm_unet_names(unet_config: Mapping):
    """diffusers UNet module name -> its SGM name, from the UNet's config (single_file.unet_places)."""
    from catalog_gen.train.single_file import unet_places

    places = {place.diffusers: place.original for place in unet_places(unet_config)}

    def rename(module: str, key: str) -> str:
        parts = module.split(".")
        for cut in range(len(parts), 0, -1):
            original = places.get(".".join(parts[:cut]))
            if original is not None:
                return ".".join([original, *parts[cut:]])
        raise CatalogError(f"LoRA key '{key}': its UNet module has no SGM name for this UNet's config")
    return rename


def save_kohya_lora(path: Path, diffusers_file: Path, alpha: float, text_encoder_alpha: float | None,
                    metadata: Mapping[str, str],
                    bundled_embeddings: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                    sgm_unet_config: Mapping | None = None) -> Path:
    """bundled_embeddings (token -> {"clip_l": (n, dim), SDXL's "clip_g": ...}): textual-inversion embeddings
    carried inside the LoRA file, so one file brings both (pivotal tuning): A1111's
    `bundle_emb.<token>.string_to_param.*` for one text encoder, `bundle_emb.<token>.clip_l` and `.clip_g` for
    SDXL's two (the keys A1111 and ComfyUI read SDXL embeddings by).
    sgm_unet_config: an SDXL UNet's config, for sd-scripts' SDXL names (diffusers_to_kohya)."""
    from safetensors.torch import load_file, save_file

    kohya = diffusers_to_kohya(load_file(str(diffusers_file)), alpha, text_encoder_alpha, sgm_unet_config)
    for token, per_encoder in (bundled_embeddings or {}).items():
        if len(per_encoder) == 1:
            kohya[f"bundle_emb.{token}.string_to_param.*"] = next(iter(per_encoder.values())).contiguous()
        else:
            kohya.update({f"bundle_emb.{token}.{key}": vectors.contiguous() for key, vectors in per_encoder.items()})
    # ss_* keys are what kohya-trained files carry; A1111's extra-networks page shows them.
    with atomic_path(path) as tmp:
        save_file(kohya, str(tmp), metadata={str(k): str(v) for k, v in metadata.items()})
    return sort_safetensors_metadata(path)
