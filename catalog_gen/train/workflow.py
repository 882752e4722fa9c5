"""From product photos to trained adapters: the flow behind `catalog taxonomy` and `catalog train`.

WORKDIR layout:
    tokens.json                                   rare token per class/instance (stable)
    datasets/<class>/<instance>/<res>px/          normalised training photos + intake.json
    class_images/<class>/<model>-<res>px/         prior-preservation images, shared per class
    checkpoints/<class>/<instance>/step-NNNNNN/   resumable checkpoints (+ validation images)
    adapters/<class>/<instance>/                  the finished adapter
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from catalog_gen import seeds
from catalog_gen.catalog import captions, intake, taxonomy, tokens
from catalog_gen.train.adapters import finished_adapter, library_versions, write_adapter
from catalog_gen.layout import (CLASS_STAGE_KEY, TRAIN_LOCK, adapter_folder, caption_lora_name, checkpoint_folder,
                                class_images_folder, class_stage_adapter_folder, class_stage_checkpoint_folder,
                                dataset_folder, tokens_file, workdir_of_adapter)
from catalog_gen.train.checkpoints import VALIDATION_DIR, checkpoint_name, list_checkpoints
from catalog_gen.config import TrainConfig
from catalog_gen.errors import CatalogError
from catalog_gen.models.loading import (BaseModel, load_tokenizer, model_fingerprint, native_resolution,
                                       resolve_base_model)
from catalog_gen.storage import atomic_path, exclusive_lock, remove_leftovers

StepsProgress = Callable[[str, int, int], None]
"""progress(label, done, total) for a long step that is not a training loop."""


@dataclass(frozen=True)
class PhotoSource:
    """Where product photos come from.

    Either a folder tree <class>/<instance>/*.jpg (photos_dir alone), or a products CSV
    (sku,title,image[,class,instance]) whose image paths are relative to photos_dir when
    it is given, else to the CSV's own folder.
    """

    photos_dir: Path | None = None
    products_csv: Path | None = None
    class_map: str | Path = "jewelry"

    def __post_init__(self) -> None:
        # Absolute from here on: photo paths are joined onto the root, and a relative root
        # would be joined twice.
        for name in ("photos_dir", "products_csv"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)).expanduser().absolute())
        if self.photos_dir is None and self.products_csv is None:
            raise CatalogError("give a photo source: --photos DIR (laid out <class>/<instance>/) or --products CSV")
        if self.products_csv is not None and Path(self.products_csv).is_dir():
            raise CatalogError(f"products CSV {self.products_csv} is a folder; give the .csv file")
        if self.products_csv is not None and not Path(self.products_csv).is_file():
            raise CatalogError(f"products CSV {self.products_csv} does not exist")
        if self.photos_dir is not None:
            folder = Path(self.photos_dir)
            if folder.is_file():
                raise CatalogError(f"photo folder {folder} is a file; give the folder that holds the photos")
            if not folder.is_dir():
                raise CatalogError(f"photo folder {folder} does not exist")
            if not any(folder.iterdir()):
                raise CatalogError(f"photo folder {folder} is empty")

    @property
    def photo_root(self) -> Path:
        return Path(self.photos_dir) if self.photos_dir is not None else Path(self.products_csv).parent


@dataclass(frozen=True)
class PreparedInstance:
    class_key: str
    instance_key: str
    token: str
    photos: tuple[Path, ...]
    photo_hashes: tuple[str, ...]
    photo_sources: tuple[str, ...]
    refused: tuple[tuple[str, str], ...]
    dataset_dir: Path
    captions: tuple[captions.Caption, ...] = ()
    """lora-captions: each photo's caption (same order as photos)."""
    caption_column: bool = False
    """The captions' first source was a products CSV caption column (what a photo's own caption is)."""


@dataclass
class TrainOutcome:
    key: str
    status: str  # "trained" | "already trained" | "failed" | "skipped"
    detail: str = ""
    adapter_dir: Path | None = None
    steps: int = 0
    seconds: float = 0.0


@dataclass
class TrainSummary:
    outcomes: list[TrainOutcome] = field(default_factory=list)
    skipped: list[taxonomy.Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the user should know that is not a failure (lora-captions: photos captioned by a fallback)."""

    @property
    def failed(self) -> list[TrainOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def assign_photos(source: PhotoSource, min_photos: int | None = None) -> taxonomy.Taxonomy:
    class_map = taxonomy.load_class_map(source.class_map)
    if source.products_csv is None:
        return taxonomy.assign_from_folders(Path(source.photos_dir), class_map, min_photos)
    return taxonomy.assign_from_products(Path(source.products_csv), source.photo_root, class_map, min_photos)


def assign_catalogue_tokens(workdir: Path, class_map: taxonomy.ClassMap, tokenizer,
                            extra_tokens: Mapping[str, str] | None = None) -> dict[str, str]:
    """Tokens for every instance of the catalogue, kept stable in the workdir (layout.tokens_file). Tokens set
    by hand (the class map's `token`, then `extra_tokens` "class/instance" -> token) win over kept ones."""
    path = tokens_file(workdir)
    existing = tokens.load_token_file(path) if path.exists() else {}
    chosen = {f"{c}/{i}": spec.token for c, cls in class_map.classes.items()
              for i, spec in cls.instances.items() if spec.token is not None}
    chosen.update(extra_tokens or {})
    assigned = tokens.assign_tokens(class_map.instance_keys(), tokenizer, existing, chosen=chosen)
    if assigned != existing:
        tokens.save_token_file(path, assigned)
    return assigned


def prepare_instances(source: PhotoSource, class_key: str, instance_keys: Sequence[str], workdir: Path,
                      resolution: int, tokenizer, min_photos: int | None = None,
                      chosen_tokens: Mapping[str, str] | None = None,
                      new_token_vectors: int | None = None,
                      with_captions: bool = False) -> tuple[list[PreparedInstance], list]:
    """Steps 2-4 of training: assign photos, run intake per instance, pick tokens.

    new_token_vectors set (textual inversion, pivotal): each instance's token is a new one, "<class-instance>"
    or the chosen one, checked to be absent from the vocabulary, instead of a rare token from tokens.json.
    with_captions (lora-captions): each photo's caption too, from the sources catalog.captions names."""
    assigned = assign_photos(source, min_photos)
    class_map = assigned.class_map
    class_spec = class_map.get_class(class_key)
    for key in instance_keys:
        class_map.get_instance(class_key, key)
    wanted = list(instance_keys) or list(class_spec.instances)
    for key in chosen_tokens or {}:
        class_map.get_instance(class_key, key)  # an unknown instance is named, not ignored
    if new_token_vectors is None:
        token_of = assign_catalogue_tokens(workdir, class_map, tokenizer,
                                           {f"{class_key}/{key}": token for key, token in (chosen_tokens or {}).items()})
    else:
        token_of = {}
        for key in wanted:
            token = (chosen_tokens or {}).get(key) or tokens.new_token_for(class_key, key)
            tokens.check_new_token(token, tokenizer, new_token_vectors, f"{class_key}/{key}")
            token_of[f"{class_key}/{key}"] = token
        if len(set(token_of.values())) < len(token_of):
            raise CatalogError(f"class '{class_key}': two instances were given the same new token "
                               f"({', '.join(sorted(token_of.values()))})")
    minimum = min_photos or class_map.min_photos
    groups = assigned.groups()
    skipped = [s for s in assigned.skipped if s.kind != "too_few_photos" or s.item.startswith(f"{class_key}/")]
    prepared = []
    for instance_key in wanted:
        photos = groups.get((class_key, instance_key), [])
        if not photos:
            continue  # already reported by the taxonomy (no photos / too few)
        result = intake.intake_photos(photos, source.photo_root, intake.IntakeConfig(resolution=resolution))
        dataset = dataset_folder(workdir, class_key, instance_key, resolution)
        intake.save_training_set(result, dataset)
        refused = tuple((str(r.source), r.reason) for r in result.refused)
        if len(result.accepted) < minimum:
            skipped.append(taxonomy.Skipped(
                item=f"{class_key}/{instance_key}", kind="too_few_photos",
                reason=f"{len(result.accepted)} usable photos after intake, minimum {minimum}"))
            continue
        manifest = json.loads((dataset / "intake.json").read_text())
        sources = tuple(item["source"] for item in manifest["accepted"])
        found = _captions_of(assigned, class_spec, instance_key, sources) if with_captions else ()
        prepared.append(PreparedInstance(
            class_key, instance_key, token_of[f"{class_key}/{instance_key}"],
            tuple(dataset / item["file"] for item in manifest["accepted"]),
            tuple(item["sha256"] for item in manifest["accepted"]), sources, refused, dataset, found,
            assigned.caption_column))
    return prepared, skipped


def _captions_of(assigned: taxonomy.Taxonomy, class_spec, instance_key: str,
                 sources: Sequence[str]) -> tuple[captions.Caption, ...]:
    """Each accepted photo's caption, found by its source photo."""
    by_photo = {str(a.image): a for a in assigned.assignments}
    fallback = class_spec.plain_prompt_for(instance_key)
    return tuple(captions.caption_for(Path(source), by_photo[source].caption, by_photo[source].title, fallback)
                 for source in sources)


def ensure_class_images(components, class_key: str, class_prompt: str, config: TrainConfig, workdir: Path,
                        base_fingerprint: str, steps_progress: StepsProgress | None = None) -> tuple[Path, ...]:
    """Prior-preservation images, drawn once per class and shared by every instance of it.

    Images already on disk are reused; only missing ones are drawn (each from its own seed,
    so an interrupted batch finishes with the same images as an uninterrupted one).
    """
    from catalog_gen.models.sampling import draw, pipeline_from_components

    folder = class_images_folder(workdir, class_key, base_fingerprint, config.resolution)
    wanted = [folder / f"{index:04d}.png" for index in range(config.num_class_images)]
    missing = [path for path in wanted if not path.is_file()]
    if missing:
        pipeline = pipeline_from_components(components)
        image_seeds = [seeds.class_image(config.seed, int(path.stem)) for path in missing]
        label = f"{class_key}: class images"
        for start in range(0, len(missing), 4):
            if steps_progress is not None:
                steps_progress(label, start, len(missing))
            images = draw(pipeline, [class_prompt] * len(missing[start:start + 4]), image_seeds[start:start + 4],
                          steps=config.class_image_steps, resolution=config.resolution)
            for path, image in zip(missing[start:start + 4], images):
                with atomic_path(path) as tmp:
                    image.save(tmp, format="PNG")
        if steps_progress is not None:
            steps_progress(label, len(missing), len(missing))
    return tuple(wanted)


def save_validation_images(components, job, config: TrainConfig, step: int) -> None:
    from catalog_gen.models.sampling import draw, pipeline_from_components

    if not config.validation_images:
        return
    pipeline = pipeline_from_components(components)
    images = draw(pipeline, [job.instance_prompt] * config.validation_images,
                  [seeds.validation_image(config.seed, index) for index in range(config.validation_images)],
                  steps=config.validation_steps, resolution=config.resolution)
    components.unet.train()
    folder = job.checkpoint_dir / checkpoint_name(step) / VALIDATION_DIR
    for index, image in enumerate(images):
        with atomic_path(folder / f"{index:02d}.png") as tmp:
            image.save(tmp, format="PNG")


def train_class(source: PhotoSource, class_key: str, instance_keys: Sequence[str], workdir: Path,
                config: TrainConfig, *, resume: bool = False, force: bool = False,
                progress: Callable | None = None, steps_progress: StepsProgress | None = None,
                chosen_tokens: Mapping[str, str] | None = None, distributed: bool = True) -> TrainSummary:
    """Train one adapter per instance of a class. Finished adapters are kept, failures reported.

    `chosen_tokens` (instance key -> token) sets identifier tokens by hand, over the class map's and the
    workdir's tokens.json; each is checked as a picked one is (one token, not a word, unique).

    `progress(job)` makes each instance's reporter(step, loss, steps_per_second); a reporter may have
    note(text) (told when validation images are drawn) and close(). `steps_progress(label, done, total)`
    reports the other long steps (prior-preservation class images).

    Under `accelerate launch` the instances are shared out between the processes; with
    distributed=False this process trains them all and never waits for the others (a
    sweep gives each process its own grid points instead).
    """

    from accelerate import PartialState

    from catalog_gen.train import methods, training

    state = PartialState(cpu=use_cpu()) if distributed else _ThisProcessOnly(PartialState(cpu=use_cpu()).device)
    workdir = Path(workdir)
    # 1. Resolve the base model (a preset is built once, by the first process).
    with state.main_process_first():
        model = resolve_base_model(config.base_model)
        # Settings left to the model and the device (resolution, optimizer, precision) become values here.
        config = config.resolve_for(native_resolution(model), on_gpu=is_cuda(state.device))
        base_fingerprint = model_fingerprint(model)
        tokenizer = load_tokenizer(model)
        method = methods.method_of(config)
        # 2-4. Photos -> instances -> clean training sets -> rare tokens.
        try:
            prepared, skipped = prepare_instances(
                source, class_key, instance_keys, workdir, config.resolution, tokenizer, config.min_photos,
                chosen_tokens, new_token_vectors=config.embedding_vectors if method.new_tokens else None,
                with_captions=method.captions)
        except tokens.NoBpeMerges as error:
            raise CatalogError(f"base model '{config.base_model}': {error}") from None
    # The other processes redo the intake after the main one and swap the dataset folders;
    # nobody reads them for training until every process is done writing.
    state.wait_for_everyone()
    summary = TrainSummary(skipped=skipped)
    if not prepared:
        raise CatalogError(f"class '{class_key}': no instance has enough usable photos to train "
                           f"({'; '.join(s.item + ': ' + s.reason for s in skipped[:5])})")
    class_spec = taxonomy.load_class_map(source.class_map).get_class(class_key)

    # 5. The frozen base model, once per process.
    components = training.load_components(model, config, state.device)

    # 6. Class images, drawn by the main process once for the whole class.
    class_images: tuple[Path, ...] = ()
    if config.prior_preservation:
        with state.main_process_first():
            class_images = ensure_class_images(components, class_key, class_spec.class_prompt, config, workdir,
                                               base_fingerprint, steps_progress)

    # 6b. two-stage: the class LoRA, on every photo of the class, trained once before any instance.
    class_stage = None
    if method.class_stage:
        everyone = prepared if not instance_keys else prepare_instances(
            source, class_key, [], workdir, config.resolution, tokenizer, config.min_photos, chosen_tokens)[0]
        with state.main_process_first():
            class_stage = ensure_class_stage(components, config, class_spec, everyone, workdir, model,
                                             base_fingerprint, resume=resume, force=force, progress=progress)
            if class_stage.status == "failed":
                raise CatalogError(f"class '{class_key}': the class stage failed: {class_stage.detail}")
        if state.is_main_process:
            summary.outcomes.append(class_stage)

    if config.max_photos is not None:
        prepared = [_first_photos(item, config.max_photos) for item in prepared]

    # 6c. lora-captions: one LoRA over every chosen instance, each photo with its caption; each instance's
    #     adapter folder is then a copy of it.
    if method.captions:
        # Said for the photos it trains on (after max_photos), not for every photo of the instance.
        summary.notes.extend(note for item in prepared for note in captions.fallback_notes(
            f"{class_key}/{item.instance_key}", item.photo_sources, item.captions, item.caption_column))
        with state.main_process_first():
            outcomes = ensure_caption_lora(components, config, class_spec, prepared, workdir, model,
                                           base_fingerprint, class_images, resume=resume, force=force,
                                           progress=progress)
        if state.is_main_process:
            summary.outcomes.extend(outcomes)
        state.wait_for_everyone()
        return summary

    # 7. This process's share of the instances.
    for item in prepared[state.process_index::state.num_processes]:
        job = training.InstanceJob(
            class_key, item.instance_key, item.token,
            class_spec.instance_prompt_for(item.instance_key, item.token), class_spec.class_prompt,
            item.photos, checkpoint_folder(workdir, class_key, item.instance_key), class_images,
            initializer=class_spec.noun, **_stacked_on(class_stage, config))
        fingerprint = training.training_fingerprint(config, job, base_fingerprint, item.photo_hashes)
        folder = adapter_folder(workdir, class_key, item.instance_key)
        try:
            with _instance_lock(job, workdir):
                outcome = _train_or_skip(components, config, job, item, model, base_fingerprint, fingerprint,
                                         folder, resume=resume, force=force, progress=progress)
        except CatalogError as error:
            outcome = TrainOutcome(job.key, "failed", str(error))
        finally:
            training.remove_lora(components)
        summary.outcomes.append(outcome)
    state.wait_for_everyone()
    return summary


def ensure_class_stage(components, config: TrainConfig, class_spec, everyone: Sequence[PreparedInstance], workdir: Path,
                       model: BaseModel, base_fingerprint: str, *, resume: bool, force: bool,
                       progress: Callable | None) -> TrainOutcome:
    """two-stage's first stage: one DreamBooth-LoRA on every photo of every instance of the class, prompted
    with the class prompt (no identifier), in WORKDIR/class_stages/<class>/. Kept while its photos and
    settings stay the same; resumed and forced like an instance."""
    from catalog_gen.train import training

    # The UNet only: the instance stage stacks the class LoRA on its UNet (its own text-encoder LoRA, if any,
    # learns the instance's words alone).
    stage_config = dataclasses.replace(config, method="dreambooth-lora", prior_preservation=False,
                                       train_text_encoder=False, steps=config.class_stage_steps or config.steps)
    item = PreparedInstance(class_spec.key, CLASS_STAGE_KEY, "", tuple(p for i in everyone for p in i.photos),
                            tuple(h for i in everyone for h in i.photo_hashes),
                            tuple(s for i in everyone for s in i.photo_sources), (), workdir)
    job = training.InstanceJob(class_spec.key, CLASS_STAGE_KEY, "", class_spec.class_prompt, class_spec.class_prompt,
                               item.photos, class_stage_checkpoint_folder(workdir, class_spec.key))
    fingerprint = training.training_fingerprint(stage_config, job, base_fingerprint, item.photo_hashes)
    folder = class_stage_adapter_folder(workdir, class_spec.key)
    try:
        with _instance_lock(job, workdir):
            remove_leftovers(folder.parent, prefix=f".{folder.name}.")
            return _train_or_skip(components, stage_config, job, item, model, base_fingerprint, fingerprint, folder,
                                  resume=resume, force=force, progress=progress)
    except CatalogError as error:
        return TrainOutcome(job.key, "failed", str(error))
    finally:
        training.remove_lora(components)


def _first_photos(item: PreparedInstance, count: int) -> PreparedInstance:
    """The instance with its first `count` usable photos only (max_photos)."""
    return dataclasses.replace(item, photos=item.photos[:count], photo_hashes=item.photo_hashes[:count],
                               photo_sources=item.photo_sources[:count], captions=item.captions[:count])


def ensure_caption_lora(components, config: TrainConfig, class_spec, prepared: Sequence[PreparedInstance],
                        workdir: Path, model: BaseModel, base_fingerprint: str, class_images: tuple[Path, ...], *,
                        resume: bool, force: bool, progress: Callable | None) -> list[TrainOutcome]:
    """lora-captions: one LoRA on every photo of the prepared instances, each photo prompted by its own caption,
    in WORKDIR/caption_loras/<class>/<name>/; then each instance's adapter folder as a copy of it, with the
    instance's photos (its gates' references) and its prompt without an identifier. Kept while photos, captions
    and settings stay the same; resumed and forced like an instance."""
    from catalog_gen.layout import CAPTION_LORA_KEY, caption_lora_adapter_folder, caption_lora_checkpoint_folder
    from catalog_gen.train import training
    from catalog_gen.train.adapters import read_adapter, write_shared_lora_copy

    name = caption_lora_name(item.instance_key for item in prepared)
    item = PreparedInstance(class_spec.key, CAPTION_LORA_KEY, "", tuple(p for i in prepared for p in i.photos),
                            tuple(h for i in prepared for h in i.photo_hashes),
                            tuple(s for i in prepared for s in i.photo_sources),
                            tuple(r for i in prepared for r in i.refused), workdir,
                            tuple(c for i in prepared for c in i.captions))
    # Validation images and the record's instance prompt: the class prompt (the LoRA stands for no one instance).
    job = training.InstanceJob(class_spec.key, CAPTION_LORA_KEY, "", class_spec.class_prompt, class_spec.class_prompt,
                               item.photos, caption_lora_checkpoint_folder(workdir, class_spec.key, name),
                               class_images, captions=tuple(c.text for c in item.captions))
    fingerprint = training.training_fingerprint(config, job, base_fingerprint, item.photo_hashes)
    folder = caption_lora_adapter_folder(workdir, class_spec.key, name)
    try:
        with _instance_lock(job, workdir):
            remove_leftovers(folder.parent, prefix=f".{folder.name}.")
            shared = _train_or_skip(components, config, job, item, model, base_fingerprint, fingerprint, folder,
                                    resume=resume, force=force, progress=progress)
    except CatalogError as error:
        shared = TrainOutcome(job.key, "failed", str(error))
    finally:
        training.remove_lora(components)
    outcomes = [dataclasses.replace(shared, key=f"{class_spec.key}/{CAPTION_LORA_KEY} ({name})")]
    if shared.status == "failed":
        return outcomes + [TrainOutcome(f"{class_spec.key}/{i.instance_key}", "failed",
                                        f"its caption LoRA failed: {shared.detail}") for i in prepared]
    lora = read_adapter(folder)
    for instance in prepared:
        key = f"{class_spec.key}/{instance.instance_key}"
        target = adapter_folder(workdir, class_spec.key, instance.instance_key)
        record = {**lora.record, "instance": instance.instance_key,
                  "instance_prompt": class_spec.plain_prompt_for(instance.instance_key), "tokens": [],
                  "photos": [entry for entry in lora.record["photos"] if entry["source"] in instance.photo_sources],
                  "refused_photos": [{"source": s, "reason": r} for s, r in instance.refused],
                  "caption_lora": {"folder": os.path.relpath(folder, workdir), "name": name,
                                   "instances": [i.instance_key for i in prepared],
                                   "weights_sha256": lora.record["weights_sha256"]},
                  "checkpoints_folder": os.path.relpath(job.checkpoint_dir, workdir)}
        current = finished_adapter(target, fingerprint, config.steps)
        if (current is not None and not force and current.record.get("caption_lora") == record["caption_lora"]
                and current.record["photos"] == record["photos"]):
            outcomes.append(TrainOutcome(key, "already trained", adapter_dir=target, steps=shared.steps))
            continue
        remove_leftovers(target.parent, prefix=f".{target.name}.")
        write_shared_lora_copy(target, lora, record)
        outcomes.append(TrainOutcome(key, "trained", f"its share of the caption LoRA {name}", adapter_dir=target,
                                     steps=shared.steps))
    return outcomes


def _stacked_on(class_stage: TrainOutcome | None, config: TrainConfig) -> dict:
    """An instance job's two-stage fields: the class LoRA it trains on top of, its weight and hash."""
    if class_stage is None:
        return {}
    from catalog_gen.train.adapters import read_adapter

    stage = read_adapter(class_stage.adapter_dir)
    return {"stacked_lora": stage.diffusers_file, "stacked_weight": config.class_stage_weight,
            "stacked_sha256": stage.record["weights_sha256"]}


@contextlib.contextmanager
def _instance_lock(job, workdir: Path):
    """Held while one instance trains: a second catalog train of the same instance is refused for it, and,
    holding it, this one removes what a killed run of it left (checkpoint and adapter staging folders)."""
    with exclusive_lock(job.checkpoint_dir / TRAIN_LOCK, timeout=0, busy=(
            f"another catalog train is training {job.key} in {workdir}; wait for it to finish")):
        remove_leftovers(job.checkpoint_dir, keep=(TRAIN_LOCK,))
        remove_leftovers(job.checkpoint_dir / VALIDATION_DIR)
        remove_leftovers(adapter_folder(workdir, job.class_key, job.instance_key).parent,
                         prefix=f".{job.instance_key}.")
        yield


def _train_or_skip(components, config, job, item, model, base_fingerprint, fingerprint, folder, *,
                   resume, force, progress) -> TrainOutcome:
    import shutil

    if force:
        for entry in job.checkpoint_dir.iterdir():  # the lock file stays: another train may be waiting on it
            if entry.name != TRAIN_LOCK:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    elif finished_adapter(folder, fingerprint, config.steps) is not None:
        return TrainOutcome(job.key, "already trained", adapter_dir=folder, steps=config.steps)
    return _train_one(components, config, job, item, model, base_fingerprint, fingerprint, folder,
                      resume=resume, progress=progress)


class _ThisProcessOnly:
    """The slice of accelerate's PartialState that train_class uses, for one process on its own."""

    process_index, num_processes, is_main_process = 0, 1, True

    def __init__(self, device):
        self.device = device

    def main_process_first(self):
        return contextlib.nullcontext()

    def wait_for_everyone(self) -> None:
        pass


def is_cuda(device) -> bool:
    """CUDA is where 8-bit AdamW and fp16 autocast (the "auto" defaults on a GPU) are supported."""
    return getattr(device, "type", str(device)) == "cuda"


def use_cpu() -> bool:
    """CPU processes when there is no GPU or `accelerate launch --cpu` asked for it.

    PartialState() alone does neither: under a multi-process launch on a machine without
    CUDA it finds no backend and every process believes it is alone (each trains every
    instance), and it ignores ACCELERATE_USE_CPU. cpu=True makes it join the gloo group.
    """
    import torch
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def _train_one(components, config, job, item, model: BaseModel, base_fingerprint, fingerprint, folder, *,
               resume, progress) -> TrainOutcome:
    from catalog_gen.train import training

    import torch

    started = time.perf_counter()
    workdir = workdir_of_adapter(folder)
    report = progress(job) if progress is not None else None
    on_cuda = is_cuda(components.device)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(components.device)
    try:
        def on_checkpoint(step: int) -> None:
            if config.validation_images and hasattr(report, "note"):  # the bar would look frozen meanwhile
                report.note(f"drawing {config.validation_images} validation image(s) at step {step}")
            save_validation_images(components, job, config, step)

        result = training.fit(components, config, job, fingerprint, resume=resume, progress=report,
                              on_checkpoint=on_checkpoint)
    finally:
        if report is not None and hasattr(report, "close"):
            report.close()
    record = {
        "class": job.class_key,
        "instance": job.instance_key,
        "method": config.method,
        "token": job.token,
        "tokens": list(result.tokens) or ([job.token] if job.token else []),
        "instance_prompt": job.instance_prompt,
        "class_prompt": job.class_prompt,
        "base_model": {"spec": model.spec, "source": model.source, "path": str(model.path),
                       "family": model.family.name, "prediction_type": model.family.prediction_type,
                       "fingerprint": base_fingerprint},
        "recipe": config.to_dict(),
        "fingerprint": fingerprint,
        "steps": result.state.step,
        "resumed_from_step": result.resumed_from,
        # Photo paths relative to the workdir, so a workdir can be moved or used from another folder.
        "photos": [{"file": os.path.relpath(p, workdir), "source": src, "sha256": h,
                    **({"caption": item.captions[n].text, "caption_source": item.captions[n].source}
                       if item.captions else {})}
                   for n, (p, src, h) in enumerate(zip(item.photos, item.photo_sources, item.photo_hashes))],
        "refused_photos": [{"source": s, "reason": r} for s, r in item.refused],
        **({"class_stage": {"folder": os.path.relpath(job.stacked_lora.parent, workdir),
                            "weights_sha256": job.stacked_sha256, "weight": job.stacked_weight}}
           if job.stacked_lora is not None else {}),
        "class_images": len(job.class_images),
        "loss_curve": result.state.losses,
        "timings": {"train_seconds": round(result.state.seconds, 3),
                    "steps_per_second_last_session": round(result.steps_per_second, 3),
                    # CUDA's allocator counts this run's peak; on a CPU there is no per-run figure to record.
                    "peak_cuda_memory_bytes": torch.cuda.max_memory_allocated(components.device) if on_cuda else None},
        "checkpoints": [path.name for _, path in list_checkpoints(job.checkpoint_dir)],
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_adapter(folder, result, record, job.class_key, job.instance_key)
    return TrainOutcome(job.key, "trained", adapter_dir=folder, steps=result.state.step,
                        seconds=time.perf_counter() - started)
