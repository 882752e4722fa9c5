"""The CLIP / DINO embedders on the tiny presets: loading, preprocessing, embeddings, ONNX, caching, errors."""

from __future__ import annotations

import json
import shutil
import socket
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from catalog_gen.models.embedder_presets import EMBEDDER_PRESETS, materialise_embedder_preset
from catalog_gen.quality.embedders import ImageEmbedder, ImageTransform, ReferenceEmbeddings, load_clip, load_dino
from catalog_gen.errors import CatalogError
from catalog_gen.storage import sha256_file

LOADERS = {"tiny-clip": load_clip, "tiny-dino": load_dino}


def _images(count: int, seed: int = 0) -> list[Image.Image]:
    """Random photos of different sizes and modes (RGB, RGBA, grey, palette), so preprocessing is exercised."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        size = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
        images.append(image.convert(("RGB", "RGBA", "L", "P")[i % 4]))
    return images


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return _images(21)


@pytest.fixture(scope="module")
def embedders() -> dict:
    return {name: loader(name) for name, loader in LOADERS.items()}


# ---------------------------------------------------------------- presets

@pytest.mark.slow  # builds or loads models
def test_presets_build_offline_and_deterministically(tmp_path, monkeypatch, preset_cache):
    def no_network(*args, **kwargs):
        raise AssertionError("a preset build tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    for name in EMBEDDER_PRESETS:
        session_copy = materialise_embedder_preset(name)
        fresh = materialise_embedder_preset(name, cache_dir=tmp_path)
        # The toy world's presets are copies of shipped weights: their folder also names the weights' hashes.
        tag = f"-{EMBEDDER_PRESETS[name].version()}" if EMBEDDER_PRESETS[name].version else ""
        assert session_copy.parent == preset_cache / "presets" and fresh.name == f"{name}-v1{tag}"
        files = sorted(f.name for f in fresh.iterdir())
        assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= set(files)
        assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
        # Built from code: tiny. The toy world's copies: inside the toy world's whole 25 MB budget.
        assert sum(f.stat().st_size for f in fresh.iterdir()) < (25_000_000 if tag else 2_000_000)
        for file in files:
            assert sha256_file(fresh / file) == sha256_file(session_copy / file), f"{name}/{file} differs"
    assert {"vocab.json", "merges.txt"} <= {f.name for f in (tmp_path / "presets" / "tiny-clip-v1").iterdir()}


def test_clip_preset_config_matches_its_tokenizer():
    from transformers import CLIPTokenizer

    folder = materialise_embedder_preset("tiny-clip")
    config = json.loads((folder / "config.json").read_text())
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    text = config["text_config"]
    assert text["vocab_size"] == len(tokenizer)
    assert (text["bos_token_id"], text["eos_token_id"], text["pad_token_id"]) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


@pytest.mark.parametrize("name", LOADERS)
def test_preset_loads_like_a_local_folder_and_a_cached_hub_id(name, tmp_path, monkeypatch, images, embedders):
    import huggingface_hub.constants

    preset = materialise_embedder_preset(name)
    local = shutil.copytree(preset, tmp_path / "local", ignore=shutil.ignore_patterns(".*"))
    # A hub cache laid out as huggingface_hub writes it: refs/main names the snapshot folder.
    repo = tmp_path / "hub" / f"models--acme--{name}"
    shutil.copytree(local, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    expected = embedders[name].embed_images(images[:4])
    for spec in (str(local), f"acme/{name}"):
        embedder = LOADERS[name](spec)
        assert embedder.name == spec and embedder.fingerprint == embedders[name].fingerprint
        assert torch.equal(embedder.embed_images(images[:4]), expected)


# ---------------------------------------------------------------- preprocessing and embeddings

def test_image_transform_matches_transformers_pil_processor(images):
    processor_class = getattr(pytest.importorskip("transformers"), "CLIPImageProcessorPil", None)
    if processor_class is None:
        pytest.skip("this transformers has no torchvision-free CLIPImageProcessorPil to compare with")
    folder = materialise_embedder_preset("tiny-clip")
    ours = torch.stack([ImageTransform.from_folder(folder, 32)(image) for image in images])
    theirs = processor_class.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (len(images), 3, 32, 32)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_image_transform_defaults_without_preprocessor_config(tmp_path):
    transform = ImageTransform.from_folder(tmp_path, image_size=48)
    assert transform.shortest_side == 48 and transform.crop == (48, 48)
    pixels = transform(Image.new("RGB", (96, 60), (255, 255, 255)))
    assert pixels.shape == (3, 48, 48)
    white = (1 - torch.tensor(transform.mean)) / torch.tensor(transform.std)
    assert torch.allclose(pixels[:, 0, 0], white, atol=1e-5)


@pytest.mark.parametrize("name", LOADERS)
def test_embeddings_are_normalised_deterministic_and_batch_size_independent(name, images, embedders):
    embedder = embedders[name]
    assert isinstance(embedder, ImageEmbedder)
    first = embedder.embed_images(images)
    assert first.shape == (len(images), 32) and first.dtype == torch.float32
    assert torch.allclose(first.norm(dim=1), torch.ones(len(images)), atol=1e-6)
    assert torch.equal(LOADERS[name](name).embed_images(images), first)
    assert embedder.embed_images([]).shape == (0, 32)
    for batch_size in (1, 5):
        embedder.batch_size = batch_size
        try:
            assert (embedder.embed_images(images) - first).abs().max() < 1e-6
        finally:
            embedder.batch_size = 16
    assert (first[0] @ first[1]) < 0.9999  # different photos, different embeddings


def test_dino_embeds_the_cls_token_of_the_last_hidden_state(images, embedders):
    from transformers import ViTModel

    folder = materialise_embedder_preset("tiny-dino")
    model = ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
    pixels = torch.stack([ImageTransform.from_folder(folder, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(image)
                          for image in images])
    with torch.no_grad():
        cls = model(pixel_values=pixels).last_hidden_state[:, 0]
    expected = torch.nn.functional.normalize(cls, dim=-1)
    assert (embedders["tiny-dino"].embed_images(images) - expected).abs().max() < 1e-6


def test_clip_text_embeddings_with_the_bpe_tokenizer(embedders):
    from transformers import CLIPModel, CLIPTokenizer

    prompts = ["a photo of a gold hoop earring", "a silver ring on white marble", "a photo of a gold hoop earring"]
    texts = embedders["tiny-clip"].embed_texts(prompts)
    assert texts.shape == (3, 32)
    assert torch.allclose(texts.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.equal(texts[0], texts[2]) and (texts[0] @ texts[1]) < 0.9999
    # transformers' own call (padding to the longest prompt plus an attention mask) gives the same vectors.
    folder = materialise_embedder_preset("tiny-clip")
    model, tokenizer = CLIPModel.from_pretrained(folder).eval(), CLIPTokenizer.from_pretrained(folder)
    inputs = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = model.text_model(**inputs).pooler_output
    expected = torch.nn.functional.normalize(model.text_projection(pooled), dim=-1)
    assert (texts - expected).abs().max() < 1e-5
    with pytest.raises(CatalogError, match="list of prompts"):
        embedders["tiny-clip"].embed_texts("a ring")


# ---------------------------------------------------------------- ONNX Runtime backend

@pytest.fixture(scope="module")
def onnx_embedders() -> dict:
    for module in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(module, reason=f"{module} is not installed: pip install '.[onnx]'")
    return {name: loader(name, backend="onnx") for name, loader in LOADERS.items()}


def _max_cosine_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((1 - (a * b).sum(dim=1)).abs().max())


@pytest.mark.parametrize("name", LOADERS)
def test_onnx_agrees_with_torch_on_images(name, images, embedders, onnx_embedders, preset_cache):
    onnx = onnx_embedders[name]
    assert onnx.backend == "onnx" and onnx.fingerprint == embedders[name].fingerprint
    assert (preset_cache / "onnx" / onnx.fingerprint / "image.onnx").is_file()
    ours, reference = onnx.embed_images(images), embedders[name].embed_images(images)
    assert ours.shape == reference.shape
    assert _max_cosine_gap(ours, reference) < 1e-4


def test_onnx_agrees_with_torch_on_clip_text(embedders, onnx_embedders):
    prompts = ["a photo of a gold hoop earring", "sks ring", "a chunky silver chain necklace on velvet"] * 7
    ours, reference = onnx_embedders["tiny-clip"].embed_texts(prompts), embedders["tiny-clip"].embed_texts(prompts)
    assert ours.shape == (21, 32)
    assert _max_cosine_gap(ours, reference) < 1e-4


def test_onnx_export_is_reused(onnx_embedders, monkeypatch):
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("exported again"))
    load_dino("tiny-dino", backend="onnx")


@pytest.mark.slow  # builds or loads models
def test_onnx_without_onnxruntime_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(CatalogError, match=r"pip install '\.\[onnx\]'"):
        load_dino("tiny-dino", backend="onnx")


def test_onnx_on_cuda_without_the_cuda_provider_is_refused(onnx_embedders):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(CatalogError, match="CUDAExecutionProvider"):
        load_dino("tiny-dino", device="cuda", backend="onnx")


# ---------------------------------------------------------------- reference embeddings cache

class CountingEmbedder:
    def __init__(self, inner):
        self.inner, self.name, self.fingerprint, self.calls = inner, inner.name, inner.fingerprint, 0

    def embed_images(self, images):
        self.calls += 1
        return self.inner.embed_images(images)


def test_reference_embeddings_compute_once_and_recompute_on_changed_photos(tmp_path, embedders):
    photos = []
    for i, image in enumerate(_images(3, seed=7)):
        photos.append(tmp_path / "photos" / f"{i}.png")
        photos[-1].parent.mkdir(exist_ok=True)
        image.save(photos[-1])
    embedder = CountingEmbedder(embedders["tiny-dino"])
    cache = ReferenceEmbeddings(tmp_path / "embeddings")

    first = cache.get(embedder, "rings/gold-band", photos)
    again = ReferenceEmbeddings(tmp_path / "embeddings").get(embedder, "rings/gold-band", photos)
    assert embedder.calls == 1 and torch.equal(first, again) and first.shape == (3, 32)
    stored = tmp_path / "embeddings" / embedder.fingerprint / "rings__gold-band.safetensors"
    assert [p.name for p in stored.parent.iterdir()] == [stored.name]  # no temporary files left behind
    from safetensors import safe_open

    with safe_open(str(stored), framework="pt") as handle:
        assert json.loads(handle.metadata()["photo_sha256"]) == [sha256_file(p) for p in photos]

    _images(1, seed=99)[0].save(photos[1])  # a photo replaced
    changed = cache.get(embedder, "rings/gold-band", photos)
    assert embedder.calls == 2 and not torch.equal(changed[1], first[1]) and torch.equal(changed[0], first[0])
    cache.get(embedder, "rings/gold-band", photos[:2])  # a photo removed
    cache.get(embedder, "rings/gold-band", photos[:2])
    assert embedder.calls == 3
    with pytest.raises(CatalogError, match="no photos"):
        cache.get(embedder, "rings/gold-band", [])


# ---------------------------------------------------------------- errors

def test_missing_hub_model_is_not_downloaded():
    with pytest.raises(CatalogError, match=r"not in the local Hugging Face cache.*hf download acme/no-such-clip"):
        load_clip("acme/no-such-clip")
    with pytest.raises(CatalogError, match="not found"):
        load_dino("./no/such/folder")


def test_pickle_only_folder_is_refused(tmp_path):
    folder = materialise_embedder_preset("tiny-dino")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copyfile(folder / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CatalogError, match=r"only pickle weights \(pytorch_model\.bin\).*safetensors only"):
        load_dino(str(pickled))
    (pickled / "config.json").unlink()
    with pytest.raises(CatalogError, match="no config.json"):
        load_dino(str(pickled))


def test_wrong_model_type_and_backend_are_refused():
    with pytest.raises(CatalogError, match="'clip' model; this loader needs a 'vit' model"):
        load_dino("tiny-clip")
    with pytest.raises(CatalogError, match="backend 'tensorrt'"):
        load_clip("tiny-clip", backend="tensorrt")
