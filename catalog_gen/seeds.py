"""Every seed the product derives, in one place.

A seed here is a pure function of the user's seed and what the draw is for (an instance and a step,
a SKU and a candidate index, an image index), never of what ran before it: so a resumed training, a
crashed night or a re-ordered sheet draws the same numbers as an uninterrupted run. Randomness that
libraries take from torch's global generator (peft's LoRA init, dropout) runs inside `isolated_rng`,
which leaves the caller's generator as it found it.

Changing a formula here changes images and adapters users already have: the pinned values in
tests/test_seeds.py say when one moved.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from typing import Iterator

from catalog_gen.errors import CatalogError

REDO_SEED_STRIDE = 1_000_003
"""Redo round n of a run draws with run seed + n x stride: new images, still reproducible."""


def _hash63(text: str, byteorder: str = "little") -> int:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    value = int.from_bytes(digest[:8], byteorder)
    return value & ((1 << 63) - 1) if byteorder == "little" else value >> 1


# ---------------------------------------------------------------- training

def training_step(seed: int, instance_key: str, step: int) -> int:
    """Noise, timesteps and latent samples of one training step of one instance."""
    return _hash63(f"{seed}|{instance_key}|{step}")


def lora_init(seed: int, instance_key: str) -> int:
    """The LoRA's random A matrices, so a rerun starts from the same point."""
    return training_step(seed, instance_key, -1)


def dropout(seed: int, instance_key: str, step: int) -> int:
    """LoRA dropout (torch's global generator, inside isolated_rng) of one step."""
    return training_step(seed, instance_key, step) ^ 1


def photo_order(seed: int, instance_key: str) -> int:
    """The instance photos' per-epoch shuffles (see epoch_order)."""
    return training_step(seed, instance_key, -2) % (1 << 31)


def class_image_order(seed: int) -> int:
    """The prior-preservation class images' per-epoch shuffles (see epoch_order)."""
    return seed + 7


def epoch_order(order_seed: int, epoch: int) -> int:
    """One epoch's shuffle of a photo set, from photo_order or class_image_order."""
    return order_seed * 1_000_003 + epoch


def class_image(seed: int, index: int) -> int:
    """Prior-preservation class image number `index` (drawn once, reused by every instance)."""
    return seed * 100_003 + index


def validation_image(seed: int, index: int) -> int:
    """Validation image number `index`, the same at every checkpoint so they compare."""
    return seed + index


# ---------------------------------------------------------------- generation and evaluation

def candidate(sku: str, index: int, run_seed: int) -> int:
    """A 63-bit seed for one candidate image: the same whatever the order, batch size or process count."""
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise CatalogError(f"candidate index for sku '{sku}' must be a non-negative integer, got {index!r}")
    if not isinstance(run_seed, int) or isinstance(run_seed, bool):
        raise CatalogError(f"run seed must be an integer, got {run_seed!r}")
    return _hash63(json.dumps([run_seed, sku, index]), byteorder="big")


def sku_run_seed(run_seed: int, sheet_seed: int | None, redo_round: int) -> int:
    """The seed a SKU's candidates derive from: its sheet cell, else the run's; shifted per redo round."""
    return (sheet_seed if sheet_seed is not None else run_seed) + redo_round * REDO_SEED_STRIDE


def evaluation_image(seed: int, index: int) -> int:
    """Evaluation image number `index` of a prompt (the same for every checkpoint and adapter)."""
    return seed * 1_000 + index


# ---------------------------------------------------------------- the sample catalogue and the toy world
# These seed Python's random.Random with a string (its seeding hashes the whole string), so a drawing's
# randomness depends only on what is drawn.

def sample_photo(seed: int, class_key: str, instance_key: str, number: int) -> str:
    """One photo of the sample catalogue."""
    return f"{seed}:{class_key}:{instance_key}:{number}"


def sample_garbage(seed: int) -> str:
    """The sample catalogue's deliberately unreadable file."""
    return f"{seed}:garbage"


def sample_skus(seed: int) -> str:
    """The sample SKU sheet's views, settings and metals."""
    return f"{seed}:skus"


def pretraining_step(seed: int, stage: str, step: int) -> int:
    """One step of one toy-world pretraining stage (torch generator)."""
    return _hash63(f"{seed}|{stage}|{step}")


def pretraining_captions(seed: int, stage: str, step: int) -> str:
    """The captions one pretraining step draws (random.Random)."""
    return f"{seed}|{stage}|{step}|captions"


def pretraining_bank_image(seed: int, pairs: bool, index: int) -> str:
    """One image of a pretraining bank (random.Random)."""
    return f"{seed}|bank|{'pairs' if pairs else 'single'}|{index}"


def fresh_photo_set(seed: int, class_key: str, instance_key: str) -> str:
    """The toy proof's fresh photos of a style, never trained on (random.Random)."""
    return f"proof|{seed}|{class_key}|{instance_key}"


# ---------------------------------------------------------------- global generators

@contextmanager
def isolated_rng(seed: int | None = None, cuda: bool = False) -> Iterator[None]:
    """Run code that draws from torch's global generator (seeded if `seed` is given) and restore the
    caller's generator state afterwards: the library never moves a process-global seed."""
    import torch

    devices = [torch.cuda.current_device()] if cuda and torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        yield
