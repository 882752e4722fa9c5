"""The nightly batch generator: a SKU sheet in, gated on-style product images out.

What it writes into the run folder (names: layout.py): the resolved settings (a rerun must match
them); the sheet rows refused, with line numbers and reasons; every candidate's image with its
generation parameters in PNG text chunks; with base_images > 0, the base model alone (no adapter)
drawn with candidate n's prompt and seed, for the report (not scored, not in the manifest, not
redrawn on a rerun); per finished SKU its manifest rows, written last as the SKU's commit marker so a
crash redoes only unfinished SKUs; and at the end the merged manifest of every candidate.

Over 500 lines on purpose: the run's numbered steps and the per-instance loop of shared batches
(draw, score, keep, write) read top to bottom in one file; the pure parts live beside it
(planner.py, redo.py, manifest.py, skus.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from catalog_gen import layout, seeds
from catalog_gen.generate import skus
from catalog_gen.quality import gates
from catalog_gen.train.adapters import adapter_weights, attach, detach, read_adapter
from catalog_gen.generate import manifest
from catalog_gen.generate.planner import SkuState, Slot, candidates_wanted, plan_batch
from catalog_gen.generate.redo import next_redo_round, rejected_in
from catalog_gen.layout import adapter_folder
from catalog_gen.config import GenerateConfig
from catalog_gen.errors import CatalogError
from catalog_gen.storage import atomic_path, atomic_write_json, remove_leftovers

"""RUN_DIR/base/<safe sku>/<n>.png: the base model's image for candidate n's prompt and seed."""


@dataclass(frozen=True)
class GenerationRequest:
    skus: Path
    workdir: Path
    run_dir: Path
    class_map: str | Path = "jewelry"
    templates: Mapping[str, str] = field(default_factory=dict)
    """Per-class prompt templates (recipe [templates]); config.template otherwise."""
    force: bool = False
    redo_rejected: Path | None = None
    """A reviewed earlier run: only the SKUs rejected there are generated, with new seeds."""


@dataclass
class GenerationSummary:
    run_dir: Path
    skus_total: int = 0
    skus_done: int = 0
    skus_already_done: int = 0
    candidates: int = 0
    passed: int = 0
    kept: int = 0
    failed_by_gate: Counter = field(default_factory=Counter)
    rejected_rows: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Context:
    """What every SKU of a run shares: the loaded models and the run's settings."""

    config: GenerateConfig
    run_dir: Path
    pipeline: object
    clip: object
    dino: object
    references: object
    base_fingerprint: str
    folder_of: dict[str, str]
    redo_round: int = 0


def generate(request: GenerationRequest, config: GenerateConfig, *,
             progress: Callable | None = None) -> GenerationSummary:
    """Run (or finish) a nightly generation; safe to rerun after a crash."""
    from accelerate import PartialState

    from catalog_gen.catalog.class_map import load_class_map
    from catalog_gen.models.loading import default_embedders, model_fingerprint, native_resolution, resolve_base_model
    from catalog_gen.train.workflow import use_cpu

    rows, rejects = skus.read_sku_sheet(Path(request.skus))  # a sheet that cannot be read: said first
    if not layout.is_workdir(request.workdir):  # before anything is written: no run folder for a wrong path
        raise CatalogError(f"workdir {request.workdir} holds no trained adapters (no {layout.ADAPTERS_DIR}/ in it); "
                           f"train first (catalog train --workdir {request.workdir}) or pass the workdir that holds them")
    state = PartialState(cpu=use_cpu())
    started = time.perf_counter()
    run_dir = Path(request.run_dir)
    summary = GenerationSummary(run_dir)
    class_map = load_class_map(request.class_map)

    # 1. Read and check the SKU sheet against the class map, the adapters and this run's base model;
    #    refused rows go to rejects.csv, the rest go on.
    model = resolve_base_model(config.base_model)
    config = config.resolve_for(native_resolution(model), default_embedders(model))  # "auto" -> this model's
    base_fingerprint = model_fingerprint(model)
    rows, more_rejects = skus.validate_rows(
        rows, class_map,
        # Once per instance, not per row: a sheet has many SKUs of each instance.
        adapter_problem=functools.cache(lambda c, i: adapter_problem(request.workdir, c, i, config, base_fingerprint,
                                                                             model.family)),
        template_for=lambda c: request.templates.get(c, config.template))
    rejects = sorted(rejects + more_rejects, key=lambda r: r.line)
    redo_round = 0
    if request.redo_rejected is not None:
        rejected = rejected_in(Path(request.redo_rejected))
        redo_round = next_redo_round(Path(request.redo_rejected), run_dir)
        # Only the rejected SKUs, each drawing as many new images as were rejected.
        rows = [dataclasses.replace(row, n_images=rejected[row.sku]) for row in rows if row.sku in rejected]
    summary.rejected_rows, summary.skus_total = len(rejects), len(rows)

    # 2. One generate per run folder at a time (a night that overlaps the last is refused, not doubled);
    #    the folder belongs to one set of settings; --force starts it over.
    with _run_lock(run_dir, state.is_main_process):
        with state.main_process_first():
            if state.is_main_process:
                _claim_run_dir(run_dir, config, request, redo_round)
                _remove_stale_temporaries(run_dir)
                skus.write_rejects(rejects, run_dir / layout.REJECTS_CSV)
        folder_of = skus.sku_folder_names([row.sku for row in rows])

        # 3. Plan: SKUs grouped by instance, finished ones left alone.
        todo: dict[tuple[str, str], list[skus.SkuRow]] = defaultdict(list)
        for row in rows:
            if manifest.part_finished(run_dir, folder_of[row.sku]):
                summary.skus_already_done += 1
            else:
                todo[(row.class_key, row.instance_key)].append(row)
        groups = sorted(todo.items())[state.process_index::state.num_processes]

        if groups:
            # 4. The base pipeline and the embedders, loaded once.
            context = _load_context(config, request, run_dir, folder_of, state.device, model, base_fingerprint)
            context.redo_round = redo_round
            # 5. Per instance: the base model's comparison images (base_images > 0), then its adapter in;
            #    its SKUs' candidates share UNet batches; adapter out.
            for (class_key, instance_key), group_rows in groups:
                _run_instance(context, class_map.get_class(class_key), instance_key, group_rows, request, summary,
                              progress)
        state.wait_for_everyone()

        # 6. One manifest for the whole run, merged by the main process.
        # A rerun also finishes what a killed run left half written (the Parquet renamed, the CSV not yet).
        unfinished = not (run_dir / layout.MANIFEST_PARQUET).exists() or not (run_dir / layout.MANIFEST_CSV).exists()
        if state.is_main_process and (summary.skus_done or unfinished):
            manifest.merge_manifest(run_dir, [folder_of[row.sku] for row in rows])
        summary.seconds = time.perf_counter() - started
        return summary


def adapter_problem(workdir: Path, class_key: str, instance_key: str, config: GenerateConfig,
                    base_fingerprint: str, family=None) -> str | None:
    """Why an instance's adapter cannot be used by this run (None: it can): missing, unreadable, trained on
    another model family than this run's base (`family`, never allowed), or on another base model (unless the
    recipe allows that)."""
    from catalog_gen.models.family import check_adapter_family

    folder = adapter_folder(workdir, class_key, instance_key)
    if not (folder / layout.ADAPTER_JSON).is_file():
        return f"no trained adapter for {class_key}/{instance_key}; run catalog train --class {class_key}"
    try:
        trained_on = json.loads((folder / layout.ADAPTER_JSON).read_text())["base_model"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"adapter {class_key}/{instance_key}: unreadable {layout.ADAPTER_JSON} ({error})"
    if family is not None:
        try:
            check_adapter_family(trained_on, family, f"adapter {class_key}/{instance_key}", config.base_model)
        except CatalogError as error:
            return str(error)
    if trained_on.get("fingerprint") != base_fingerprint and not config.allow_base_mismatch:
        return (f"adapter {class_key}/{instance_key} was trained on base model {trained_on.get('spec')!r} "
                f"(fingerprint {trained_on.get('fingerprint')}), this run uses {config.base_model!r} (fingerprint "
                f"{base_fingerprint}); retrain it on this base or pass --allow-base-mismatch")
    return None


def use_prompt_noun(prompt: str, token: str, noun: str) -> str:
    """The prompt CLIP-T is measured against: the rare token means nothing to CLIP, so it gives way
    to the class noun (or is dropped when the noun is already in the prompt)."""
    words = prompt.split()
    if token not in words:
        return prompt
    replacement = [] if noun in prompt else [noun]
    out: list[str] = []
    for word in words:
        out.extend(replacement if word == token else [word])
    return " ".join(out)


def _run_lock(run_dir: Path, is_main_process: bool):
    """The run folder's lock, taken by the main process only (its ranks share the folder by design)."""
    from contextlib import nullcontext

    from catalog_gen.storage import exclusive_lock

    if not is_main_process:
        return nullcontext()
    return exclusive_lock(Path(run_dir) / layout.RUN_LOCK, timeout=0, busy=(
        f"another catalog generate is working on {run_dir}; wait for it to finish, or pass another --run-dir"))


def _remove_stale_temporaries(run_dir: Path) -> None:
    """What a killed run left half written: the hidden temporaries of atomic writes (images, parts, the
    manifest). Safe under the run lock: no other generate writes here. The review's decisions files and
    the locks are left alone (a review server may be writing them now)."""
    folders = [run_dir, run_dir / layout.PARTS_DIR]
    for parent in (run_dir / layout.IMAGES_DIR, run_dir / layout.BASE_DIR):
        folders += [child for child in parent.iterdir() if child.is_dir()] if parent.is_dir() else []
    keep = (layout.RUN_LOCK, layout.DECISIONS_LOCK, f".{layout.DECISIONS_PARQUET}", f".{layout.DECISIONS_CSV}")
    for folder in folders:
        remove_leftovers(folder, keep=keep)


def _claim_run_dir(run_dir: Path, config: GenerateConfig, request: GenerationRequest, redo_round: int) -> None:
    settings = {"generate": config.to_dict(), "templates": dict(request.templates),
                "class_map": str(request.class_map), "redo_round": redo_round,
                "redo_rejected": str(request.redo_rejected) if request.redo_rejected else None}
    marker = run_dir / layout.RUN_JSON
    if request.force and run_dir.exists():
        for name in (layout.IMAGES_DIR, layout.BASE_DIR, layout.PARTS_DIR):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in (layout.MANIFEST_PARQUET, layout.MANIFEST_CSV, layout.RUN_JSON):
            (run_dir / name).unlink(missing_ok=True)
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if recorded.get("settings") != json.loads(json.dumps(settings, default=str)):
            raise CatalogError(f"run folder {run_dir} was made with different settings; "
                               "use another --run-dir, or --force to start it over")
        return
    atomic_write_json(marker, {"settings": settings, "skus": str(request.skus), "workdir": str(request.workdir),
                               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _load_context(config: GenerateConfig, request: GenerationRequest, run_dir: Path, folder_of, device, model,
                  base_fingerprint: str) -> _Context:
    from catalog_gen.quality import embedders
    from catalog_gen.models.loading import load_pipeline

    pipeline = load_pipeline(model, device, config.precision)
    from catalog_gen.models.sampling import make_scheduler

    pipeline.scheduler = make_scheduler(config.scheduler, pipeline.scheduler.config)
    clip = embedders.load_clip(config.clip_model, device=str(device), backend=config.embedder_backend)
    dino = embedders.load_dino(config.dino_model, device=str(device), backend=config.embedder_backend)
    references = embedders.ReferenceEmbeddings(layout.embeddings_folder(request.workdir))
    return _Context(config, run_dir, pipeline, clip, dino, references, base_fingerprint, folder_of)


@dataclass(frozen=True)
class _Instance:
    """What every SKU of one instance shares: the adapter (loaded), its template, references and thresholds."""

    class_spec: object
    adapter: object
    template: str
    thresholds: gates.Thresholds
    reference_clip: np.ndarray
    reference_dino: np.ndarray


@dataclass
class _SkuRun:
    """One SKU in flight: its prompts, and the candidates drawn and scored so far (images held until written)."""

    row: skus.SkuRow
    prompt: str
    scoring_prompt: str
    text_embedding: np.ndarray
    state: SkuState
    records: list[dict] = field(default_factory=list)

    def add(self, records: list[dict]) -> None:
        self.records += records
        self.state = dataclasses.replace(self.state, drawn=len(self.records),
                                         passed=sum(record["verdict"].passed for record in self.records))


def _run_instance(context: _Context, class_spec, instance_key: str, rows: Sequence[skus.SkuRow],
                  request: GenerationRequest, summary: GenerationSummary, progress) -> None:
    key = f"{class_spec.key}/{instance_key}"

    def sku_done() -> None:
        if progress is not None:
            progress(summary)

    try:
        instance = _load_instance(context, class_spec, instance_key, request)
    except Exception as error:  # a bad adapter fails its SKUs, never the run
        _record_errors(context, rows, f"adapter {key}: {error}", summary)
        return
    # The base model's comparison images come first: loading the adapter changes the pipeline's UNet.
    rows = _draw_base_images(context, instance, rows, summary, sku_done)
    try:
        attached = attach(context.pipeline, adapter_weights(instance.adapter), "sku_adapter")
    except Exception as error:
        _record_errors(context, rows, f"adapter {key}: {error}", summary)
        return
    try:
        _run_skus(context, instance, rows, summary, sku_done)
    finally:
        # Adapter out, peft layers and new tokens and all: the next instance starts from the pure base model.
        detach(context.pipeline, attached)


def _load_instance(context: _Context, class_spec, instance_key: str, request: GenerationRequest) -> _Instance:
    """The instance's adapter record, references and thresholds; its weights are not on the pipeline yet."""
    adapter = read_adapter(adapter_folder(request.workdir, class_spec.key, instance_key))
    key = f"{class_spec.key}/{instance_key}"
    reference_clip = context.references.get(context.clip, key, adapter.photo_paths).numpy()
    reference_dino = context.references.get(context.dino, key, adapter.photo_paths).numpy()
    thresholds = gates.base_thresholds(context.config)
    if context.config.calibrate:
        thresholds = gates.calibrate(thresholds, reference_clip, reference_dino, context.config.calibration_ratio)
    template = request.templates.get(class_spec.key, context.config.template)
    return _Instance(class_spec, adapter, template, thresholds, reference_clip, reference_dino)


def _draw_base_images(context: _Context, instance: _Instance, rows: Sequence[skus.SkuRow],
                      summary: GenerationSummary, sku_done: Callable[[], None]) -> list[skus.SkuRow]:
    """The base model's images for each SKU's first min(base_images, k) candidates, with the candidates' own
    prompts and seeds, so image n of base/ and of images/ differ only by the adapter. Images already on disk
    are kept (a rerun after a crash draws only what is missing). Returns the rows still to generate: a SKU
    whose base images cannot be drawn or written fails alone, like any other SKU error."""
    if not context.config.base_images:
        return list(rows)
    # 1. The missing images, as the very slots the candidates are drawn from.
    pending = deque(_missing_base_slots(context, instance, rows))
    # 2. Drawn and written one batch at a time, so a crash loses at most one batch.
    failed: dict[str, str] = {}
    while pending:
        slots_of: dict[str, list[Slot]] = defaultdict(list)
        while pending and sum(map(len, slots_of.values())) < context.config.batch_size:
            slot = pending.popleft()
            if slot.sku not in failed:
                slots_of[slot.sku].append(slot)
        images_of, errors = _shared_or_each(slots_of, lambda parts: _draw_parts(context, parts))
        for sku, images in images_of.items():
            try:
                for slot, image in zip(slots_of[sku], images):
                    _save_png(layout.base_image(context.run_dir, context.folder_of[sku], slot.candidate), image,
                              _png_text(context, sku, slot.prompt, slot.seed, adapter=None))
            except Exception as error:  # e.g. a disk that is full: this SKU fails, the night goes on
                errors[sku] = _message(error)
        failed.update(errors)
    # 3. The SKUs that failed are recorded now; the others go on to their fine-tuned candidates.
    for row in rows:
        if row.sku in failed:
            _record_error(context, row, f"base model images: {failed[row.sku]}", summary)
            sku_done()
    return [row for row in rows if row.sku not in failed]


def _missing_base_slots(context: _Context, instance: _Instance, rows: Sequence[skus.SkuRow]) -> list[Slot]:
    slots = []
    for row in rows:
        try:
            prompt = _sku_prompt(instance, row)
        except Exception:  # _start_sku fails this SKU with the same error, where every SKU error is recorded
            continue
        run_seed = _run_seed(context, row)
        slots += [Slot(row.sku, n, seeds.candidate(row.sku, n, run_seed), prompt)
                  for n in range(min(context.config.base_images, _images_wanted(context, row)))
                  if not layout.base_image(context.run_dir, context.folder_of[row.sku], n).is_file()]
    return slots


def _run_skus(context: _Context, instance: _Instance, rows: Sequence[skus.SkuRow], summary: GenerationSummary,
              sku_done: Callable[[], None]) -> None:
    """Every SKU of one instance, the candidates of several SKUs sharing each UNet batch.

    A SKU joins only while the next batch has room, so at most batch_size SKUs are in flight; each
    is written (PNGs, then its part) as soon as it wants no more candidates: a crash loses only those."""
    batch_size = context.config.batch_size
    waiting, active = deque(rows), []
    while True:
        # 1. SKUs join in sheet order while the next batch would not be full.
        while waiting and len(plan_batch([run.state for run in active], batch_size)) < batch_size:
            row = waiting.popleft()
            try:
                active.append(_start_sku(context, instance, row))
            except Exception as error:  # e.g. its prompt: this SKU fails, the others go on
                _record_error(context, row, _message(error), summary)
                sku_done()
        # 2. The next batch (every active SKU wants at least one candidate: empty means all done).
        slots = plan_batch([run.state for run in active], batch_size)
        if not slots:
            return
        # 3. Draw and score it as one; a SKU at fault fails alone.
        runs = {run.row.sku: run for run in active}
        records, errors = _draw_and_score(context, instance, runs, slots)
        for sku, candidates in records.items():
            runs[sku].add(candidates)
        # 4. SKUs that failed or want no more are written now; the rest go on with the next batch.
        done = {run.row.sku for run in active if run.row.sku in errors or candidates_wanted(run.state) == 0}
        finished = [run for run in active if run.row.sku in done]
        active = [run for run in active if run.row.sku not in done]
        for run in finished:
            error = errors.get(run.row.sku)
            if error is None:
                try:
                    _finish_sku(context, instance, run, summary)
                except Exception as failure:  # e.g. a PNG it cannot write: this SKU fails, the night goes on
                    error = _message(failure)
            if error is not None:
                _record_error(context, run.row, error, summary)
            sku_done()


def _start_sku(context: _Context, instance: _Instance, row: skus.SkuRow) -> _SkuRun:
    prompt = _sku_prompt(instance, row)
    scoring_prompt = use_prompt_noun(prompt, instance.adapter.token, instance.class_spec.noun)
    k = _images_wanted(context, row)
    return _SkuRun(row, prompt, scoring_prompt, context.clip.embed_texts([scoring_prompt]).numpy(),
                   SkuState(row.sku, prompt, _run_seed(context, row), k, k + context.config.max_extra))


def _sku_prompt(instance: _Instance, row: skus.SkuRow) -> str:
    class_spec, adapter = instance.class_spec, instance.adapter
    variables = {**row.variables, "token": adapter.token, "instance": class_spec.instances[row.instance_key].name,
                 "noun": class_spec.noun, "instance_prompt": adapter.record["instance_prompt"]}
    return skus.render_prompt(instance.template, variables)


def _run_seed(context: _Context, row: skus.SkuRow) -> int:
    return seeds.sku_run_seed(context.config.seed, row.seed, context.redo_round)


def _images_wanted(context: _Context, row: skus.SkuRow) -> int:
    """k: the sheet's n_images for the row, else the config's."""
    return row.n_images or context.config.n_images


def _draw_and_score(context: _Context, instance: _Instance, runs: Mapping[str, _SkuRun],
                    slots: Sequence[Slot]) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """The slots' candidates by SKU (seed, image, scores, verdict, timings), and the SKUs that failed, with why."""
    slots_of: dict[str, list[Slot]] = defaultdict(list)
    for slot in slots:
        slots_of[slot.sku].append(slot)
    # 1. One draw for the whole batch: a candidate depends only on its prompt and seed, not on its batch.
    started = time.perf_counter()
    images_of, errors = _shared_or_each(slots_of, lambda parts: _draw_parts(context, parts))
    gen_seconds = (time.perf_counter() - started) / len(slots)
    # 2. One embedding pass per embedder for what was drawn; CLIP-T against each SKU's own prompt.
    started = time.perf_counter()
    scores_of, score_errors = _shared_or_each(images_of, lambda parts: _score_parts(context, instance, runs, parts))
    score_seconds = (time.perf_counter() - started) / max(1, sum(map(len, images_of.values())))
    records = {sku: [dict(candidate=slot.candidate, seed=slot.seed, image=image, scores=scores,
                          verdict=gates.decide(scores, instance.thresholds), gen_seconds=gen_seconds,
                          score_seconds=score_seconds)
                     for slot, image, scores in zip(slots_of[sku], images_of[sku], scores_of[sku])]
               for sku in scores_of}
    return records, {**errors, **score_errors}


def _shared_or_each(parts: Mapping[str, list], work: Callable[[Mapping[str, list]], dict]) -> tuple[dict, dict]:
    """work(parts) for all SKUs at once; if that raises, work on each SKU alone, so that only the SKUs
    at fault fail. Returns (results by SKU, error message by SKU)."""
    if not parts:  # every SKU of the batch failed an earlier step
        return {}, {}
    try:
        return work(parts), {}
    except Exception as error:
        if len(parts) == 1:
            return {}, {sku: _message(error) for sku in parts}
    results, errors = {}, {}
    for sku, part in parts.items():
        try:
            results.update(work({sku: part}))
        except Exception as error:
            errors[sku] = _message(error)
    return results, errors


def _split_like(items: Sequence, parts: Mapping[str, list]) -> dict[str, list]:
    """items, one per element of parts' lists in order, cut back into the same parts."""
    if len(items) != sum(map(len, parts.values())):
        raise CatalogError(f"expected {sum(map(len, parts.values()))} results, got {len(items)}")
    out, start = {}, 0
    for sku, part in parts.items():
        out[sku], start = items[start:start + len(part)], start + len(part)
    return out


def _draw_parts(context: _Context, slots_of: Mapping[str, list[Slot]]) -> dict[str, list]:
    slots = [slot for part in slots_of.values() for slot in part]
    return _split_like(_draw(context, [slot.prompt for slot in slots], [slot.seed for slot in slots]), slots_of)


def _score_parts(context: _Context, instance: _Instance, runs: Mapping[str, _SkuRun],
                 images_of: Mapping[str, list]) -> dict[str, list[gates.Scores]]:
    images = [image for part in images_of.values() for image in part]
    clip_of = _split_like(context.clip.embed_images(images).numpy(), images_of)
    dino_of = _split_like(context.dino.embed_images(images).numpy(), images_of)
    return {sku: gates.score_images(part, clip_of[sku], dino_of[sku], runs[sku].text_embedding, instance.reference_clip,
                              instance.reference_dino)
            for sku, part in images_of.items()}


def _finish_sku(context: _Context, instance: _Instance, run: _SkuRun, summary: GenerationSummary) -> None:
    """The SKU's kept choice, its PNGs, then its manifest part (the commit marker: written last)."""
    row, records = run.row, run.records
    verdicts = [(record["candidate"], record["scores"], record["verdict"]) for record in records]
    kept = gates.choose_kept(verdicts, run.state.k)
    folder = context.folder_of[row.sku]
    rows_out = []
    for record in records:
        path = layout.candidate_image(folder, record["candidate"])
        scores, verdict = record["scores"], record["verdict"]
        text = {**_png_text(context, row.sku, run.prompt, record["seed"], instance.adapter),
                "scores": json.dumps({"clip_i": scores.clip_i, "dino": scores.dino, "clip_t": scores.clip_t}),
                "passed": str(verdict.passed)}
        _save_png(context.run_dir / path, record["image"], text)
        rows_out.append(manifest.candidate_row(
            row, run.prompt, run.scoring_prompt, record, path, record["candidate"] in kept, instance.thresholds,
            instance.adapter.record["base_model"].get("fingerprint"), context.base_fingerprint))
        summary.failed_by_gate.update(verdict.failed_gates)
    manifest.write_part(context.run_dir, folder, rows_out)
    summary.skus_done += 1
    summary.candidates += len(records)
    summary.passed += run.state.passed
    summary.kept += len(kept)


def _message(error: Exception) -> str:
    return str(error) or type(error).__name__


def _draw(context: _Context, prompts, image_seeds):
    from catalog_gen.models.sampling import draw

    config = context.config
    return draw(context.pipeline, prompts, image_seeds, steps=config.inference_steps, resolution=config.resolution,
                guidance=config.guidance, negative_prompt=config.negative_prompt or None,
                batch_size=config.batch_size)


def _score(context: _Context, images, text_embedding, reference_clip, reference_dino) -> list[gates.Scores]:
    """One set of images scored on its own (embedded here, then gates.score_images)."""
    clip = context.clip.embed_images(images).numpy()
    dino = context.dino.embed_images(images).numpy()
    return gates.score_images(images, clip, dino, text_embedding, reference_clip, reference_dino)


def _png_text(context: _Context, sku: str, prompt: str, seed: int, adapter) -> dict[str, str]:
    """The generation parameters every PNG of a run carries; adapter None: drawn by the base model alone."""
    config = context.config
    lora = f", Lora hash: {adapter.weights_hash[:16]}" if adapter is not None else ""
    # A1111-style "parameters" so other tools read it, plus our own keys.
    return {"parameters": f"{prompt}\nNegative prompt: {config.negative_prompt}\nSteps: {config.inference_steps}, "
                          f"Sampler: {config.scheduler}, CFG scale: {config.guidance}, Seed: {seed}, "
                          f"Size: {config.resolution}x{config.resolution}, Model hash: {context.base_fingerprint}{lora}",
            "sku": sku, "prompt": prompt, "seed": str(seed), "base_model": config.base_model,
            "base_model_hash": context.base_fingerprint,
            "adapter_hash": adapter.weights_hash if adapter is not None else "none (base model alone)"}


def _save_png(path: Path, image, text: Mapping[str, str]) -> None:
    """The image written atomically, with "parameters" as a plain tEXt chunk (what A1111 and most tools
    read) and every other key as UTF-8 iTXt."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in {**text, "generator": "catalog-gen"}.items():
        (info.add_text if key == "parameters" else info.add_itxt)(key, value)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def _record_errors(context: _Context, rows: Sequence[skus.SkuRow], message: str, summary: GenerationSummary) -> None:
    for row in rows:
        _record_error(context, row, message, summary)


def _record_error(context: _Context, row: skus.SkuRow, message: str, summary: GenerationSummary) -> None:
    summary.errors.append((row.sku, message))
    manifest.write_part(context.run_dir, context.folder_of[row.sku], [manifest.error_row(row, message)])
