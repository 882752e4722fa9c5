"""`catalog eval`: how each saved checkpoint of an adapter moved towards the product photos.

For every checkpoint a fixed prompt set is drawn with fixed seeds; the images are compared
with the instance's photos and with the base model's images for the same prompts and
seeds (shared/seeds/000 measured both), by KID and FID on one named feature extractor,
plus CLIP-I, DINO and CLIP-T. Scores from different extractors are not comparable, so the
extractor is named in every row.

WORKDIR/eval/<class>/
    eval.parquet          one row per (instance, checkpoint)
    <metric>.png          each metric against the training step, a line per instance
    summary.md            the table, and the best checkpoint per instance by `select_by`
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from catalog_gen import seeds
from catalog_gen.quality import metrics
from catalog_gen import layout
from catalog_gen.train.adapters import AdapterInfo, AdapterWeights, attach, detach, read_adapter
from catalog_gen.layout import adapter_folder
from catalog_gen.train.checkpoints import list_checkpoints
from catalog_gen.config import AUTO, INFERENCE_PRECISION, check_choice, check_field_types, check_positive, resolve_embedders
from catalog_gen.errors import CatalogError
from catalog_gen.storage import atomic_path, atomic_write_text

EXTRACTORS = ("dino", "clip", "inception")  # KID / FID features; "inception" is the FID Inception-v3

# metric -> True when higher is better
METRICS = {"kid_photos": False, "fid_photos": False, "kid_base": True, "fid_base": True,
           "clip_i": True, "dino": True, "clip_t": True}


@dataclass(frozen=True)
class EvalConfig:
    """What `catalog eval` draws and how it scores."""

    prompts: tuple[str, ...] = ("{instance_prompt}", "{instance_prompt} on white marble",
                                "{instance_prompt}, close-up", "{instance_prompt} on a linen cloth")
    """Prompt templates; {token}, {instance}, {noun} and {instance_prompt} are filled per instance."""
    images_per_prompt: int = 4
    seed: int = 0
    scheduler: str = "dpm++"
    inference_steps: int = 25
    guidance: float = 7.5
    batch_size: int = 4
    precision: str = "auto"
    """Pipeline dtype: auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16 or bf16."""
    extractor: str = "dino"
    """Features for KID / FID: dino, clip or inception (the FID Inception-v3; needs its weights file)."""
    clip_model: str = AUTO
    """CLIP for CLIP-I / CLIP-T; auto: the base model's own (as GenerateConfig.clip_model)."""
    dino_model: str = AUTO
    """DINO; auto: the base model's own (as GenerateConfig.dino_model)."""
    inception_weights: str = ""
    """The FID Inception-v3 weights file (.pth state dict or .safetensors); empty: $CATALOG_GEN_INCEPTION_WEIGHTS,
    then $TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth. Never downloaded."""
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    select_by: str = "kid_photos"
    """The metric that names the best checkpoint."""

    def __post_init__(self) -> None:
        from catalog_gen.models.sampling import SCHEDULERS

        if isinstance(self.prompts, list):  # TOML arrays arrive as lists
            object.__setattr__(self, "prompts", tuple(self.prompts))
        check_field_types(self)
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise CatalogError(f"eval prompts must be non-empty text templates, got {self.prompts!r}")
        check_choice("scheduler", self.scheduler, tuple(SCHEDULERS))
        check_choice("precision", self.precision, INFERENCE_PRECISION)
        check_choice("extractor", self.extractor, EXTRACTORS)
        check_choice("select_by", self.select_by, tuple(METRICS))
        for name in ("images_per_prompt", "inference_steps", "batch_size", "kid_subsets", "kid_subset_size"):
            check_positive(name, getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EvalModels:
    """Loaded once per run: the base pipeline, the two embedders and the KID / FID extractor
    (one of the two, or the FID Inception-v3)."""

    pipeline: Any
    clip: Any
    dino: Any
    references: Any
    extractor: Any


def load_eval_models(base_model: str, config: EvalConfig, workdir: Path, device="cpu") -> EvalModels:
    from catalog_gen.quality import embedders
    from catalog_gen.models.loading import default_embedders, load_pipeline, resolve_base_model
    from catalog_gen.models.sampling import make_scheduler

    inception = None
    if config.extractor == "inception":  # first: a missing weights file is reported before the long loads
        from catalog_gen.quality.inception import load_fid_inception

        inception = load_fid_inception(config.inception_weights, device=str(device))
    model = resolve_base_model(base_model)
    pipeline = load_pipeline(model, device, config.precision)
    pipeline.scheduler = make_scheduler(config.scheduler, pipeline.scheduler.config)
    clip_model, dino_model = resolve_embedders(config.clip_model, config.dino_model, default_embedders(model))
    clip = embedders.load_clip(clip_model, device=str(device))
    dino = embedders.load_dino(dino_model, device=str(device))
    # Every set (photos, base images, checkpoint images) is resized the same way, in floating
    # point: uint8 rounding after a bicubic resize shifts KID / FID (clean-fid's finding).
    for embedder in (clip, dino):
        embedder.transform = dataclasses.replace(embedder.transform, float_resize=True)
    # (The Inception's own transform resizes the same way, to 299 px.)
    extractor = {"dino": dino, "clip": clip}.get(config.extractor, inception)
    # Reference embeddings made this way are cached apart from the gates' ones.
    references = embedders.ReferenceEmbeddings(layout.embeddings_folder(workdir, "float-resize"))
    return EvalModels(pipeline, clip, dino, references, extractor)


def eval_prompts(config: EvalConfig, adapter: AdapterInfo, noun: str, instance_name: str) -> tuple[list[str], list[int]]:
    from catalog_gen.generate.skus import render_prompt

    variables = {"token": adapter.token, "instance": instance_name, "noun": noun,
                 "instance_prompt": adapter.record["instance_prompt"]}
    prompts, image_seeds = [], []
    for template in config.prompts:
        for n in range(config.images_per_prompt):
            prompts.append(render_prompt(template, variables))
            image_seeds.append(seeds.evaluation_image(config.seed, n))
    return prompts, image_seeds


def checkpoint_as_adapter_file(checkpoint: Path, out_dir: Path, adapter: AdapterInfo | None = None) -> Path:
    """A checkpoint's LoRA as a diffusers-format file that plain `load_lora_weights` reads.

    Checkpoints hold raw parameter names (with peft's adapter name, ".default.") and, beside them, the
    LoRA configs they were trained with, so a crashed run's checkpoints convert on their own, through the
    same writer as finished adapters. Checkpoints from before the configs were stored borrow the finished
    adapter file's metadata (`adapter`).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from catalog_gen.train.checkpoints import checkpoint_lora
    from catalog_gen.train.lora_files import DIFFUSERS_WEIGHTS_NAME, save_diffusers_lora

    tensors, configs = checkpoint_lora(checkpoint)
    if configs:
        def layers(prefix: str) -> dict:
            return {name[len(prefix):].replace(".default.", "."): t for name, t in tensors.items()
                    if name.startswith(prefix)}
        return save_diffusers_lora(Path(out_dir), layers("unet."), layers("text_encoder.") or None,
                                   configs["unet"], configs.get("text_encoder"), layers("text_encoder_2.") or None,
                                   configs.get("text_encoder_2"))
    if adapter is None:
        raise CatalogError(f"checkpoint {checkpoint} records no LoRA config (made by an older release); "
                           "convert it with its finished adapter")
    with safe_open(str(adapter.diffusers_file), "pt") as handle:
        metadata = handle.metadata()
    path = Path(out_dir) / DIFFUSERS_WEIGHTS_NAME
    save_file({name.replace(".default.", "."): t for name, t in tensors.items()}, str(path), metadata=metadata)
    return path


def checkpoint_weights(checkpoint: Path, scratch: Path, adapter: AdapterInfo) -> AdapterWeights:
    """What a checkpoint of `adapter`'s run puts on a pipeline: its LoRA as a file in `scratch` (read while
    scratch exists), and its token embeddings for textual inversion and pivotal tuning."""
    from catalog_gen.train.checkpoints import checkpoint_lora
    from catalog_gen.train.embeddings import EMBEDDINGS_KEYS

    lora = checkpoint_as_adapter_file(checkpoint, scratch, adapter) if adapter.has_lora else None
    tensors = checkpoint_lora(checkpoint)[0] if adapter.embeddings_file or adapter.full_parts else {}
    full = {part: {name[len(part) + 1:]: t for name, t in tensors.items() if name.startswith(part + ".")}
            for part in adapter.full_parts}
    stage = adapter.class_stage  # two-stage: the class LoRA the checkpoint trained on top of
    stacked = (stage.diffusers_file, float(adapter.record["class_stage"]["weight"])) if stage is not None else None
    embeddings = tuple(tensors[key] for key in EMBEDDINGS_KEYS if key in tensors) or None
    return AdapterWeights(lora, embeddings, tuple(adapter.tokens), full or None, stacked)


def score_images(models: EvalModels, config: EvalConfig, images, photo_features, base_features, text,
                 reference_clip, reference_dino) -> dict[str, float]:
    """KID / FID against the photos and the base model's images, and the three DreamBooth scores."""
    clip = models.clip.embed_images(images).numpy()
    dino = models.dino.embed_images(images).numpy()
    if config.extractor == "inception":
        features = models.extractor.embed_images(images).numpy()
    else:  # CLIP or DINO: computed just above
        features = dino if config.extractor == "dino" else clip
    size = min(config.kid_subset_size, len(features), len(photo_features), len(base_features))
    with_photos = metrics.kid(photo_features, features, subsets=config.kid_subsets, subset_size=size)
    with_base = metrics.kid(base_features, features, subsets=config.kid_subsets, subset_size=size)
    return {
        "kid_photos": with_photos[0], "kid_photos_std": with_photos[1],
        "fid_photos": metrics.fid(photo_features, features),
        "kid_base": with_base[0], "kid_base_std": with_base[1],
        "fid_base": metrics.fid(base_features, features),
        "clip_i": metrics.clip_i(clip, reference_clip), "dino": metrics.dino(dino, reference_dino),
        "clip_t": metrics.clip_t(clip, np.repeat(text, len(clip), axis=0) if len(text) == 1 else text),
    }


def evaluate_instance(models: EvalModels, config: EvalConfig, workdir: Path, class_spec, instance_key: str,
                      resolution: int | None = None,
                      progress: Callable[[str, int, int], None] | None = None,
                      on_images: Callable[[int, list], None] | None = None,
                      base_row: bool = False) -> list[dict]:
    """One row per saved checkpoint of one instance's adapter; progress(label, done, total) per image set
    drawn (the base model's, then each checkpoint's); on_images(step, images) hears each set (step 0: the
    base model's), for callers that keep them. base_row: the base model's own images are scored too, as a
    first row with step 0 (what fine-tuning is measured against)."""
    import warnings

    from catalog_gen.generate.generation import use_prompt_noun
    from catalog_gen.models.sampling import draw

    adapter = read_adapter(adapter_folder(workdir, class_spec.key, instance_key))
    checkpoints = list_checkpoints(adapter.checkpoint_dir)
    if not checkpoints:
        raise CatalogError(f"{class_spec.key}/{instance_key}: no saved checkpoints to evaluate")
    key = f"{class_spec.key}/{instance_key}"
    resolution = resolution or adapter.record["recipe"]["resolution"]
    prompts, image_seeds = eval_prompts(config, adapter, class_spec.noun, class_spec.instances[instance_key].name)
    photos = adapter.photo_paths
    reference_clip = models.references.get(models.clip, key, photos).numpy()
    reference_dino = models.references.get(models.dino, key, photos).numpy()
    photo_features = models.references.get(models.extractor, key, photos).numpy()  # cached: no recompute for CLIP/DINO
    text = models.clip.embed_texts([use_prompt_noun(p, adapter.token, class_spec.noun) for p in prompts]).numpy()

    def render():
        return draw(models.pipeline, prompts, image_seeds, steps=config.inference_steps, resolution=resolution,
                    guidance=config.guidance, batch_size=config.batch_size)

    label = f"eval {key}"
    if progress is not None:
        progress(label, 0, len(checkpoints) + 1)
    base_images = render()  # the base model, same prompts and seeds
    if on_images is not None:
        on_images(0, base_images)
    base_features = models.extractor.embed_images(base_images).numpy()
    if progress is not None:
        progress(label, 1, len(checkpoints) + 1)
    rows = []

    def add_row(step: int, images) -> None:
        with warnings.catch_warnings():
            # Small catalogues: KID shrinks its subsets and FID's covariance is singular. Both
            # are expected here and recorded in the row (n_photos, n_generated) instead.
            warnings.simplefilter("ignore", UserWarning)
            scores = score_images(models, config, images, photo_features, base_features, text,
                                  reference_clip, reference_dino)
        rows.append({"class": class_spec.key, "instance": instance_key, "step": step, "extractor": config.extractor,
                     "extractor_model": models.extractor.name,
                     "n_generated": len(images), "n_photos": len(photos), **scores})

    if base_row:
        add_row(0, base_images)
    for step, folder in checkpoints:
        with tempfile.TemporaryDirectory() as scratch:
            attached = attach(models.pipeline, checkpoint_weights(folder, Path(scratch), adapter), "eval_checkpoint")
        try:
            images = render()
        finally:
            detach(models.pipeline, attached)
        if on_images is not None:
            on_images(step, images)
        add_row(step, images)
        if progress is not None:
            progress(label, len(rows) + 1 - base_row, len(checkpoints) + 1)
    return rows


def best_checkpoints(rows: Sequence[dict], metric: str) -> dict[str, dict]:
    """Per instance, the row with the best value of `metric` (ties: the earlier step)."""
    higher = METRICS[metric]
    best: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: (r["instance"], r["step"])):
        current = best.get(row["instance"])
        if current is None or (row[metric] > current[metric] if higher else row[metric] < current[metric]):
            best[row["instance"]] = row
    return best


def summary_markdown(rows: Sequence[dict], config: EvalConfig, title: str) -> str:
    columns = ["instance", "step", *METRICS]
    # The extractor's model (for inception: the weights file and its hash) and the resize are named:
    # scores made with another of either are not comparable.
    extractor_models = ", ".join(sorted({str(row["extractor_model"]) for row in rows}))
    lines = [f"# {title}", "",
             f"Extractor for KID/FID: **{config.extractor}** ({extractor_models}), images resized bicubic in "
             "floating point; "
             f"{len(config.prompts)} prompts x {config.images_per_prompt} seeds, {config.scheduler} {config.inference_steps} steps.",
             "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in sorted(rows, key=lambda r: (r["instance"], r["step"])):
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    direction = "higher" if METRICS[config.select_by] else "lower"
    lines += ["", f"Best checkpoint by {config.select_by} ({direction} is better):", ""]
    for instance, row in best_checkpoints(rows, config.select_by).items():
        lines.append(f"- {instance}: step {row['step']} ({config.select_by} = {_cell(row[config.select_by])})")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_metric(rows: Sequence[dict], metric: str, x: str, path: Path, group: str = "instance",
                xlabel: str | None = None) -> Path:
    """A line per group of `metric` against `x`, written atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: matplotlib's process-wide backend is left alone

    figure = Figure(figsize=(5, 3.2), dpi=100)
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    for name in sorted({str(r[group]) for r in rows}):
        points = sorted((r[x], r[metric]) for r in rows if str(r[group]) == name)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    axis.set_xlabel(xlabel or x)
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def run_eval(workdir: Path, class_key: str, instance_keys: Sequence[str], config: EvalConfig,
             class_map: str | Path = "jewelry", progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Evaluate every checkpoint of the class's adapters; return the folder with the results.
    progress(label, done, total): per instance, image sets drawn so far (see evaluate_instance)."""
    import polars as pl

    from catalog_gen.catalog.class_map import load_class_map

    class_spec = load_class_map(class_map).get_class(class_key)
    instances = list(instance_keys) or [k for k in class_spec.instances
                                        if (adapter_folder(workdir, class_key, k) / layout.ADAPTER_JSON).is_file()]
    if not instances:
        raise CatalogError(f"class '{class_key}': no trained adapters in {workdir}; run catalog train first")
    base_model = read_adapter(adapter_folder(workdir, class_key, instances[0])).record["base_model"]["spec"]
    models = load_eval_models(base_model, config, workdir)
    rows = [row for key in instances
            for row in evaluate_instance(models, config, workdir, class_spec, key, progress=progress)]
    out = layout.eval_folder(workdir, class_key)
    with atomic_path(out / layout.EVAL_TABLE) as tmp:
        pl.DataFrame(rows).write_parquet(tmp)
    for metric in METRICS:
        plot_metric(rows, metric, "step", out / f"{metric}.png")
    atomic_write_text(out / layout.EVAL_SUMMARY, summary_markdown(rows, config, f"Evaluation of class {class_key}"))
    return out
