"""Embedder model files: finding them offline, the built-in tiny ones, their ONNX exports.

`resolve_embedder_folder` turns a spec into a checked folder: a built-in preset, a local Hugging
Face folder, or a hub id already in the local Hugging Face cache. Nothing is downloaded and only
safetensors weights are accepted (catalog_gen.models.loading' rules, for single-model folders).

Two presets, each materialised once as an ordinary Hugging Face folder in
`cache_root()/presets/<name>-v1/` and then loaded through exactly the same loader
(catalog_gen.quality.embedders) as a real model folder or a cached hub id:

- `tiny-clip`: a transformers CLIPModel (32-wide text and vision towers, 32 px images,
  8 px patches) with the small offline BPE tokenizer from catalog_gen.models.bpe.
- `tiny-dino`: a transformers ViTModel of the same size, without the pooler (DINO's image
  embedding is the CLS token of the last hidden state).

Weights are drawn from fixed seeds, so a preset is byte-for-byte the same on every machine
with the same transformers version. Each is well under 1 MB and builds in a couple of seconds.
The embeddings mean nothing: the presets exist to exercise the real code paths.

ONNX exports of a model's image and text paths live in `cache_root()/onnx/<fingerprint>/`,
made once and moved into place whole, like the presets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from catalog_gen.models import bpe
from catalog_gen.errors import CatalogError
from catalog_gen.seeds import isolated_rng
# The base-model rules, shared: which files are pickles, the per-file hash memo, what a hub id looks like.
from catalog_gen.models.loading import (PICKLE_SUFFIXES, cached_file_hash, find_in_hf_cache, looks_like_hub_id,
                                        quiet_model_loading)
from catalog_gen.models.presets import cache_root, save_transformers_model
from catalog_gen.storage import atomic_write_json, build_once, sha256_file

# Bump when a preset's architecture or recipe changes, so old cache folders are not reused.
EMBEDDER_PRESET_FORMAT = 1
# Bump when the exported graphs change (inputs, outputs, wrappers), so old exports are not reused.
ONNX_FORMAT = 1
_COMPLETE_MARKER = "catalog_gen_preset.json"

# The normalisation constants the published checkpoints use (and the loader's defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_IMAGE_SIZE = 32
_PATCH_SIZE = 8
# One transformer shape for every tower: 2 layers, 4 heads of 8.
_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


# ---------------------------------------------------------------- finding a model folder

def resolve_embedder_folder(spec: str) -> Path:
    """A preset name, a folder or a cached hub id -> a checked folder with safetensors weights."""
    if spec in EMBEDDER_PRESETS:
        folder = materialise_embedder_preset(spec)
    elif Path(spec).expanduser().exists():
        folder = Path(spec).expanduser().resolve()
    elif looks_like_hub_id(spec):
        folder = find_in_hf_cache(spec, "embedder", "'*.bin' '*.h5' '*.msgpack'", "a local model folder")
    else:
        raise CatalogError(f"embedder '{spec}' not found: it is not a preset ({', '.join(EMBEDDER_PRESETS)}), "
                           "not an existing folder, and not a hub id of the form owner/name")
    if not (folder / "config.json").is_file():
        raise CatalogError(f"embedder '{spec}' ({folder}) has no config.json: not a Hugging Face model folder")
    if not list(folder.glob("*.safetensors")):
        pickles = sorted(f.name for f in folder.iterdir() if f.name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise CatalogError(
                f"embedder '{spec}' holds only pickle weights ({', '.join(pickles)}); pickle files can run code "
                "when loaded, so catalog-gen loads safetensors only. Download a revision with model.safetensors "
                "(`hf download ID --revision REV`, e.g. a safetensors conversion PR) or convert it once with "
                "save_pretrained(..., safe_serialization=True) in a trusted environment")
        raise CatalogError(f"embedder '{spec}' ({folder}) has no weights file (*.safetensors)")
    return folder


def embedder_fingerprint(folder: Path) -> str:
    """Short hash of the weights and of the two configs that shape the embedding (keys the caches)."""
    digest = hashlib.sha256()
    for weights in sorted(folder.glob("*.safetensors")):
        # Memoised beside the file by size and mtime: hashing a real CLIP costs a second per load otherwise.
        digest.update(f"{weights.name}:{cached_file_hash(weights)}\n".encode())
    for name in ("config.json", "preprocessor_config.json"):
        if (folder / name).is_file():
            digest.update(f"{name}:{sha256_file(folder / name)}\n".encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- ONNX exports
#
# Exporter: torch.onnx.export(dynamo=True), the torch.export-based exporter (the default since
# torch 2.9). The legacy TorchScript exporter (dynamo=False) still exists in torch 2.13 and needs
# no extra package, but it warns that it will be removed, and it traces: transformers' Python-level
# checks become constants with "might cause the trace to be incorrect" warnings. The dynamo exporter
# captures the graph with torch.export and needs onnxscript (in the `onnx` extra). Both agree with
# torch to ~1e-6 on the tiny presets. Export always runs on the CPU in float32; the batch dimension
# is dynamic, the image size is the model's crop and the text length the tokenizer's fixed padding.

def onnx_runtime():
    """The onnxruntime module, after checking the whole ONNX toolchain is installed."""
    try:
        import onnx  # noqa: F401  (the exporter writes with it)
        import onnxruntime
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as error:
        raise CatalogError(f"the ONNX backend needs onnx, onnxscript and onnxruntime ({error.name} is missing): "
                           "pip install '.[onnx]' (for CUDA, onnxruntime-gpu from '.[gpu]' instead of onnxruntime)"
                           ) from error
    return onnxruntime


def onnx_folder(fingerprint: str) -> Path:
    return cache_root() / "onnx" / fingerprint


def export_onnx(modules: dict[str, torch.nn.Module], examples: dict[str, torch.Tensor], fingerprint: str) -> Path:
    """Export each part (`image`, `text`) once to cache_root()/onnx/<fingerprint>/<part>.onnx."""
    folder = onnx_folder(fingerprint)
    marker = folder / "catalog_gen_onnx.json"
    expected = {"format": ONNX_FORMAT, "parts": sorted(modules)}

    def complete(path: Path) -> bool:
        return (path / marker.name).is_file() and json.loads((path / marker.name).read_text()) == expected

    def export(staging: Path) -> None:
        # The exporter logs a warning per torchvision op it cannot register; torchvision is not used here.
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecations, nothing to act on
            for part, module in modules.items():
                module = module.to("cpu").eval()
                name = "pixel_values" if part == "image" else "input_ids"
                torch.onnx.export(module, (examples[part],), staging / f"{part}.onnx", dynamo=True, verbose=False,
                                  input_names=[name], output_names=["embeddings"],
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
            atomic_write_json(staging / marker.name, expected)

    return build_once(folder, complete, export)


# ---------------------------------------------------------------- built-in presets

@dataclass(frozen=True)
class EmbedderPreset:
    name: str
    description: str
    build: Callable[[Path], None]
    version: Callable[[], str] | None = None
    """A tag of what the build copies (the toy world's weight hashes), so new weights get a new folder."""


def materialise_embedder_preset(name: str, cache_dir: Path | None = None) -> Path:
    """Return the folder of a built-in embedder preset, building it the first time."""
    preset = EMBEDDER_PRESETS.get(name)
    if preset is None:
        raise CatalogError(f"unknown embedder preset '{name}'; built-in: {', '.join(EMBEDDER_PRESETS)}")
    tag = f"-{preset.version()}" if preset.version else ""
    folder = (cache_dir or cache_root()) / "presets" / f"{name}-v{EMBEDDER_PRESET_FORMAT}{tag}"

    def build(staging: Path) -> None:
        with quiet_model_loading():
            preset.build(staging)
        atomic_write_json(staging / _COMPLETE_MARKER, {"preset": name, "format": EMBEDDER_PRESET_FORMAT})

    # The weights are checked too: a build made off rank 0 by an earlier release has the marker and no model.
    return build_once(folder, lambda path: (path / _COMPLETE_MARKER).is_file() and (path / "config.json").is_file()
                      and any(path.glob("*.safetensors")), build)


def preprocessor_config(processor: str, mean, std, image_size: int = _IMAGE_SIZE) -> dict:
    # The keys transformers' image processors write, so the folder also loads there (with torchvision).
    return {
        "image_processor_type": processor,
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,  # PIL.Image.BICUBIC
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_convert_rgb": True,
    }


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _build_tiny_clip(out_dir: Path) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    # 1. The tokenizer decides the vocabulary size and the special token ids.
    bpe.write_clip_tokenizer(out_dir / "_tokenizer_build")
    tokenizer = CLIPTokenizer.from_pretrained(out_dir / "_tokenizer_build")
    text_config = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=bpe.MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        # CLIP pools the text embedding at the end-of-text token, so the config must know its id.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **_TOWER,
    )
    vision_config = dict(image_size=_IMAGE_SIZE, patch_size=_PATCH_SIZE, hidden_act="quick_gelu", **_TOWER)
    # 2. Random weights from a fixed seed.
    with isolated_rng(0):
        model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=32))
    # 3. An ordinary HF folder: safetensors, config.json, preprocessor_config.json, tokenizer files.
    save_transformers_model(model, out_dir)
    _write_json(out_dir / "preprocessor_config.json",
                preprocessor_config("CLIPImageProcessor", CLIP_MEAN, CLIP_STD))
    for source in sorted((out_dir / "_tokenizer_build").iterdir()):
        shutil.copyfile(source, out_dir / source.name)
    shutil.rmtree(out_dir / "_tokenizer_build")


def _build_tiny_dino(out_dir: Path) -> None:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=_IMAGE_SIZE, patch_size=_PATCH_SIZE, hidden_act="gelu", qkv_bias=True,
                       layer_norm_eps=1e-6, **_TOWER)
    # No pooler: facebook/dino-vits16's pooler is randomly initialised and never used.
    with isolated_rng(1):
        model = ViTModel(config, add_pooling_layer=False)
    save_transformers_model(model, out_dir)
    _write_json(out_dir / "preprocessor_config.json",
                preprocessor_config("ViTImageProcessor", IMAGENET_MEAN, IMAGENET_STD))


def _toy_world(folder: str) -> Callable[[Path], None]:
    def build(out_dir: Path) -> None:
        from catalog_gen.toy import shipped

        shipped.copy_checked(folder, out_dir)
    return build


def _toy_world_tag() -> str:
    from catalog_gen.toy import shipped

    return shipped.weights_digest()


EMBEDDER_PRESETS: dict[str, EmbedderPreset] = {
    "toy-clip": EmbedderPreset("toy-clip", "the toy world's CLIP (64 px), trained contrastively on the toy jewelry "
                               "world (NOT openai CLIP; catalog_gen/toy/MODEL_CARD.md)", _toy_world("toy-clip"),
                               _toy_world_tag),
    "toy-dino": EmbedderPreset("toy-dino", "the toy world's DINO-layout ViT (64 px), self-supervised on the toy "
                               "world (NOT facebook/dino; catalog_gen/toy/MODEL_CARD.md)", _toy_world("toy-dino"),
                               _toy_world_tag),
    "tiny-clip": EmbedderPreset("tiny-clip", "tiny random CLIP (32 px, BPE tokenizer) for tests and demos",
                                _build_tiny_clip),
    "tiny-dino": EmbedderPreset("tiny-dino", "tiny random DINO-style ViT (32 px) for tests and demos",
                                _build_tiny_dino),
}
