"""`catalog demo`: the main job on the built-in defaults, offline, on a CPU in a few minutes.

    1. draw the sample jewelry catalogue          -> WORKDIR/sample/
    2. assign its photos to class / instance sets  (title rules of class_maps/jewelry.toml)
    3. intake every instance and pick rare tokens  -> WORKDIR/datasets/, WORKDIR/tokens.json
    4. train one LoRA per instance of one class    -> WORKDIR/adapters/<class>/<instance>/
       on the pretrained toy world (`toy`) with pipelines/toy_demo.toml
    5. generate and gate images for the sample skus.csv -> WORKDIR/runs/demo/
       with pipelines/toy_nightly.toml (toy CLIP / DINO; base-model images beside the candidates)
    6. write the QA report of that run             -> WORKDIR/runs/demo/report/index.html

The toy world is a small model the project pretrained on its own procedural jewelry drawings, so the
demo shows real learning on a CPU; it is not Stable Diffusion (catalog_gen/toy/MODEL_CARD.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from catalog_gen import layout
from catalog_gen.config import GenerateConfig, TrainConfig, build_config, read_recipe
from catalog_gen.generate.generation import GenerationRequest, generate
from catalog_gen.report_text import generation_summary_lines, indent, taxonomy_lines, train_summary_lines
from catalog_gen.catalog.sample_data import write_sample_catalogue
from catalog_gen.models.loading import load_tokenizer, native_resolution, resolve_base_model
from catalog_gen.review.report import write_report
from catalog_gen.train.workflow import PhotoSource, assign_photos, prepare_instances, train_class

DEMO_RECIPE = "toy_demo"
DEMO_NIGHTLY = "toy_nightly"


def run_demo(workdir: Path, class_key: str = "ring", steps: int | None = None, *,
             inference_steps: int | None = None,
             train_progress: Callable | None = None, generate_progress: Callable | None = None,
             thumbnail_progress: Callable[[int, int], None] | None = None) -> Iterator[str]:
    """Yield report lines as each step finishes (the caller prints them); the progress callbacks are
    train_class's, generate's and write_report's."""
    workdir = Path(workdir)
    config = build_config(TrainConfig, read_recipe(DEMO_RECIPE, "train"), {"steps": steps}, origin=DEMO_RECIPE)

    yield "1. sample catalogue"
    catalogue = write_sample_catalogue(layout.sample_folder(workdir))
    yield f"   wrote {catalogue.products_csv} and {catalogue.skus_csv}"
    yield from (f"   odd file {name}: {what}" for name, what in catalogue.odd_files.items())

    yield "2. taxonomy (title rules)"
    source = PhotoSource(photos_dir=catalogue.photos_dir, products_csv=catalogue.products_csv)
    yield from indent(taxonomy_lines(assign_photos(source)), "   ")

    yield "3. intake and rare identifier tokens"
    model = resolve_base_model(config.base_model)
    resolution = config.resolution or native_resolution(model)  # train_class resolves the rest for its device
    tokenizer = load_tokenizer(model)
    for class_spec in assign_photos(source).class_map.classes.values():
        prepared, _ = prepare_instances(source, class_spec.key, [], workdir, resolution, tokenizer)
        for item in prepared:
            yield (f"   {item.class_key + '/' + item.instance_key:<20} token '{item.token}'  "
                   f"{len(item.photos)} photos kept, {len(item.refused)} refused")
            yield from (f"      refused {Path(name).name}: {reason}" for name, reason in item.refused)

    yield (f"4. train class '{class_key}' on the toy world ({config.steps} steps per instance; "
           "a small pretrained model, not Stable Diffusion)")
    summary = train_class(source, class_key, [], workdir, config, resume=True, progress=train_progress)
    yield from indent(train_summary_lines(summary), "   ")

    yield "5. nightly generation with quality gates (sample skus.csv; rows without an adapter are rejected)"
    generate_config = build_config(GenerateConfig, read_recipe(DEMO_NIGHTLY, "generate"),
                                   {"inference_steps": inference_steps}, origin=DEMO_NIGHTLY)
    request = GenerationRequest(catalogue.skus_csv, workdir, layout.demo_run_folder(workdir),
                                templates=read_recipe(DEMO_NIGHTLY, "templates"))
    yield from indent(generation_summary_lines(generate(request, generate_config, progress=generate_progress)), "   ")

    yield "6. QA report"
    report = write_report(request.run_dir, progress=thumbnail_progress)
    yield f"   {report.skus} SKUs, {report.candidates} candidates -> {report.index}"
    yield (f"done: adapters in {layout.class_adapters_folder(workdir, class_key)}, "
           f"images in {request.run_dir / layout.IMAGES_DIR}")
    yield f"review: open {report.index} in a browser, or run `catalog review {request.run_dir}` to approve / reject"
