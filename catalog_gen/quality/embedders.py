"""CLIP and DINO embedders for the quality gates, loaded offline, run with torch or ONNX Runtime.

A model spec is a built-in preset (`tiny-clip`, `tiny-dino`), a local Hugging Face folder, or
a hub id already in the local Hugging Face cache; nothing is downloaded and only safetensors
weights are loaded (the rules of catalog_gen.models.loading, for single-model folders).

Images are preprocessed here, not by transformers' image processors (those want torchvision):
RGB, shortest side resized with bicubic filtering, centre crop, scaled to [0, 1], normalised with
the folder's preprocessor_config.json. Every embedding comes back L2-normalised, float32, on the CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image, ImageOps

from catalog_gen.models.embedder_presets import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, embedder_fingerprint,
                                          export_onnx, onnx_runtime, resolve_embedder_folder)
from catalog_gen.errors import CatalogError
from catalog_gen.models.loading import quiet_model_loading
from catalog_gen.storage import atomic_path, sha256_file

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"
BACKENDS = ("torch", "onnx")
BATCH_SIZE = 16
Runner = Callable[[torch.Tensor], torch.Tensor]  # a batch of inputs -> un-normalised features (N, D)


@runtime_checkable
class ImageEmbedder(Protocol):
    name: str
    fingerprint: str

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


# ---------------------------------------------------------------- image preprocessing

@dataclass(frozen=True)
class ImageTransform:
    """RGB -> resize shortest side (bicubic) -> centre crop -> [0, 1] -> (x - mean) / std, as (3, H, W)."""

    shortest_side: int
    crop: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    float_resize: bool = False
    """Resize each channel in floating point (no rounding or clipping to uint8), as KID / FID
    features want; the gates keep the model's own uint8 preprocessing."""

    @classmethod
    def from_folder(cls, folder: Path, image_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> "ImageTransform":
        path = folder / "preprocessor_config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
        size = config.get("size", image_size)
        if isinstance(size, dict):
            # {"height", "width"} (ViT processors squash to it): we resize the shortest side and crop
            # instead, as DINO's own evaluation did, so a product is never distorted.
            size = size.get("shortest_edge") or min(size["height"], size["width"])
        crop = config.get("crop_size", size)
        crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
        return cls(int(size), crop, tuple(config.get("image_mean", mean)), tuple(config.get("image_std", std)))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = _to_rgb(image)
        # The long side rounds down, as in transformers' processors, so both crop the same pixels.
        width, height = (self.shortest_side * side // min(image.size) for side in image.size)
        top, left = (height - self.crop[0]) // 2, (width - self.crop[1]) // 2
        if self.float_resize:
            channels = [np.asarray(c.convert("F").resize((width, height), Image.BICUBIC)) for c in image.split()]
            array = np.stack(channels, axis=-1)[top:top + self.crop[0], left:left + self.crop[1]]
        else:
            image = image.resize((width, height), Image.BICUBIC)
            array = np.asarray(image.crop((left, top, left + self.crop[1], top + self.crop[0])), dtype=np.float32)
        pixels = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)


def _to_rgb(image: Image.Image) -> Image.Image:
    # Transparent pixels become white (as transformers' convert_rgb does), not whatever RGB hides under them.
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------- the embedders

def _embed(runner: Runner, items: Sequence[Any], prepare: Callable, dim: int, batch_size: int) -> torch.Tensor:
    outputs = [torch.empty(0, dim)]
    for start in range(0, len(items), batch_size):
        features = runner(prepare(items[start:start + batch_size]))
        outputs.append(torch.nn.functional.normalize(features.float().cpu(), dim=-1))
    return torch.cat(outputs)


@dataclass(kw_only=True)
class _Embedder:
    """What both embedders share: the spec, the weights fingerprint and a batched image path."""

    name: str
    fingerprint: str
    backend: str
    dim: int
    transform: ImageTransform
    image_runner: Runner
    batch_size: int = BATCH_SIZE

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, dim) float32 on the CPU, each row L2-normalised."""
        prepare = lambda batch: torch.stack([self.transform(image) for image in batch])  # noqa: E731
        return _embed(self.image_runner, images, prepare, self.dim, self.batch_size)


@dataclass(kw_only=True)
class DinoEmbedder(_Embedder):
    """A DINO ViT: the image embedding is the CLS token of the last hidden state."""


@dataclass(kw_only=True)
class ClipEmbedder(_Embedder):
    """CLIP: projected image and text embeddings in one space."""

    text_runner: Runner
    tokenize: Callable[[Sequence[str]], torch.Tensor]

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, dim) float32 on the CPU, each row L2-normalised; prompts past 77 tokens are truncated."""
        if isinstance(texts, str):
            raise CatalogError(f"embed_texts takes a list of prompts, got the single string {texts!r}")
        return _embed(self.text_runner, list(texts), self.tokenize, self.dim, self.batch_size)


def _clip_image(clip, pixel_values: torch.Tensor) -> torch.Tensor:
    return clip.visual_projection(clip.vision_model(pixel_values=pixel_values).pooler_output)


def _clip_text(clip, input_ids: torch.Tensor) -> torch.Tensor:
    # No attention mask: the text tower is causal, so padding after the end-of-text token cannot
    # change the feature pooled at it, and the ONNX graph needs only input_ids.
    return clip.text_projection(clip.text_model(input_ids=input_ids).pooler_output)


def _dino_cls(vit, pixel_values: torch.Tensor) -> torch.Tensor:
    # The CLS token of the last hidden state (after the final layer norm), as in DINO's own
    # evaluation; facebook/dino-vits16's pooler is randomly initialised and must not be used.
    return vit(pixel_values=pixel_values).last_hidden_state[:, 0]


class _Part(torch.nn.Module):
    """One path through a model (image or text) as a module of its own, for inference and export."""

    def __init__(self, model: torch.nn.Module, features: Callable):
        super().__init__()
        self.model, self.features = model, features

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.features(self.model, inputs)


def load_clip(spec: str = DEFAULT_CLIP, device: str = "cpu", backend: str = "torch") -> ClipEmbedder:
    from transformers import CLIPModel, CLIPTokenizer

    folder, fingerprint = _checked_inputs(spec, backend, "clip")
    with quiet_model_loading():
        model = CLIPModel.from_pretrained(folder, use_safetensors=True, local_files_only=True).float().eval()
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

    def tokenize(texts: Sequence[str]) -> torch.Tensor:
        return tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                         return_tensors="pt")["input_ids"]

    image_size = model.config.vision_config.image_size
    transform = ImageTransform.from_folder(folder, image_size, CLIP_MEAN, CLIP_STD)
    modules = {"image": _Part(model, _clip_image), "text": _Part(model, _clip_text)}
    examples = {"image": torch.zeros(2, 3, *transform.crop), "text": tokenize(["a photo", "a product photo"])}
    runners = _runners(modules, examples, fingerprint, device, backend)
    return ClipEmbedder(name=spec, fingerprint=fingerprint, backend=backend, dim=model.config.projection_dim,
                        transform=transform, image_runner=runners["image"], text_runner=runners["text"],
                        tokenize=tokenize)


def load_dino(spec: str = DEFAULT_DINO, device: str = "cpu", backend: str = "torch") -> DinoEmbedder:
    from transformers import ViTModel

    folder, fingerprint = _checked_inputs(spec, backend, "vit")
    with quiet_model_loading():
        model = ViTModel.from_pretrained(folder, add_pooling_layer=False, use_safetensors=True,
                                         local_files_only=True).float().eval()
    transform = ImageTransform.from_folder(folder, model.config.image_size, IMAGENET_MEAN, IMAGENET_STD)
    runners = _runners({"image": _Part(model, _dino_cls)}, {"image": torch.zeros(2, 3, *transform.crop)},
                       fingerprint, device, backend)
    return DinoEmbedder(name=spec, fingerprint=fingerprint, backend=backend, dim=model.config.hidden_size,
                        transform=transform, image_runner=runners["image"])


def _checked_inputs(spec: str, backend: str, model_type: str) -> tuple[Path, str]:
    if backend not in BACKENDS:
        raise CatalogError(f"backend '{backend}' is not one of {', '.join(BACKENDS)}")
    folder = resolve_embedder_folder(spec)
    found = json.loads((folder / "config.json").read_text()).get("model_type")
    if found != model_type:
        raise CatalogError(f"embedder '{spec}' is a '{found}' model; this loader needs a '{model_type}' model")
    return folder, embedder_fingerprint(folder)


def _runners(modules: dict, examples: dict, fingerprint: str, device: str, backend: str) -> dict[str, Runner]:
    if backend == "onnx":
        return onnx_runners(modules, examples, fingerprint, device)
    for module in modules.values():
        module.to(device).eval()

    def torch_runner(module: torch.nn.Module) -> Runner:
        def run(batch: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return module(batch.to(device))
        return run

    return {part: torch_runner(module) for part, module in modules.items()}


# ---------------------------------------------------------------- ONNX Runtime backend

def onnx_runners(modules: dict, examples: dict, fingerprint: str, device: str) -> dict[str, Runner]:
    ort = onnx_runtime()
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise CatalogError(f"device '{device}' asked for, but this onnxruntime has no CUDAExecutionProvider: "
                               "install onnxruntime-gpu ('.[gpu]') in place of onnxruntime")
        providers.insert(0, "CUDAExecutionProvider")
    folder = export_onnx(modules, examples, fingerprint)

    def onnx_runner(part: str) -> Runner:
        session = ort.InferenceSession(str(folder / f"{part}.onnx"), providers=providers)
        input_name = session.get_inputs()[0].name

        def run(batch: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {input_name: batch.numpy()})[0])
        return run

    return {part: onnx_runner(part) for part in modules}


# ---------------------------------------------------------------- reference photo embeddings

class ReferenceEmbeddings:
    """Compute-once cache of the embeddings of an instance's reference photos.

    Stored as `<root>/<embedder.fingerprint>/<key>.safetensors` (a "/" in the key becomes "__"),
    with the photos' sha256 list in the metadata: a changed, added, removed or reordered photo
    means the embeddings are computed again.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, embedder: ImageEmbedder, key: str) -> Path:
        if not key or key.strip(". ") == "":
            raise CatalogError(f"reference embedding key {key!r} is empty")
        return self.root / embedder.fingerprint / (key.replace("/", "__").replace("\\", "__") + ".safetensors")

    def get(self, embedder: ImageEmbedder, key: str, photos: Sequence[Path]) -> torch.Tensor:
        if not photos:
            raise CatalogError(f"reference embeddings for '{key}': no photos given")
        missing = [str(photo) for photo in photos if not Path(photo).is_file()]
        if missing:
            raise CatalogError(f"reference embeddings for '{key}': photo {missing[0]} does not exist")
        path = self.path(embedder, key)
        hashes = [sha256_file(photo) for photo in photos]
        cached = self._read(path, key, hashes)
        if cached is not None:
            return cached
        embeddings = embedder.embed_images([_open_photo(photo) for photo in photos]).contiguous()
        metadata = {"key": key, "embedder": embedder.name, "fingerprint": embedder.fingerprint,
                    "photo_sha256": json.dumps(hashes)}
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({"embeddings": embeddings}, str(tmp), metadata=metadata)
        return embeddings

    @staticmethod
    def _read(path: Path, key: str, hashes: list[str]) -> torch.Tensor | None:
        from safetensors import safe_open

        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as stored:
                metadata = stored.metadata() or {}
                if metadata.get("key") != key or json.loads(metadata.get("photo_sha256", "[]")) != hashes:
                    return None
                return stored.get_tensor("embeddings")
        except (OSError, ValueError, RuntimeError):
            return None  # unreadable (e.g. written by a different safetensors): compute again


def _open_photo(path: Path) -> Image.Image:
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)  # phone photos: honour the orientation tag
        image.load()
    return image
