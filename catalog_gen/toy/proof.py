"""Does fine-tuning learn, and do the gates keep what looks like the product? Measured on the toy world.

Every number here comes from the toy world (catalog_gen/toy/MODEL_CARD.md), not from Stable
Diffusion. bench/toy_proof.py prints the tables; tests/test_toy_learning.py asserts the learning
check and shows it fails when learning is broken.

    1. base model   zero-shot class accuracy of the toy CLIP on base-model images from class prompts
    2. embedders    same-instance vs other-instance similarity of the sample photos (ROC AUC);
                    noise and blank images through the calibrated gates
    3. learning     DreamBooth-LoRA on a held-out instance: CLIP-I / DINO / KID of the fine-tuned images
                    against the base model's (same prompts, same seeds) and the real-to-real level
    4. claims       the seed reports' claims, one measured row each (proof_claims.py)
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from catalog_gen import seeds
from catalog_gen.quality import gates, metrics
from catalog_gen.toy import world

TRAIN_RECIPE = "toy_demo"
NIGHTLY_RECIPE = "toy_nightly"


@dataclass
class Toolkit:
    """Loaded once: the toy pipeline (DPM++) and the two toy embedders."""

    pipeline: Any
    clip: Any
    dino: Any
    steps: int
    guidance: float


@dataclass(frozen=True)
class Sampler:
    """How images are drawn: scheduler name, inference steps, guidance."""

    scheduler: str
    steps: int
    guidance: float


def load_toolkit(device: str = "cpu", sampler: Sampler | None = None) -> Toolkit:
    """The toy pipeline and embedders; images are drawn as the toy_nightly recipe draws them, unless
    `sampler` says otherwise (the CI learning check keeps the cheaper sampler its margins were set with)."""
    from catalog_gen.quality import embedders
    from catalog_gen.config import GenerateConfig, build_config, read_recipe
    from catalog_gen.models.loading import load_pipeline, resolve_base_model

    config = build_config(GenerateConfig, read_recipe(NIGHTLY_RECIPE, "generate"), {}, origin=NIGHTLY_RECIPE)
    pipeline = load_pipeline(resolve_base_model(config.base_model), device, config.precision)
    toolkit = Toolkit(pipeline, embedders.load_clip(config.clip_model, device=device),
                      embedders.load_dino(config.dino_model, device=device), config.inference_steps, config.guidance)
    use_sampler(toolkit, sampler or Sampler(config.scheduler, config.inference_steps, config.guidance))
    return toolkit


def use_sampler(toolkit: Toolkit, sampler: Sampler) -> None:
    """Draw the toolkit's next images with this sampler."""
    from catalog_gen.models.sampling import make_scheduler

    toolkit.pipeline.scheduler = make_scheduler(sampler.scheduler, toolkit.pipeline.scheduler.config)
    toolkit.steps, toolkit.guidance = sampler.steps, sampler.guidance


def draw(toolkit: Toolkit, prompts: Sequence[str], seeds: Sequence[int], lora: Path | None = None) -> list:
    """Images for (prompt, seed) pairs from the base model, or with a LoRA file loaded for the duration."""
    from catalog_gen.models.sampling import draw as draw_images

    def run():
        return draw_images(toolkit.pipeline, list(prompts), list(seeds), steps=toolkit.steps,
                           resolution=world.RESOLUTION, guidance=toolkit.guidance, batch_size=16)

    if lora is None:
        return run()
    toolkit.pipeline.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="proof")
    try:
        return run()
    finally:
        toolkit.pipeline.unload_lora_weights()


def fresh_photos(class_key: str, instance_key: str, count: int, seed: int = 1) -> list:
    """New photos of one product style, drawn like the sample catalogue's (256 px, shrunk to 64)."""
    rng = random.Random(seeds.fresh_photo_set(seed, class_key, instance_key))
    return [world.render_sample(class_key, instance_key, world.METALS[n % 3], rng.getrandbits(64), n % 6,
                                render_size=256).image for n in range(count)]


# ---------------------------------------------------------------- 1. the base model

def zero_shot_accuracy(toolkit: Toolkit, images: Sequence, labels: Sequence[str]) -> float:
    """Share of images whose nearest class prompt (toy CLIP, cosine) is their own class."""
    classes = sorted(world.CLASS_PHRASES)
    text = toolkit.clip.embed_texts([world.class_prompt(c) for c in classes]).numpy()
    picked = (toolkit.clip.embed_images(images).numpy() @ text.T).argmax(axis=1)
    return float(np.mean([classes[p] == label for p, label in zip(picked, labels)]))


def base_model_images(toolkit: Toolkit, per_class: int) -> tuple[list, list[str]]:
    images, labels = [], []
    for class_key in sorted(world.CLASS_PHRASES):
        prompts = [world.class_prompt(class_key, world.METALS[n % 3]) for n in range(per_class)]
        images += draw(toolkit, prompts, range(per_class))
        labels += [class_key] * per_class
    return images, labels


# ---------------------------------------------------------------- 2. the embedders and the gates

def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def same_vs_other_auc(embeddings: np.ndarray, groups: Sequence[str],
                      within: Sequence[str] | None = None) -> dict[str, float]:
    """ROC AUC of cosine similarity for same-group pairs against other-group pairs, with both means.

    `within` (e.g. each photo's class) keeps only pairs that share it: a ring against other rings.
    """
    similarity = metrics.pairwise_cosine(embeddings, embeddings)
    groups = np.asarray(groups)
    upper = np.triu(np.ones_like(similarity, dtype=bool), k=1)
    if within is not None:
        within = np.asarray(within)
        upper &= within[:, None] == within[None, :]
    same = (groups[:, None] == groups[None, :]) & upper
    other = (groups[:, None] != groups[None, :]) & upper
    return {"auc": roc_auc(similarity[same], similarity[other]), "same": float(similarity[same].mean()),
            "other": float(similarity[other].mean())}


def gate_verdicts(toolkit: Toolkit, images: Sequence, reference: Sequence, prompt: str) -> list[gates.Verdict]:
    """The nightly gates as `catalog generate` applies them with the toy recipe, calibrated on `reference`."""
    from catalog_gen.config import GenerateConfig, build_config, read_recipe

    config = build_config(GenerateConfig, read_recipe(NIGHTLY_RECIPE, "generate"), {}, origin=NIGHTLY_RECIPE)
    reference_clip = toolkit.clip.embed_images(reference).numpy()
    reference_dino = toolkit.dino.embed_images(reference).numpy()
    thresholds = gates.calibrate(gates.base_thresholds(config), reference_clip, reference_dino,
                                 config.calibration_ratio)
    scores = gates.score_images(images, toolkit.clip.embed_images(images).numpy(), toolkit.dino.embed_images(images).numpy(),
                         toolkit.clip.embed_texts([prompt]).numpy(), reference_clip, reference_dino)
    return [gates.decide(s, thresholds) for s in scores]


def threshold_evidence(toolkit: Toolkit, photos: Sequence, labels: Sequence[str]) -> dict[str, float]:
    """What the toy recipe's two fixed gate thresholds are derived from (pipelines/toy_nightly.toml).

    CLIP-T: the photos' cosine to their own class prompt against other classes' prompts (medians).
    Memorisation: DINO between two different photos of one product (max, median) against a photo and
    its lightly blurred copy (min), the near copy the gate exists to catch.
    """
    from PIL import ImageFilter

    classes = sorted(world.CLASS_PHRASES)
    text = toolkit.clip.embed_texts([world.class_prompt(c) for c in classes]).numpy()
    scores = toolkit.clip.embed_images(photos).numpy() @ text.T
    own = np.array([classes.index(label.split("/")[0]) for label in labels])
    mask = np.zeros_like(scores, dtype=bool)
    mask[np.arange(len(own)), own] = True
    dino = toolkit.dino.embed_images(photos).numpy()
    similarity = metrics.pairwise_cosine(dino, dino)
    groups = np.asarray(labels)
    same = (groups[:, None] == groups[None, :]) & np.triu(np.ones_like(similarity, dtype=bool), k=1)
    blurred = toolkit.dino.embed_images([photo.filter(ImageFilter.GaussianBlur(0.5)) for photo in photos]).numpy()
    evidence = {"clip_t_own_median": float(np.median(scores[mask])),
                "clip_t_other_median": float(np.median(scores[~mask])),
                "dino_same_product_max": float(similarity[same].max()),
                "dino_same_product_median": float(np.median(similarity[same])),
                "dino_blurred_copy_min": float(np.min(np.sum(dino * blurred, axis=1)))}
    evidence["clip_t_midpoint"] = (evidence["clip_t_own_median"] + evidence["clip_t_other_median"]) / 2
    return evidence


def noise_and_blank_images(count: int, seed: int = 0) -> dict[str, list]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    size = (world.RESOLUTION, world.RESOLUTION)
    return {
        "uniform noise": [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)],
        "coloured blobs": [Image.fromarray(np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8))
                           for _ in range(count)],
        "blank white": [Image.new("RGB", size, (255, 255, 255))] * count,
        "blank grey": [Image.new("RGB", size, (128, 128, 128))] * count,
    }


# ---------------------------------------------------------------- 3. learning on a held-out instance

@dataclass(frozen=True)
class Experiment:
    """One DreamBooth-LoRA run on one instance, and the images it is judged by."""

    class_key: str = "ring"
    instance_key: str = "bold"
    overrides: tuple[tuple[str, Any], ...] = ()
    """TrainConfig settings over the toy recipe, e.g. (("steps", 200),)."""
    images: int = 24
    """Images drawn per set (base, fine-tuned, ...), prompts cycling through the three metals."""
    reference_photos: int = 32
    """Fresh photos of the instance (never trained on) for KID and the held-out similarity."""


@dataclass(frozen=True)
class Sets:
    """The image sets of one experiment, as embeddings."""

    clip: dict[str, np.ndarray]
    dino: dict[str, np.ndarray]


def train(experiment: Experiment, root: Path, name: str):
    """Train the experiment's adapter in root/<name>/ (kept: a rerun reuses it) and return its AdapterInfo."""
    from catalog_gen.train.adapters import read_adapter
    from catalog_gen.layout import adapter_folder
    from catalog_gen.config import TrainConfig, build_config, read_recipe
    from catalog_gen.errors import CatalogError
    from catalog_gen.catalog.sample_data import write_sample_catalogue
    from catalog_gen.train.workflow import PhotoSource, train_class

    sample = root / "sample"
    if not (sample / "products.csv").is_file():
        write_sample_catalogue(sample)
    source = PhotoSource(photos_dir=sample / "photos", products_csv=sample / "products.csv")
    config = build_config(TrainConfig, read_recipe(TRAIN_RECIPE, "train"), dict(experiment.overrides),
                          origin=TRAIN_RECIPE)
    config = dataclasses.replace(config, validation_images=0)
    workdir = root / name
    summary = train_class(source, experiment.class_key, [experiment.instance_key], workdir, config, resume=True,
                          distributed=False)
    if summary.failed:
        raise CatalogError(f"proof run {name}: {summary.failed[0].detail}")
    return read_adapter(adapter_folder(workdir, experiment.class_key, experiment.instance_key))


def prompts_for(experiment: Experiment, token: str | None) -> list[str]:
    """The class map's own instance prompt with a metal, with the instance's token or without it (token=None)."""
    from catalog_gen.catalog.class_map import load_class_map

    spec = load_class_map("jewelry").get_class(experiment.class_key)
    template = spec.instance_prompt.replace("{token} ", "" if token is None else "{token} ")
    base = template.format(token=token, instance=spec.instances[experiment.instance_key].name)
    return [f"{base} in {world.METALS[n % 3]}" for n in range(experiment.images)]


def class_prompts(experiment: Experiment) -> list[str]:
    return [world.class_prompt(experiment.class_key, world.METALS[n % 3]) for n in range(experiment.images)]


def embed_sets(toolkit: Toolkit, images: dict[str, Sequence]) -> Sets:
    return Sets({k: toolkit.clip.embed_images(v).numpy() for k, v in images.items()},
                {k: toolkit.dino.embed_images(v).numpy() for k, v in images.items()})


def likeness(sets: Sets, image_set: str, reference: str = "photos") -> dict[str, float]:
    """CLIP-I and DINO as the gates compute them: mean cosine of each image to every reference photo."""
    return {"clip_i": metrics.mean_pairwise_cosine(sets.clip[image_set], sets.clip[reference]),
            "dino": metrics.mean_pairwise_cosine(sets.dino[image_set], sets.dino[reference])}


def real_level(sets: Sets, reference: str = "photos") -> dict[str, float]:
    """The real-to-real level: each reference photo's mean cosine to the others."""
    return {"clip_i": gates.leave_one_out_similarity(sets.clip[reference]),
            "dino": gates.leave_one_out_similarity(sets.dino[reference])}


def kid(sets: Sets, a: str, b: str) -> float:
    """KID between two sets on the toy DINO's features (all of the smaller set in each subset)."""
    x, y = sets.dino[a], sets.dino[b]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # subsets shrink to the smaller set: expected here
        return metrics.kid(x, y, subsets=50, subset_size=min(len(x), len(y)))[0]


def paired_drift(sets: Sets, a: str, b: str) -> float:
    """1 - mean DINO cosine between image n of set a and image n of set b (same prompt, same seed)."""
    x, y = sets.dino[a], sets.dino[b]
    return float(1.0 - np.mean(np.sum(x * y, axis=1)))


def learning_sets(toolkit: Toolkit, experiment: Experiment, adapter, lora: Path | None = None,
                  base: dict | None = None) -> tuple[Sets, dict]:
    """Base and fine-tuned image sets for the experiment; `base` reuses the base model's images."""
    lora = lora or adapter.diffusers_file
    base = base or base_sets(toolkit, experiment, adapter.token)
    seeds = list(range(experiment.images))
    images = {
        **base,
        "tuned": draw(toolkit, prompts_for(experiment, adapter.token), seeds, lora),
        "tuned_no_token": draw(toolkit, prompts_for(experiment, None), seeds, lora),
        "tuned_class": draw(toolkit, class_prompts(experiment), seeds, lora),
        "photos": [open_rgb(path) for path in adapter.photo_paths],
        "fresh": fresh_photos(experiment.class_key, experiment.instance_key, experiment.reference_photos),
    }
    return embed_sets(toolkit, images), {"base": base["base"], "base_class": base["base_class"],
                                         "tuned": images["tuned"]}


def base_sets(toolkit: Toolkit, experiment: Experiment, token: str) -> dict[str, list]:
    """The base model's images for the experiment's prompts and seeds: with the instance's token, without
    it, and for the plain class prompt. Drawn once and shared by every run of a comparison."""
    seeds = list(range(experiment.images))
    return {"base": draw(toolkit, prompts_for(experiment, token), seeds),
            "base_no_token": draw(toolkit, prompts_for(experiment, None), seeds),
            "base_class": draw(toolkit, class_prompts(experiment), seeds)}


def learning_row(sets: Sets) -> dict[str, float]:
    """The learning numbers of one run: likeness to the training photos and to fresh ones, gap closed, KID."""
    base, tuned, real = likeness(sets, "base"), likeness(sets, "tuned"), real_level(sets)
    row: dict[str, float] = {}
    for metric in ("clip_i", "dino"):
        row[f"{metric}_base"], row[f"{metric}_tuned"], row[f"{metric}_real"] = base[metric], tuned[metric], real[metric]
        row[f"{metric}_gap_closed"] = (tuned[metric] - base[metric]) / (real[metric] - base[metric])
        row[f"{metric}_fresh_base"] = likeness(sets, "base", "fresh")[metric]
        row[f"{metric}_fresh_tuned"] = likeness(sets, "tuned", "fresh")[metric]
        row[f"{metric}_no_token"] = likeness(sets, "tuned_no_token")[metric]
        row[f"{metric}_base_no_token"] = likeness(sets, "base_no_token")[metric]
        # What training added to the token's effect: (with - without) after training, minus the same
        # difference in the base model, where the rare word already changes the picture a little.
        row[f"{metric}_token_gain"] = ((row[f"{metric}_tuned"] - row[f"{metric}_no_token"])
                                       - (row[f"{metric}_base"] - row[f"{metric}_base_no_token"]))
    row["kid_photos_base"], row["kid_photos_tuned"] = kid(sets, "fresh", "base"), kid(sets, "fresh", "tuned")
    row["kid_to_base"] = kid(sets, "base", "tuned")
    row["class_drift"] = paired_drift(sets, "base_class", "tuned_class")
    return row


@dataclass(frozen=True)
class LearningMargins:
    """What the learning check demands of a short run; set from measured runs (tests/test_toy_learning.py)."""

    clip_i: float
    dino: float
    token_dino: float | None = None
    """How much training must widen the gap (DINO to the photos) between prompts with the instance's token and
    without it, over the same gap in the base model (row["dino_token_gain"]); None: not checked."""


def learning_failures(row: dict[str, float], margins: LearningMargins) -> list[str]:
    """Why a run did not learn its instance (empty: it did). Each line names the number that fell short."""
    failures = []
    for metric, label in (("clip_i", "CLIP-I"), ("dino", "DINO")):
        gain = row[f"{metric}_tuned"] - row[f"{metric}_base"]
        if not gain >= getattr(margins, metric):
            failures.append(f"{label} to the photos rose {gain:+.3f} over the base model (needs >= "
                            f"{getattr(margins, metric):.3f})")
    token_gain = row["dino_token_gain"]
    if margins.token_dino is not None and not token_gain > margins.token_dino:
        failures.append(f"training moved DINO with the token {token_gain:+.3f} over without it, beyond the base "
                        f"model's own difference (needs > {margins.token_dino:.3f})")
    return failures


def open_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def checkpoint_lora(workdir: Path, adapter, step: int, scratch: Path) -> Path:
    """The adapter's checkpoint at `step` as a diffusers LoRA file (catalog eval's conversion)."""
    from catalog_gen.train.checkpoints import list_checkpoints
    from catalog_gen.evaluate.evaluation import checkpoint_as_adapter_file
    from catalog_gen.layout import checkpoint_folder

    folder = dict(list_checkpoints(checkpoint_folder(workdir, adapter.record["class"],
                                                     adapter.record["instance"])))[step]
    out = scratch / f"step-{step}"
    out.mkdir(parents=True, exist_ok=True)
    return checkpoint_as_adapter_file(folder, out, adapter)


def scratch_folder() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="catalog-toy-proof-")
