"""The finished adapter folder: WORKDIR/adapters/<class>/<instance>/

    pytorch_lora_weights.safetensors   diffusers format (StableDiffusionPipeline.load_lora_weights)
    <class>_<instance>.kohya.safetensors  kohya format for AUTOMATIC1111 / ComfyUI
    adapter.json                       resolved recipe, token, prompts, base model and hashes,
                                       library versions, photos with hashes, loss curve, timings

The folder is assembled under a temporary name and renamed into place, and adapter.json
is written last inside it, so a folder that exists is always complete.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catalog_gen.errors import CatalogError
from catalog_gen.layout import ADAPTER_JSON, workdir_of_adapter
from catalog_gen.train.lora_files import DIFFUSERS_WEIGHTS_NAME, save_diffusers_lora, save_kohya_lora
from catalog_gen.storage import atomic_directory, atomic_write_json, sha256_file

@dataclass(frozen=True)
class AdapterInfo:
    folder: Path
    record: dict[str, Any]

    @property
    def diffusers_file(self) -> Path:
        return self.folder / DIFFUSERS_WEIGHTS_NAME

    @property
    def kohya_file(self) -> Path:
        return self.folder / self.record["files"]["kohya"]

    @property
    def token(self) -> str:
        return self.record["token"]

    @property
    def photo_paths(self) -> list[Path]:
        """The normalised training photos (recorded relative to the workdir that holds the adapter)."""
        workdir = workdir_of_adapter(self.folder)
        return [workdir / entry["file"] for entry in self.record["photos"]]


def kohya_file_name(class_key: str, instance_key: str) -> str:
    # A1111 names a LoRA after its file: <lora:hoops_beaded:1>.
    return f"{class_key}_{instance_key}.kohya.safetensors"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("catalog-gen", "torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_adapter(folder: Path, fit_result, record: dict[str, Any], class_key: str, instance_key: str) -> AdapterInfo:
    """Write both LoRA files and adapter.json as one atomic folder, all three from the fit's LoRA configs
    (rank and alpha have one source: the config the LoRA was trained with)."""
    kohya_name = kohya_file_name(class_key, instance_key)
    unet_config, text_config = fit_result.unet_lora_config, fit_result.text_encoder_lora_config
    alpha = float(unet_config["lora_alpha"])
    text_alpha = float(text_config["lora_alpha"]) if text_config else None
    with atomic_directory(folder) as staging:
        diffusers_file = save_diffusers_lora(staging, fit_result.unet_layers, fit_result.text_encoder_layers,
                                             fit_result.unet_lora_config, fit_result.text_encoder_lora_config)
        save_kohya_lora(staging / kohya_name, diffusers_file, alpha, text_alpha, metadata={
            "ss_network_module": "networks.lora",
            "ss_network_dim": unet_config["r"],
            "ss_network_alpha": alpha,
            "ss_output_name": f"{class_key}_{instance_key}",
            "ss_tag_frequency": json.dumps({record["instance_prompt"]: 1}),
            "catalog_gen_token": record["token"],
        })
        full = {
            **record,
            "lora": {"unet": unet_config, "text_encoder": text_config},
            "files": {"diffusers": DIFFUSERS_WEIGHTS_NAME, "kohya": kohya_name},
            "weights_sha256": sha256_file(diffusers_file),
            "kohya_sha256": sha256_file(staging / kohya_name),
        }
        atomic_write_json(staging / ADAPTER_JSON, full)
    return AdapterInfo(folder, full)


def read_adapter(folder: Path) -> AdapterInfo:
    meta = Path(folder) / ADAPTER_JSON
    if not meta.is_file():
        raise CatalogError(f"no trained adapter in {folder} (adapter.json missing); run `catalog train` first")
    try:
        record = json.loads(meta.read_text())
    except ValueError as error:
        raise CatalogError(f"{meta}: not valid JSON ({error})") from error
    info = AdapterInfo(Path(folder), record)
    if not info.diffusers_file.is_file():
        raise CatalogError(f"adapter {folder}: {DIFFUSERS_WEIGHTS_NAME} is missing")
    return info


def load_adapter_weights(info: AdapterInfo) -> dict:
    """The adapter's diffusers-format LoRA tensors, for `load_lora_weights(state_dict)`.

    Read as safetensors only (never a pickle, whatever the file holds), and only if the bytes are the
    ones adapter.json recorded: a weights file swapped or damaged after training is refused. The
    bytes hashed are the bytes parsed, so nothing can change between the check and the load."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    from catalog_gen.storage import sha256_bytes

    data = info.diffusers_file.read_bytes()
    recorded, found = info.record.get("weights_sha256"), sha256_bytes(data)
    if recorded is None:
        raise CatalogError(f"adapter {info.folder}: {ADAPTER_JSON} records no weights_sha256; retrain it")
    if found != recorded:
        raise CatalogError(f"adapter {info.folder}: {DIFFUSERS_WEIGHTS_NAME} has sha256 {found}, but "
                           f"{ADAPTER_JSON} records {recorded}; the file changed after training")
    try:
        return load_safetensors(data)
    except SafetensorError as error:
        raise CatalogError(f"adapter {info.folder}: {DIFFUSERS_WEIGHTS_NAME} is not a safetensors file "
                           f"({error})") from error


def finished_adapter(folder: Path, fingerprint: str, steps: int) -> AdapterInfo | None:
    """The adapter already trained with these exact settings, if there is one (reruns skip it)."""
    try:
        info = read_adapter(folder)
    except CatalogError:
        return None
    if info.record.get("fingerprint") == fingerprint and info.record.get("steps") == steps:
        return info
    return None
