"""The FID Inception-v3: layout, offline weights lookup and loading, and `catalog eval` with it.

The real weights file cannot be fetched here, so the tests use random weights under exactly the
real file's keys and shapes; what they prove is the plumbing, not agreement with pytorch-fid's numbers.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from catalog_gen.quality import inception
from catalog_gen.errors import CatalogError
from catalog_gen.storage import sha256_file

# torchvision documents 27,161,264 parameters for inception_v3 with its auxiliary classifier
# (3,326,696: conv0 98,560 + conv1 2,459,136 + a 768 x 1000 fc 769,000) and a 2048 x 1000 fc
# (2,049,000); that leaves 21,785,568 for the convolutions and batch norms. The FID network has no
# auxiliary classifier and a 2048 x 1008 fc (2,065,392).
BACKBONE_PARAMETERS = 27_161_264 - 3_326_696 - 2_049_000
FID_INCEPTION_PARAMETERS = BACKBONE_PARAMETERS + 2048 * 1008 + 1008


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights with every key and shape of the real file.

    He-scaled convolutions and near-identity batch norms keep activations of order one through
    all 94 layers (torch's default init fades them to ~1e-8, which would hide loading mistakes).
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std + mean

    state = {}
    for key, tensor in inception.FIDInceptionV3().state_dict().items():
        shape = tensor.shape
        if key.endswith("conv.weight"):
            state[key] = normal(shape, math.sqrt(2.0 / shape[1:].numel()))
        elif key.endswith("bn.running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        elif key.endswith("bn.weight"):
            state[key] = normal(shape, 0.1, mean=1.0)
        elif key.endswith(("bn.bias", "bn.running_mean")):
            state[key] = normal(shape, 0.1)
        elif key == "fc.weight":
            state[key] = normal(shape, 1 / math.sqrt(shape[1]))
        else:  # fc.bias, num_batches_tracked
            state[key] = torch.zeros_like(tensor)
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """The random weights as a .pth state dict (with num_batches_tracked) and as safetensors (without)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("inception-weights")
    state = random_state_dict()
    torch.save(state, folder / "random-fid-inception.pth")
    save_file({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
              str(folder / "random-fid-inception.safetensors"))
    return {"pth": folder / "random-fid-inception.pth", "safetensors": folder / "random-fid-inception.safetensors"}


def small_images() -> list[Image.Image]:
    y, x = np.mgrid[0:48, 0:64]
    first = np.dstack([x * 4, y * 5, 255 - x * 4])  # smooth ramps, not square: resized and cropped
    second = np.random.default_rng(0).integers(0, 256, (40, 40, 3))  # noise, upscaled
    return [Image.fromarray(first.astype(np.uint8)), Image.fromarray(second.astype(np.uint8))]


@pytest.fixture
def no_lookup_settings(monkeypatch, tmp_path) -> Path:
    """An empty TORCH_HOME and no $CATALOG_GEN_INCEPTION_WEIGHTS; returns TORCH_HOME."""
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home"


# ---------------------------------------------------------------- the network

def test_layout_matches_the_fid_inception():
    network = inception.FIDInceptionV3()
    state = network.state_dict()
    assert sum(p.numel() for p in network.parameters()) == FID_INCEPTION_PARAMETERS == 23_850_960
    assert sum(p.numel() for name, p in network.named_parameters() if not name.startswith("fc.")) == 21_785_568
    assert state["fc.weight"].shape == (1008, 2048) and state["fc.bias"].shape == (1008,)
    # 94 conv + batch-norm layers, named as in torchvision's Inception3.
    assert sum(key.endswith(".bn.num_batches_tracked") for key in state) == 94
    assert len(state) == 94 * 6 + 2
    for key in ("Conv2d_1a_3x3.conv.weight", "Mixed_5b.branch5x5_2.bn.running_mean",
                "Mixed_6e.branch7x7dbl_5.conv.weight", "Mixed_7c.branch3x3dbl_3b.bn.running_var"):
        assert key in state, key
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert network.Conv2d_1a_3x3.bn.eps == 0.001
    assert not network.Mixed_7b.max_pool_branch and network.Mixed_7c.max_pool_branch


def test_average_pool_leaves_the_padding_out():
    pooled = inception._avg_pool_3x3(torch.ones(1, 1, 4, 4))
    assert torch.equal(pooled, torch.ones(1, 1, 4, 4))  # torch's default would give 4/9 in the corners


# ---------------------------------------------------------------- loading

def test_pth_and_safetensors_give_the_same_features(weights):
    images = small_images()
    from_pth = inception.load_fid_inception(weights["pth"])
    from_safetensors = inception.load_fid_inception(str(weights["safetensors"]))
    features = from_pth.embed_images(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and features.std() > 0.01 and not torch.equal(features[0], features[1])
    assert torch.equal(features, from_safetensors.embed_images(images))
    digest = sha256_file(weights["pth"])
    assert from_pth.weights.sha256 == digest
    assert from_pth.name == f"random-fid-inception.pth, sha256 {digest[:12]}"
    assert from_pth.fingerprint == f"fid-inception-{digest[:16]}"
    assert from_pth.transform.float_resize and from_pth.transform.crop == (299, 299)


def test_lookup_order_setting_then_env_then_torch_home(weights, no_lookup_settings, monkeypatch):
    checkpoints = no_lookup_settings / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / inception.WEIGHTS_FILE).symlink_to(weights["pth"])
    assert inception.find_weights() == checkpoints / inception.WEIGHTS_FILE
    assert inception.load_fid_inception().weights.path == checkpoints / inception.WEIGHTS_FILE
    (checkpoints / inception.WEIGHTS_FILE).unlink()
    (checkpoints / inception.SAFETENSORS_FILE).symlink_to(weights["safetensors"])
    assert inception.find_weights() == checkpoints / inception.SAFETENSORS_FILE

    monkeypatch.setenv(inception.WEIGHTS_ENV, str(weights["safetensors"]))
    assert inception.find_weights() == weights["safetensors"]
    assert inception.find_weights(weights["pth"]) == weights["pth"]


def test_missing_file_names_the_places_searched_and_the_standard_file(no_lookup_settings, monkeypatch, tmp_path):
    with pytest.raises(CatalogError) as caught:
        inception.find_weights()
    message = str(caught.value)
    assert str(no_lookup_settings / "hub" / "checkpoints" / inception.WEIGHTS_FILE) in message
    assert inception.WEIGHTS_URL in message and inception.WEIGHTS_ENV in message
    assert "never downloads" in message and "never substitutes another network" in message

    # A path that is set is the only place looked at, even when the torch hub cache has the file.
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "typo.pth"))
    with pytest.raises(CatalogError, match=r"typo\.pth \(\$CATALOG_GEN_INCEPTION_WEIGHTS\)"):
        inception.find_weights()
    with pytest.raises(CatalogError, match=r"other\.pth \(the inception_weights setting\)"):
        inception.find_weights(tmp_path / "other.pth")


def test_wrong_keys_or_shapes_are_named(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"Conv2d_1a_3x3.conv.weights": torch.zeros(32, 3, 3, 3)}, path)
    with pytest.raises(CatalogError, match=r"wrong\.pth do not fit.*missing: Conv2d_1a_3x3\.conv\.weight, .* and "
                                           r"\d+ more; unexpected: Conv2d_1a_3x3\.conv\.weights"):
        inception.load_fid_inception(path)

    expected = inception.FIDInceptionV3().state_dict()
    imagenet_head = {**expected, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    wrong_shape = r"wrong shape: fc\.weight \(1000, 2048\) \(needs \(1008, 2048\)\), fc\.bias"
    with pytest.raises(CatalogError, match=wrong_shape):
        inception.check_state_dict(imagenet_head, expected, path)


def test_pickled_objects_and_broken_files_are_refused(tmp_path):
    module_file = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), module_file)  # a whole pickled module, not a state dict
    with pytest.raises(CatalogError, match=r"module\.pth: refused, it holds a pickled torch\.nn\.modules\.linear"):
        inception.load_fid_inception(module_file)

    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(CatalogError, match=r"list\.pth: holds a list, not a state dict of tensors"):
        inception.load_fid_inception(not_a_dict)

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    with pytest.raises(CatalogError, match=r"broken\.safetensors: not a readable safetensors file"):
        inception.load_fid_inception(broken)


# ---------------------------------------------------------------- catalog eval

def test_eval_with_inception_names_the_weights(sample_catalogue, weights, tmp_path):
    from catalog_gen.config import TrainConfig, build_config, read_recipe
    from catalog_gen.evaluate.evaluation import EvalConfig, run_eval
    from catalog_gen.train.workflow import PhotoSource, train_class

    train = build_config(TrainConfig, read_recipe("tiny_sweep", "train"), {})
    evaluation = build_config(EvalConfig, read_recipe("tiny_sweep", "eval"),
                              {"extractor": "inception", "inception_weights": str(weights["pth"]),
                               "prompts": ["{instance_prompt}"], "images_per_prompt": 2})
    source = PhotoSource(photos_dir=sample_catalogue.photos_dir, products_csv=sample_catalogue.products_csv)
    train_class(source, "ring", ["band"], tmp_path, replace(train, steps=10, checkpoint_every=10))

    out = run_eval(tmp_path, "ring", ["band"], evaluation)
    table = pl.read_parquet(out / "eval.parquet")
    label = f"random-fid-inception.pth, sha256 {sha256_file(weights['pth'])[:12]}"
    assert table["extractor"].to_list() == ["inception"] and table["extractor_model"].to_list() == [label]
    for metric in ("kid_photos", "fid_photos", "kid_base", "fid_base"):
        assert table[metric].is_finite().all(), metric
    assert f"Extractor for KID/FID: **inception** ({label})" in (out / "summary.md").read_text()
    # The photos' Inception features are cached beside the CLIP / DINO ones, keyed by the weights' hash.
    cached = list((tmp_path / "embeddings" / "float-resize").glob("fid-inception-*/ring__band.safetensors"))
    assert len(cached) == 1
