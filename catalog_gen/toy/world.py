"""What the toy world contains: its instances, the ones held out of pretraining, its captions.

Pure: a sample is drawn from a seeded `random.Random`, rendered with the sample drawing engine
(the same code that draws the sample catalogue), and captioned in the class map's own wording,
so prompts built from the class map and the SKU sheet are in the toy world's language.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from catalog_gen.catalog.sample_data import METALS
from catalog_gen.catalog.sample_drawings import render_photo

RESOLUTION = 64
"""Pixels per side of every toy-world image (the toy Stable Diffusion draws at this size)."""
_RENDER = 128  # drawn at twice the size and shrunk like intake shrinks a shop photo

# (class, instance) -> the words the captions use for it. Classes follow class_maps/jewelry.toml.
INSTANCES: dict[tuple[str, str], str] = {
    ("hoops", "beaded"): "beaded", ("hoops", "chunky"): "chunky", ("hoops", "charlotte"): "Charlotte",
    ("hoops", "croissant"): "croissant", ("hoops", "dome"): "dome", ("hoops", "easy_daily"): "easy daily",
    ("hoops", "rectangle"): "rectangle", ("hoops", "special"): "special", ("hoops", "tube"): "tube",
    ("necklace", "chain"): "chain", ("necklace", "charm"): "charm", ("necklace", "pendant"): "pendant",
    ("ring", "band"): "band", ("ring", "bold"): "bold", ("ring", "dome"): "dome", ("ring", "signet"): "signet",
    ("ring", "slim"): "slim", ("ring", "stacker"): "stacker", ("studs", "studs"): "",
}

HELD_OUT: tuple[tuple[str, str], ...] = (("ring", "bold"), ("hoops", "charlotte"), ("necklace", "pendant"))
"""Never drawn for the toy Stable Diffusion: DreamBooth on them has something new to learn. Each
differs from its class by outline and colour (a big gem on top; small hoops lined with stones; a
drop pendant), not only by texture, which a 64 px model cannot resolve (TOY-WORLD-NOTES)."""

CLASS_PHRASES = {"hoops": "a pair of {name}hoops", "necklace": "a {name}necklace", "ring": "a {name}ring",
                 "studs": "a pair of {name}stud earrings"}
"""How captions name each class: the class map's own prompts ("photo of a pair of hoops")."""

VIEWS = ("front view", "three-quarter view", "top view", "side view")
SETTINGS = ("on white marble", "on a linen cloth", "on a wooden tray", "on a velvet bust", "on sand")
"""Words the nightly SKU sheets put in prompts. The drawings have no views or settings to show, so
captions carry them at random: the model learns that they change nothing rather than meeting
them untrained at generation time."""


@dataclass(frozen=True)
class Sample:
    class_key: str
    instance_key: str
    metal: str
    image: Image.Image  # RGB, RESOLUTION px
    alpha: np.ndarray  # (RESOLUTION, RESOLUTION) float32 in [0, 1]: where the object (and shadow) is


def instances(include_held_out: bool) -> list[tuple[str, str]]:
    return [key for key in INSTANCES if include_held_out or key not in HELD_OUT]


def draw_sample(rng: random.Random, choices: list[tuple[str, str]]) -> Sample:
    """One photo of a random product: instance, metal, framing, gems, tint and angle all drawn from rng."""
    class_key, instance_key = rng.choice(choices)
    metal = rng.choice(METALS)
    return render_sample(class_key, instance_key, metal, rng.getrandbits(64), rng.randrange(6))


def render_sample(class_key: str, instance_key: str, metal: str, drawing_seed: int, framing: int,
                  render_size: int = _RENDER) -> Sample:
    """One photo of one object: the same drawing seed draws the same gems, charms, angle and tint.
    render_size 256 draws like the sample catalogue, whose photos intake then shrinks to 64 px."""
    layer, background = render_photo(class_key, instance_key, metal, random.Random(drawing_seed), render_size,
                                     framing)
    photo = Image.alpha_composite(background, layer).convert("RGB")
    image = photo.resize((RESOLUTION, RESOLUTION), Image.Resampling.LANCZOS)
    alpha = np.asarray(layer.getchannel("A").resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX),
                       dtype=np.float32) / 255.0
    return Sample(class_key, instance_key, metal, image, alpha)


def caption(sample: Sample, rng: random.Random, *, p_instance: float, p_metal: float, p_extras: float) -> str:
    """'photo of a pair of beaded hoops in gold, front view' with each part present at random."""
    name = INSTANCES[(sample.class_key, sample.instance_key)]
    named = name and rng.random() < p_instance
    text = "photo of " + CLASS_PHRASES[sample.class_key].format(name=f"{name} " if named else "")
    if rng.random() < p_metal:
        text += f" in {sample.metal}"
    if rng.random() < p_extras:
        text += f", {rng.choice(VIEWS)}"
    if rng.random() < p_extras:
        text += f", {rng.choice(SETTINGS)}"
    return text


def class_prompt(class_key: str, metal: str | None = None) -> str:
    """The plain class prompt (the class map's class_prompt), with a metal if given."""
    text = "photo of " + CLASS_PHRASES[class_key].format(name="")
    return f"{text} in {metal}" if metal else text
