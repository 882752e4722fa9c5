"""Inception-v3 as FID measures with it: the network of pytorch-fid and of the original TensorFlow FID.

FID and KID are only comparable with other people's numbers when the features come from this
network with these weights. torchvision's ImageNet Inception-v3 is a different network (other
weights, 1000 classes, average pools that count the padding), so nothing else is ever used in its
place, and the weights are never downloaded: the user puts pytorch-fid's published file (or the
same tensors as safetensors) where `find_weights` looks.

The layout and the state-dict names follow torchvision's Inception3 (Conv2d_1a_3x3.conv.weight,
Mixed_5b.branch1x1.bn.running_mean, ..., fc.weight), so that file loads with strict=True. What
differs from torchvision, after TensorFlow's graph:
- the 3x3 average pools of the A and C blocks and of the first E block (Mixed_7b) leave the zero
  padding out of the mean;
- the last E block (Mixed_7c) max-pools in its pool branch;
- the classifier has 1008 outputs (TensorFlow's 1000 classes and 8 unused ones).

Features: images in [0, 1] -> 299 x 299 -> [-1, 1] -> "pool3", the 2048-d average of the last
feature map. In `catalog eval` every image is resized before it gets here, in floating point with
bicubic filtering (the shortest side to 299, then a centre crop, as for the CLIP and DINO features),
so scores are comparable across our own runs but not bit for bit with pytorch-fid, which squashes
each image to 299 x 299 with bilinear filtering.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from catalog_gen.quality.embedders import ImageTransform
from catalog_gen.errors import CatalogError
from catalog_gen.storage import sha256_file

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
"""pytorch-fid's name for the weights, ported from TensorFlow's inception-2015-12-05 graph."""
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
SAFETENSORS_FILE = Path(WEIGHTS_FILE).stem + ".safetensors"
"""The same tensors as safetensors, also looked for in the torch hub cache."""
WEIGHTS_ENV = "CATALOG_GEN_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BATCH_SIZE = 16
KernelSize = int | tuple[int, int]


# ---------------------------------------------------------------- the network

class ConvBN(nn.Module):
    """Convolution without bias, batch norm, ReLU (torchvision's BasicConv2d, so its state-dict names)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: KernelSize, stride: int = 1,
                 padding: KernelSize = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)  # TensorFlow's epsilon, not torch's 1e-5

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _through(x: Tensor, *layers: nn.Module) -> Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _avg_pool_3x3(x: Tensor) -> Tensor:
    # TensorFlow averages over the real pixels only at the borders (torch counts the zero padding).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_3x3(x: Tensor) -> Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class InceptionA(nn.Module):
    """35 x 35 block (Mixed_5b-d): 1x1, 5x5, double 3x3 and average-pool branches (pytorch-fid's FIDInceptionA)."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            _through(x, self.branch5x5_1, self.branch5x5_2),
            _through(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            self.branch_pool(_avg_pool_3x3(x)),
        ], dim=1)


class InceptionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): strided 3x3, strided double 3x3 and max-pool branches."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch3x3(x),
            _through(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    """17 x 17 block (Mixed_6b-e): factorised 7x7 branches and an average-pool branch (FIDInceptionC)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            _through(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
            _through(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5),
            self.branch_pool(_avg_pool_3x3(x)),
        ], dim=1)


class InceptionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): strided 3x3, 7x7-then-strided-3x3 and max-pool branches."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            _through(x, self.branch3x3_1, self.branch3x3_2),
            _through(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionE(nn.Module):
    """8 x 8 block (Mixed_7b, Mixed_7c): split 1x3 / 3x1 branches and a pool branch.

    `max_pool_branch`: Mixed_7c of TensorFlow's graph max-pools where every other block averages
    (pytorch-fid's FIDInceptionE_2); Mixed_7b averages without the padding (FIDInceptionE_1).
    """

    def __init__(self, in_channels: int, max_pool_branch: bool):
        super().__init__()
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        split = self.branch3x3_1(x)
        double = _through(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = _max_pool_3x3(x) if self.max_pool_branch else _avg_pool_3x3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(split), self.branch3x3_2b(split),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ], dim=1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3, without the auxiliary classifier: images in [0, 1] -> (N, 2048) pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)  # unused for features; kept so the file loads strictly

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> (N, 2048) float pool3 features."""
        if tuple(images.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
            # pytorch-fid's resize, for direct callers; `catalog eval` hands over 299 x 299 already.
            images = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = images * 2 - 1  # the range the TensorFlow graph was trained on
        x = _through(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = _through(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = _through(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                     self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def class_logits(self, features: Tensor) -> Tensor:
        """(N, 1008) logits from pool3 features (softmax them for the Inception Score)."""
        return self.fc(features)


# ---------------------------------------------------------------- the weights file

@dataclass(frozen=True)
class InceptionWeights:
    """The weights file used, named in every eval result so the scores say where they came from."""

    path: Path
    sha256: str

    @property
    def label(self) -> str:
        return f"{self.path.name}, sha256 {self.sha256[:12]}"


def find_weights(explicit: str | Path = "") -> Path:
    """The weights file: `explicit` (the eval setting inception_weights) if given, else
    $CATALOG_GEN_INCEPTION_WEIGHTS if set, else pytorch-fid's place in the torch hub cache.

    A path that is set is the only place looked at: a typo must not quietly fall back to another file.
    """
    hub = Path(torch.hub.get_dir()) / "checkpoints"  # $TORCH_HOME/hub/checkpoints, where pytorch-fid saves it
    if explicit:
        places = [(Path(explicit).expanduser(), "the inception_weights setting")]
    elif os.environ.get(WEIGHTS_ENV):
        places = [(Path(os.environ[WEIGHTS_ENV]).expanduser(), f"${WEIGHTS_ENV}")]
    else:
        places = [(hub / name, "the torch hub cache") for name in (WEIGHTS_FILE, SAFETENSORS_FILE)]
    for path, _ in places:
        if path.is_file():
            return path
    searched = "; ".join(f"{path} ({origin})" for path, origin in places)
    raise CatalogError(
        f"Inception-v3 FID weights not found; searched: {searched}. Put the standard file {WEIGHTS_FILE} "
        f"(published at {WEIGHTS_URL}) in {hub}, or give its path (.pth state dict or .safetensors) with the "
        f"eval setting inception_weights or ${WEIGHTS_ENV}. catalog-gen never downloads it and never "
        "substitutes another network for it; extractor dino or clip needs no extra file.")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a .safetensors file or of a .pth state dict, read without running any pickled code."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise CatalogError(f"Inception weights {path}: not a readable safetensors file ({error})") from error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        holds = f"it holds a pickled {found.group(1)}" if found else "it is not a file of plain tensors"
        raise CatalogError(f"Inception weights {path}: refused, {holds}; only a state dict of tensors (or "
                           "safetensors) is loaded, never pickled objects") from error
    except (OSError, RuntimeError, EOFError) as error:
        raise CatalogError(f"Inception weights {path}: cannot read ({error})") from error
    if not isinstance(loaded, Mapping) or not all(isinstance(value, Tensor) for value in loaded.values()):
        raise CatalogError(f"Inception weights {path}: holds a {type(loaded).__name__}, not a state dict of tensors")
    return dict(loaded)


def check_state_dict(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], path: Path) -> None:
    """Every key and shape of the FID Inception-v3; BatchNorm's num_batches_tracked may be present or not
    (files from before torch 0.4.1 lack it, and inference never reads it)."""
    optional = {key for key in expected if key.endswith(".num_batches_tracked")}
    problems = {
        "missing": [key for key in expected if key not in state and key not in optional],
        "unexpected": [key for key in state if key not in expected],
        "wrong shape": [f"{key} {tuple(state[key].shape)} (needs {tuple(expected[key].shape)})"
                        for key in expected if key in state and state[key].shape != expected[key].shape],
    }
    found = [f"{kind}: {', '.join(keys[:3])}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}"
             for kind, keys in problems.items() if keys]
    if found:
        raise CatalogError(f"Inception weights {path} do not fit the FID Inception-v3 (torchvision Inception3 "
                           f"names, 1008-class fc): {'; '.join(found)}")


def load_network(path: Path) -> FIDInceptionV3:
    """The network with the file's weights, in eval mode, on the CPU."""
    network = FIDInceptionV3()
    expected = network.state_dict()
    state = read_state_dict(path)
    check_state_dict(state, expected, path)
    absent = {key: expected[key] for key in expected if key not in state}  # only num_batches_tracked here
    network.load_state_dict({**state, **absent}, strict=True)
    return network.eval().requires_grad_(False)


# ---------------------------------------------------------------- the embedder

@dataclass(kw_only=True)
class InceptionEmbedder:
    """KID / FID features of images; an ImageEmbedder, so reference features are cached like CLIP's and DINO's."""

    name: str
    fingerprint: str
    weights: InceptionWeights
    network: FIDInceptionV3
    transform: ImageTransform
    device: str = "cpu"
    batch_size: int = BATCH_SIZE
    dim: int = FEATURE_DIM

    def embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        """(N, 2048) float32 on the CPU, not L2-normalised: FID is defined on the raw pool3 features."""
        batches = [torch.empty(0, self.dim)]
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.transform(image) for image in images[start:start + self.batch_size]])
            with torch.inference_mode():
                batches.append(self.network(pixels.to(self.device)).float().cpu())
        return torch.cat(batches)


def load_fid_inception(explicit: str | Path = "", device: str = "cpu") -> InceptionEmbedder:
    """The FID Inception-v3 from a local weights file (see `find_weights`); never downloads."""
    path = find_weights(explicit)
    network = load_network(path)
    weights = InceptionWeights(path, sha256_file(path))
    # The same floating-point bicubic resize as the eval's CLIP / DINO features; the network maps
    # [0, 1] to [-1, 1] itself, so the transform only resizes, crops and scales to [0, 1].
    transform = ImageTransform(INPUT_SIZE, (INPUT_SIZE, INPUT_SIZE), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                               float_resize=True)
    return InceptionEmbedder(name=weights.label, fingerprint=f"fid-inception-{weights.sha256[:16]}", weights=weights,
                             network=network.to(device), transform=transform, device=str(device))
