"""The `catalog` command: thin Typer commands over catalog_gen.

Each command parses its options into a config object, calls one library function, and
prints the result. Only this layer turns a CatalogError into a message and an exit code.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from catalog_gen import layout
from catalog_gen.config import METHODS
from catalog_gen.errors import CatalogError

# rich_markup_mode=None: help text is shown as written ("[eval]" in a recipe's help is a TOML section, not markup).
app = typer.Typer(help="catalog-gen: product photos in, on-style catalogue images out.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"catalog-gen {version('catalog-gen')}")
        except PackageNotFoundError:
            typer.echo("catalog-gen (not installed as a package)")
        raise typer.Exit()


@app.callback()
def main_options(
    show_version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print the version and exit.")] = False,
) -> None:
    """catalog-gen: product photos in, on-style catalogue images out."""

EXIT_BAD_INPUT = 2
EXIT_PARTIAL = 3


def _quiet_libraries() -> None:
    # Offline by construction: a hub lookup must fail fast instead of hanging on the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def handles_errors(command):
    """Map the library's CatalogError to a one-line message and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            return command(*args, **kwargs)
        except CatalogError as error:
            typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except OSError as error:  # a path that is a file where a folder is wanted, a read-only disk, ...
            where = f"{error.filename}: " if error.filename else ""
            why = error.strerror or str(error)
            if isinstance(error, (FileExistsError, NotADirectoryError)):  # mkdir over a file, or a file as parent
                why = "a file is in the way where a folder is needed (give a folder path)"
            typer.secho(f"error: {where}{why}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return wrapper


Workdir = Annotated[Path, typer.Option("--workdir", "-w", help="Where datasets, adapters and runs are kept.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output (results and errors are still printed). "
                                     "When stderr is not a terminal, progress is written as plain log lines.")]
ClassMapOpt = Annotated[str, typer.Option("--class-map", help="Built-in class map name or path to a .toml file.")]


@app.command("sample-data")
@handles_errors
def sample_data(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the sample catalogue into.")],
    seed: Annotated[int, typer.Option(help="Drawing seed.")] = 0,
) -> None:
    """Write a procedurally drawn jewelry catalogue (photos, products.csv, skus.csv)."""
    from catalog_gen.catalog.sample_data import write_sample_catalogue

    catalogue = write_sample_catalogue(out_dir, seed=seed)
    typer.echo(f"wrote sample catalogue to {catalogue.root}")
    typer.echo(f"  products: {catalogue.products_csv}\n  skus:     {catalogue.skus_csv}")
    for name, what in catalogue.odd_files.items():
        typer.echo(f"  odd file {name}: {what}")


@app.command("taxonomy")
@handles_errors
def taxonomy_command(
    photos: Annotated[Optional[Path], typer.Option("--photos", help="Folder laid out <class>/<instance>/*.jpg, or the folder --products paths are relative to.")] = None,
    products: Annotated[Optional[Path], typer.Option("--products", help="products.csv: sku,title,image.")] = None,
    class_map: ClassMapOpt = "jewelry",
    min_photos: Annotated[Optional[int], typer.Option(help="Minimum photos per instance.")] = None,
) -> None:
    """Assign product photos to class / instance sets and print the table."""
    from catalog_gen.report_text import taxonomy_lines
    from catalog_gen.train.workflow import PhotoSource, assign_photos

    result = assign_photos(PhotoSource(photos, products, class_map), min_photos)
    for line in taxonomy_lines(result):
        typer.echo(line)


@app.command("train")
@handles_errors
def train(
    class_key: Annotated[str, typer.Option("--class", help="Product class to train, e.g. hoops.")],
    instance: Annotated[Optional[list[str]], typer.Option("--instance", help="Only these instances (repeatable).")] = None,
    photos: Annotated[Optional[Path], typer.Option("--photos", help="Folder laid out <class>/<instance>/*.jpg, or the folder --products paths are relative to.")] = None,
    products: Annotated[Optional[Path], typer.Option("--products", help="products.csv: sku,title,image.")] = None,
    workdir: Workdir = Path("catalog-work"),
    class_map: ClassMapOpt = "jewelry",
    recipe: Annotated[Optional[str], typer.Option(help="TOML recipe path or built-in name (pipelines/).")] = None,
    base_model: Annotated[Optional[str], typer.Option("--base-model", help="Preset, local folder or cached hub id (default: the recipe's, else tiny).")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help=f"{' | '.join(METHODS)} (default: the recipe's, else dreambooth-lora).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps per instance (default: the recipe's, else 200).")] = None,
    resolution: Annotated[Optional[int], typer.Option(help="Training resolution in pixels (default: the recipe's, else the base model's native size: 512 for SD 1.5, 64 for tiny and toy).")] = None,
    learning_rate: Annotated[Optional[float], typer.Option("--learning-rate", help="LoRA learning rate.")] = None,
    lora_rank: Annotated[Optional[int], typer.Option("--lora-rank", help="LoRA rank (recipe key lora_rank).")] = None,
    prior_preservation: Annotated[Optional[bool], typer.Option("--prior-preservation/--no-prior-preservation")] = None,
    mixed_precision: Annotated[Optional[str], typer.Option("--mixed-precision", help="auto | no | fp16 | bf16 (default auto: fp16 on a CUDA GPU, no on a CPU).")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="auto | adamw8bit | adamw | prodigy (default auto: adamw8bit on a CUDA GPU, adamw on a CPU; prodigy wants --learning-rate 1.0).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Training seed.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoints.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Retrain even finished adapters; drops old checkpoints.")] = False,
    token: Annotated[Optional[list[str]], typer.Option("--token", help="INSTANCE=TOKEN: this instance's identifier token, chosen by hand (repeatable; checked like a picked one). The class map's `token = ...` does the same. For textual-inversion and pivotal, the new token to learn (default <class-instance>); it must not be in the vocabulary.")] = None,
    quiet: Quiet = False,
) -> None:
    """Train one adapter per instance of a class (DreamBooth-LoRA unless --method says otherwise)."""
    from catalog_gen.cli.progress import Bars
    from catalog_gen.config import TrainConfig, build_config, read_recipe
    from catalog_gen.report_text import train_summary_lines
    from catalog_gen.train.workflow import PhotoSource, train_class

    config = build_config(TrainConfig, read_recipe(recipe, "train"), dict(
        method=method, base_model=base_model, steps=steps, resolution=resolution, learning_rate=learning_rate, lora_rank=lora_rank,
        prior_preservation=prior_preservation, mixed_precision=mixed_precision, optimizer=optimizer, seed=seed,
    ), origin=f"recipe {recipe}" if recipe else "options")
    source = PhotoSource(photos, products, class_map)
    chosen = {}
    for item in token or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise CatalogError(f"--token {item!r}: expected INSTANCE=TOKEN, e.g. --token band=zwx")
        chosen[key.strip()] = value.strip()
    bars = Bars(quiet)
    summary = train_class(source, class_key, instance or [], workdir, config, resume=resume, force=force,
                          progress=bars.training(config.steps), steps_progress=bars.counter("image"),
                          chosen_tokens=chosen)
    for line in train_summary_lines(summary):
        typer.echo(line)
    if summary.failed:
        raise typer.Exit(EXIT_PARTIAL)


@app.command("generate")
@handles_errors
def generate(
    skus: Annotated[Path, typer.Option("--skus", help="SKU sheet (CSV or Parquet): sku,class,instance[,n_images,seed,...].")],
    workdir: Workdir = Path("catalog-work"),
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Run folder (default WORKDIR/runs/<sheet>-<date>).")] = None,
    class_map: ClassMapOpt = "jewelry",
    recipe: Annotated[Optional[str], typer.Option(help="TOML recipe path or built-in name (pipelines/).")] = None,
    base_model: Annotated[Optional[str], typer.Option("--base-model", help="Preset, local folder or cached hub id (default: the recipe's, else tiny). Without a recipe the image size is the model's native one and the gates use its own CLIP and DINO (toy-clip for toy, openai/clip-vit-base-patch32 and facebook/dino-vits16 for a real model).")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="ddpm | ddim | pndm | lms | euler | dpm++")] = None,
    inference_steps: Annotated[Optional[int], typer.Option("--inference-steps", help="Denoising steps per image (recipe key inference_steps; --steps is training's, on train).")] = None,
    n_images: Annotated[Optional[int], typer.Option("--n-images", help="Images kept per SKU (k).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Run seed.")] = None,
    base_images: Annotated[Optional[int], typer.Option("--base-images", help="Per SKU, also draw this many images with the base model alone (same prompts and seeds as the first candidates) for the report.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo the whole run folder.")] = False,
    redo_rejected: Annotated[Optional[Path], typer.Option("--redo-rejected", help="Reviewed earlier run: regenerate only its rejected SKUs, with new seeds.")] = None,
    allow_base_mismatch: Annotated[bool, typer.Option("--allow-base-mismatch", help="Apply adapters trained on another base model (recorded per image in the manifest).")] = False,
    quiet: Quiet = False,
) -> None:
    """Generate gated, on-style images for every SKU of a sheet (resumable: rerun to finish)."""
    import time

    from catalog_gen.config import GenerateConfig, build_config, read_recipe
    from catalog_gen.generate.generation import GenerationRequest, generate as run_generation
    from catalog_gen.cli.progress import Bars
    from catalog_gen.report_text import generation_summary_lines

    config = build_config(GenerateConfig, read_recipe(recipe, "generate"), dict(
        base_model=base_model, scheduler=scheduler, inference_steps=inference_steps, n_images=n_images, seed=seed,
        base_images=base_images,
        allow_base_mismatch=True if allow_base_mismatch else None,
    ), origin=f"recipe {recipe}" if recipe else "options")
    folder = run_dir or layout.default_run_folder(workdir, skus, time.strftime("%Y%m%d"), redo_rejected)
    request = GenerationRequest(skus, workdir, folder, class_map, read_recipe(recipe, "templates"), force,
                                redo_rejected)
    progress = Bars(quiet).generation()
    try:
        summary = run_generation(request, config, progress=progress)
    finally:
        progress.close()
    for line in generation_summary_lines(summary):
        typer.echo(line)
    if summary.errors:
        raise typer.Exit(EXIT_PARTIAL)


@app.command("export")
@handles_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A reviewed run folder.")],
    approved: Annotated[Path, typer.Option("--approved", help="Destination folder for the approved images.")],
    profile: Annotated[str, typer.Option(help="marketplace (2048 px JPEG) | web (1200 px JPEG) | lossless (2048 px PNG)")] = "marketplace",
    allow_upscale: Annotated[bool, typer.Option("--allow-upscale", help="Export images the profile would enlarge more than 4x (recorded in export.csv).")] = False,
) -> None:
    """Export approved images: square on white, sRGB, generation metadata and an AI-generated marker."""
    from catalog_gen.review.export import export_approved

    written = export_approved(run_dir, approved, profile, allow_upscale)
    typer.echo(f"exported {len(written)} approved image(s) to {approved} (list: {approved / layout.EXPORT_CSV})")


@app.command("eval")
@handles_errors
def eval_command(
    class_key: Annotated[str, typer.Option("--class", help="Class whose adapters to evaluate.")],
    instance: Annotated[Optional[list[str]], typer.Option("--instance", help="Only these instances (repeatable).")] = None,
    workdir: Workdir = Path("catalog-work"),
    class_map: ClassMapOpt = "jewelry",
    recipe: Annotated[Optional[str], typer.Option(help="TOML recipe with an [eval] section (pipelines/eval.toml).")] = None,
    extractor: Annotated[Optional[str], typer.Option(help="KID/FID features: dino | clip | inception (FID Inception-v3)")] = None,
    inception_weights: Annotated[Optional[Path], typer.Option("--inception-weights", help="The FID Inception-v3 weights file (pt_inception-2015-12-05-6726825d.pth); never downloaded.")] = None,
    select_by: Annotated[Optional[str], typer.Option("--select-by", help="Metric that names the best checkpoint.")] = None,
    quiet: Quiet = False,
) -> None:
    """KID / FID / CLIP-I / DINO / CLIP-T for every saved checkpoint of a class's adapters."""
    from catalog_gen.cli.progress import Bars
    from catalog_gen.config import build_config, read_recipe
    from catalog_gen.evaluate.evaluation import EvalConfig, run_eval

    overrides = dict(extractor=extractor, select_by=select_by,
                     inception_weights=str(inception_weights) if inception_weights else None)
    config = build_config(EvalConfig, read_recipe(recipe, "eval"), overrides,
                          origin=f"recipe {recipe}" if recipe else "options")
    out = run_eval(workdir, class_key, instance or [], config, class_map, progress=Bars(quiet).counter("image set"))
    typer.echo((out / layout.EVAL_SUMMARY).read_text())
    typer.echo(f"results: {out / layout.EVAL_TABLE}, plots and {layout.EVAL_SUMMARY} in {out}")


@app.command("sweep")
@handles_errors
def sweep_command(
    class_key: Annotated[str, typer.Option("--class", help="Product class.")],
    instance: Annotated[str, typer.Option("--instance", help="The instance to sweep.")],
    name: Annotated[str, typer.Option(help="Sweep name (its folder under WORKDIR/sweeps/).")],
    photos: Annotated[Optional[Path], typer.Option("--photos", help="Photo folder (see `train`).")] = None,
    products: Annotated[Optional[Path], typer.Option("--products", help="products.csv (see `train`).")] = None,
    workdir: Workdir = Path("catalog-work"),
    class_map: ClassMapOpt = "jewelry",
    recipe: Annotated[Optional[str], typer.Option(help="TOML recipe with [train], [eval] and [sweep] sections.")] = None,
    grid: Annotated[Optional[str], typer.Option(help="Grid, e.g. 'steps=100,200 lora_rank=4,16' (replaces [sweep]).")] = None,
    quiet: Quiet = False,
) -> None:
    """Train and evaluate every point of a grid; rerun to finish an interrupted sweep."""
    from catalog_gen.cli.progress import Bars
    from catalog_gen.config import read_recipe
    from catalog_gen.evaluate.sweep import parse_grid_option, run_sweep
    from catalog_gen.train.workflow import PhotoSource

    train_config, eval_config = _train_and_eval_configs(recipe)
    axes = parse_grid_option(grid) if grid else read_recipe(recipe, "sweep")
    bars = Bars(quiet)
    out = run_sweep(PhotoSource(photos, products, class_map), class_key, instance, workdir, name, axes,
                    train_config, eval_config, progress=bars.training(None), steps_progress=bars.counter("step"))
    if not _is_main_process():  # under accelerate launch one process prints the table
        return
    typer.echo((out / layout.SWEEP_SUMMARY).read_text())
    typer.echo(f"results: {out / layout.SWEEP_TABLE}, plots in {out}")


def _train_and_eval_configs(recipe: str | None):
    """A recipe's [train] and [eval] sections as validated configs (sweep, compare)."""
    from catalog_gen.config import TrainConfig, build_config, read_recipe
    from catalog_gen.evaluate.evaluation import EvalConfig

    origin = f"recipe {recipe}" if recipe else "options"
    return (build_config(TrainConfig, read_recipe(recipe, "train"), {}, origin=origin),
            build_config(EvalConfig, read_recipe(recipe, "eval"), {}, origin=origin))


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


@app.command("compare")
@handles_errors
def compare_command(
    class_key: Annotated[str, typer.Option("--class", help="Product class.")],
    instance: Annotated[str, typer.Option("--instance", help="The instance every method trains on.")],
    methods: Annotated[str, typer.Option("--methods", help=f"Comma-separated, from {', '.join(METHODS)}.")] = ",".join(METHODS),
    photos: Annotated[Optional[Path], typer.Option("--photos", help="Photo folder (see `train`).")] = None,
    products: Annotated[Optional[Path], typer.Option("--products", help="products.csv (see `train`).")] = None,
    workdir: Workdir = Path("catalog-work"),
    class_map: ClassMapOpt = "jewelry",
    recipe: Annotated[Optional[str], typer.Option(help="TOML recipe with [train] and [eval] sections, and [compare.<method>] tables of [train] settings for one method only (e.g. the learning rate of dreambooth).")] = None,
    quiet: Quiet = False,
) -> None:
    """Train each method on the same photos and evaluate them with the same prompts and seeds; rerun to finish."""
    from catalog_gen.cli.progress import Bars
    from catalog_gen.config import read_recipe
    from catalog_gen.evaluate.compare import parse_method_settings, parse_methods, run_compare
    from catalog_gen.train.workflow import PhotoSource

    chosen = parse_methods(methods)
    train_config, eval_config = _train_and_eval_configs(recipe)
    per_method = parse_method_settings(read_recipe(recipe, "compare"), f"recipe {recipe}")
    bars = Bars(quiet)
    out = run_compare(PhotoSource(photos, products, class_map), class_key, instance, workdir, chosen,
                      train_config, eval_config, progress=bars.training(None), steps_progress=bars.counter("step"),
                      method_settings=per_method)
    if not _is_main_process():
        return
    typer.echo((out / layout.COMPARE_SUMMARY).read_text())
    typer.echo(f"table: {out / layout.COMPARE_TABLE}, grid: {out / layout.COMPARE_GRID}")


@app.command("report")
@handles_errors
def report_command(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (catalog generate).")],
    quiet: Quiet = False,
) -> None:
    """Write RUN_DIR/report/index.html: summary, score plots and every candidate per SKU (opens from disk)."""
    from catalog_gen.cli.progress import Bars
    from catalog_gen.review.report import write_report

    result = write_report(run_dir, progress=Bars(quiet).fraction("thumbnails", "image"))
    typer.echo(f"report: {result.index} ({result.skus} SKUs, {result.candidates} candidates; "
               f"thumbnails: {result.thumbs_made} made, {result.thumbs_reused} reused)")


@app.command("review")
@handles_errors
def review_command(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (catalog generate).")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1; 0 picks a free one.")] = 8765,
    reviewer: Annotated[Optional[str], typer.Option(help="Name recorded with each decision (default: your user name).")] = None,
    import_file: Annotated[Optional[Path], typer.Option("--import", help="Apply decisions exported from the report page instead of serving.")] = None,
    quiet: Quiet = False,
) -> None:
    """Review a run in the browser: approve / reject each candidate; decisions are saved in the run folder."""
    from catalog_gen.cli.progress import Bars
    from catalog_gen.review import decisions
    from catalog_gen.review.server import serve

    if import_file is not None:
        result = decisions.import_decisions(run_dir, import_file, reviewer)
        typer.echo(f"imported {result.applied} decision(s) into {run_dir / layout.DECISIONS_PARQUET}"
                   + (f"; {result.skipped_older} older than decisions already there were skipped" if result.skipped_older else ""))
        return
    server = serve(run_dir, port, reviewer, progress=Bars(quiet).fraction("thumbnails", "image"))
    typer.echo(f"reviewing {run_dir}: open {server.url}  (Ctrl-C to stop; decisions are saved as you make them)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped")
    finally:
        server.server_close()


@app.command("demo")
@handles_errors
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="Where the demo writes everything.")] = Path("catalog-demo"),
    class_key: Annotated[str, typer.Option("--class", help="Class to train in the demo.")] = "ring",
    steps: Annotated[Optional[int], typer.Option(help="Training steps per instance (recipe toy_demo: 300).")] = None,
    inference_steps: Annotated[Optional[int], typer.Option("--inference-steps", help="Denoising steps per image (recipe toy_nightly: 100; fewer is faster and rougher).")] = None,
    quiet: Quiet = False,
) -> None:
    """Run the main job on the built-in defaults: sample data -> taxonomy -> train -> generate -> report, on the
    pretrained toy world (a small jewelry model, not Stable Diffusion), on a CPU."""
    from catalog_gen.cli.progress import Bars
    from catalog_gen.config import read_recipe
    from catalog_gen.demo import DEMO_RECIPE, run_demo

    bars = Bars(quiet)
    total_steps = steps or read_recipe(DEMO_RECIPE, "train").get("steps")
    generation = bars.generation()
    try:
        for line in run_demo(workdir, class_key, steps=steps, inference_steps=inference_steps,
                             train_progress=bars.training(total_steps),
                             generate_progress=generation, thumbnail_progress=bars.fraction("thumbnails", "image")):
            generation.close()  # a finished step's bar ends before its lines are printed
            typer.echo(line)
    finally:
        generation.close()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
