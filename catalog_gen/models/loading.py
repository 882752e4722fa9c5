"""Finding and loading base models offline.

`--base-model` accepts a built-in preset name (`tiny`, `sd15-shape`), a local diffusers
folder, or a Hugging Face hub id that is already in the local cache. Nothing is ever
downloaded at run time, and only safetensors weights are loaded: pickle files (.bin,
.ckpt, .pt) can run arbitrary code when unpickled, so they are refused.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from catalog_gen.errors import CatalogError
from catalog_gen.models.family import ModelFamily, detect_family
from catalog_gen.models.presets import PRESETS, cache_root, materialise_preset
from catalog_gen.storage import atomic_write_json, sha256_file

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# Components whose weights the training and generation stages load (SDXL adds text_encoder_2).
_WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")


def weighted_components(family: ModelFamily | None) -> tuple[str, ...]:
    return _WEIGHTED_COMPONENTS + (("text_encoder_2",) if family is not None and family.two_text_encoders else ())


@dataclass(frozen=True)
class BaseModel:
    """A resolved base model: what the user asked for and the folder it lives in."""

    spec: str
    path: Path
    source: str  # "preset" | "local" | "hf-cache"
    family: ModelFamily | None = None
    """SD 1.x or 2.x and the prediction type, read from the folder (resolve_base_model fills it in)."""


def resolve_base_model(spec: str, cache_dir: Path | None = None) -> BaseModel:
    """Turn a preset name, a folder or a cached hub id into a checked diffusers folder."""
    if spec in PRESETS:
        model = BaseModel(spec, materialise_preset(spec, cache_dir), "preset")
    elif Path(spec).expanduser().exists():
        model = BaseModel(spec, Path(spec).expanduser().resolve(), "local")
    elif looks_like_hub_id(spec):
        model = BaseModel(spec, find_in_hf_cache(spec), "hf-cache")
    else:
        raise CatalogError(
            f"base model '{spec}' not found: it is not a preset ({', '.join(PRESETS)}), "
            "not an existing folder, and not a hub id of the form owner/name"
        )
    return replace(model, family=check_model_folder(model.path, spec))


REAL_EMBEDDERS = ("openai/clip-vit-base-patch32", "facebook/dino-vits16")
"""The gates' CLIP and DINO for a real base model (the DreamBooth paper's CLIP-I / DINO models)."""


def native_resolution(model: BaseModel) -> int:
    """The image side the base model was trained at: a preset's own, else the UNet's sample size times
    the VAE's downsampling (SD 1.x: 64 x 8 = 512; SD 2.1: 96 x 8 = 768)."""
    import json

    if model.source == "preset":
        return PRESETS[model.spec].resolution
    try:
        unet = json.loads((model.path / "unet" / "config.json").read_text())
        vae = json.loads((model.path / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CatalogError(f"base model '{model.spec}': cannot read its native resolution from unet/ and vae/ "
                           f"config.json ({error}); set resolution in the recipe") from None


def default_embedders(model: BaseModel) -> tuple[str, str]:
    """The CLIP and DINO models for this base when the recipe says "auto": a preset's own, else REAL_EMBEDDERS."""
    return PRESETS[model.spec].embedders if model.source == "preset" else REAL_EMBEDDERS


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def find_in_hf_cache(repo_id: str, what: str = "base model", exclude: str = "'*.bin' '*.ckpt'",
                     instead: str = "a local diffusers folder with --base-model PATH") -> Path:
    """The snapshot folder of a model already in the local Hugging Face cache (never downloaded here);
    missing, a one-line error that says how to get it onto this machine."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError) as error:
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise CatalogError(
            f"{what} '{repo_id}' is not in the local Hugging Face cache ({cache}); catalog-gen never "
            f"downloads at run time. On a machine with network run `hf download {repo_id} --exclude {exclude}` "
            f"(then copy the cache), or pass {instead}"
        ) from error


def check_model_folder(path: Path, spec: str) -> ModelFamily:
    """Refuse anything that is not a diffusers folder of a supported family with safetensors weights; the
    family found."""
    if path.is_file():
        raise CatalogError(
            f"base model '{spec}' is a single-file checkpoint; catalog-gen trains SD 1.x and SD 2.x diffusers "
            "folders (model_index.json with unet/, vae/, text_encoder/, tokenizer/). Convert it with "
            "diffusers' StableDiffusionPipeline.from_single_file(...).save_pretrained(folder)"
        )
    if not (path / "model_index.json").is_file():
        raise CatalogError(f"base model '{spec}' ({path}) has no model_index.json: not a diffusers folder")
    family = detect_family(path, spec)  # another family (SD3, Flux) is named before its folders are looked for
    for component in weighted_components(family):
        folder = path / component
        if not folder.is_dir():
            raise CatalogError(f"base model '{spec}' has no {component}/ folder")
        files = [f.name for f in folder.iterdir() if f.is_file()]
        if any(name.endswith(".safetensors") for name in files):
            continue
        pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise CatalogError(
                f"base model '{spec}': {component}/ holds only pickle weights ({', '.join(sorted(pickles))}); "
                "pickle files can run code when loaded, so catalog-gen loads safetensors only. Download the "
                "*.safetensors variant or convert the folder with safetensors' convert script"
            )
        raise CatalogError(f"base model '{spec}': {component}/ has no weights file (*.safetensors)")
    return family



@contextmanager
def quiet_model_loading() -> Iterator[None]:
    """Loading bars and notices from diffusers/transformers would bury our own progress output: silenced
    while loading only, then the caller's settings are put back (the library changes no process-wide state)."""
    import diffusers
    import transformers

    libraries = (diffusers.utils.logging, transformers.utils.logging)
    saved = [(library.get_verbosity(), library.is_progress_bar_enabled()) for library in libraries]
    for library in libraries:
        library.disable_progress_bar()
        library.set_verbosity_error()
    try:
        yield
    finally:
        for library, (verbosity, bars) in zip(libraries, saved):
            library.set_verbosity(verbosity)
            (library.enable_progress_bar if bars else library.disable_progress_bar)()


def inference_dtype(precision: str, device):
    """The one dtype every pipeline component runs in for `precision` on `device`."""
    import torch

    device_type = torch.device(device).type
    # auto: fp16 on a CUDA GPU (half the memory, tensor cores), fp32 elsewhere (CPUs have no fast fp16).
    if precision == "auto":
        return torch.float16 if device_type == "cuda" else torch.float32
    if precision == "fp16" and device_type != "cuda":
        raise CatalogError(f"precision 'fp16' needs a CUDA GPU; on {device_type} use 'fp32', 'bf16' or 'auto'")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise CatalogError(f"precision must be one of auto, {', '.join(dtypes)}, got {precision!r}")
    return dtypes[precision]


def load_pipeline(model: BaseModel, device="cpu", precision: str = "auto"):
    """The pipeline of a resolved model (StableDiffusionPipeline, or StableDiffusionXLPipeline for SDXL) on
    `device`, offline, safetensors only.

    Every component is loaded in one dtype: left to the files, a model stored in fp16 (like
    the published SD 1.5 and our sd15-shape preset) keeps an fp16 text encoder beside whatever
    the rest becomes, and the first prompt fails with a dtype mismatch.
    """
    import diffusers

    family = model.family or detect_family(model.path, model.spec)
    # Neither is used (the gates judge the images), so a download may leave both folders out: README's
    # `hf download --include` line fetches only what this loader reads. (SDXL pipelines have neither.)
    no_checker = (dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
                  if family.pipeline_class == "StableDiffusionPipeline" else {})
    with quiet_model_loading():
        pipeline = getattr(diffusers, family.pipeline_class).from_pretrained(
            model.path, **_dtype_argument(inference_dtype(precision, device)), use_safetensors=True,
            local_files_only=True, **no_checker)
    pipeline.set_progress_bar_config(disable=True)
    pipeline = pipeline.to(device)
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)):
        if module is not None:
            own_aligned_memory(module)  # CPU results must not depend on how the weights sat in the file
    return pipeline


def _dtype_argument(dtype) -> dict:
    """diffusers renamed `torch_dtype` to `dtype` (the old name now warns on every load); the
    releases that know the new name have `_resolve_dtype`, older ones only take the old name."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:
        return {"torch_dtype": dtype}
    accepts_dtype = hasattr(deprecation_utils, "_resolve_dtype")
    return {"dtype": dtype} if accepts_dtype else {"torch_dtype": dtype}


def own_aligned_memory(module) -> None:
    """Move every CPU weight that is not 64-byte aligned into its own fresh (aligned) storage.

    Weights loaded from safetensors can sit at 8-byte offsets inside one shared buffer, and
    MKL's matmul rounds differently on unaligned data. Whether `.to(device)` copied them
    depended on the device spelling ('cpu' in one process, 'cpu:0' under a multi-process
    launch), so the same instance trained to adapters differing in the last bits.
    """
    import torch

    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.data_ptr() % 64:
                tensor.data = tensor.data.clone()


def load_tokenizer(model: BaseModel):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(model.path / "tokenizer", local_files_only=True)


def model_fingerprint(model: BaseModel) -> str:
    """A short hash of the base model's weights, recorded with every adapter and image.

    The hash of each weights file is cached beside the model (keyed by size and mtime),
    because hashing SD 1.5 costs seconds on every command otherwise.
    """
    import hashlib

    digest = hashlib.sha256()
    for component in weighted_components(model.family):
        for weights in sorted((model.path / component).glob("*.safetensors")):
            digest.update(f"{component}/{weights.name}:{cached_file_hash(weights)}".encode())
    return digest.hexdigest()[:16]


def cached_file_hash(path: Path) -> str:
    """sha256 of a weights file, hashed once per (size, mtime).

    A Hugging Face cache file is a link to a blob already named by its sha256: that name is the answer.
    Other hashes are remembered in catalog-gen's own cache (cache_root()/file-hashes/), never beside the
    model, so a user's model folders and hub cache are only ever read.
    """
    import hashlib

    target = path.resolve()
    if target.parent.name == "blobs" and len(target.name) == 64 and all(c in "0123456789abcdef" for c in target.name):
        return target.name
    stat = target.stat()
    key = f"{target}:{stat.st_size}:{stat.st_mtime_ns}"
    memo = cache_root() / "file-hashes" / f"{hashlib.sha256(str(target).encode()).hexdigest()[:32]}.json"
    try:
        cached = json.loads(memo.read_text())
        if cached.get("key") == key:
            return cached["sha256"]
    except (OSError, ValueError):
        pass
    value = sha256_file(target)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(memo, {"key": key, "sha256": value})
    except OSError:
        pass  # an unwritable cache only means hashing again next time
    return value
