"""Where everything lives: every folder and file name of a workdir and of a run folder.

    WORKDIR/
        tokens.json                      the rare token of every instance, kept stable
        datasets/<class>/<instance>/<px>px/   the cleaned training photos (intake)
        adapters/<class>/<instance>/     adapter.json + LoRA files (lora_files.py names those)
        checkpoints/<class>/<instance>/  step-NNNNNN/ (checkpoints.py)
        class_images/<class>/<base>-<px>/NNNN.png   prior-preservation images, shared by instances
        class_stages/<class>/            two-stage: the class LoRA (adapter/, checkpoints/)
        caption_loras/<class>/<name>/    lora-captions: the LoRA its instances share (its checkpoints in
                                         checkpoints/<class>/caption-lora-<name>/)
        embeddings/                      reference-photo embeddings, cached per embedder
        eval/<class>/                    catalog eval: eval.parquet, summary.md, plots
        sweeps/<name>/                   catalog sweep: sweep.json, points/<id>/result.json, results.*
        runs/<sheet>-<YYYYMMDD>[-redo-<run>]/   catalog generate (the default run folder)

    RUN_DIR/
        run.json            the run's settings (a rerun with other settings is refused)
        rejects.csv         sheet rows refused, with line numbers and reasons
        images/<sku>/<n>.png   candidates;  base/<sku>/<n>.png  the base model's, same prompt and seed
        parts/<sku>.parquet per-SKU manifest rows, the commit marker of a finished SKU
        manifest.parquet, manifest.csv      every candidate, merged at the end of a run
        decisions.parquet, decisions.csv    the reviewers' decisions (catalog review)
        report/index.html   the QA report

    An export folder (catalog export --approved DEST): the images and export.csv.

Nothing else in the library spells these names; it asks this module.
"""

from __future__ import annotations

from pathlib import Path

# ---------------------------------------------------------------- a workdir

TOKENS_JSON = "tokens.json"
DATASETS_DIR = "datasets"
ADAPTERS_DIR = "adapters"
CHECKPOINTS_DIR = "checkpoints"
CLASS_IMAGES_DIR = "class_images"
EMBEDDINGS_DIR = "embeddings"
EVAL_DIR = "eval"
SWEEPS_DIR = "sweeps"
RUNS_DIR = "runs"
SAMPLE_DIR = "sample"
DEMO_RUN = "demo"
ADAPTER_JSON = "adapter.json"


def tokens_file(workdir: Path) -> Path:
    return Path(workdir) / TOKENS_JSON


def dataset_folder(workdir: Path, class_key: str, instance_key: str, resolution: int) -> Path:
    """An instance's photos as intake leaves them, per training resolution."""
    return Path(workdir) / DATASETS_DIR / class_key / instance_key / f"{resolution}px"


def adapter_folder(workdir: Path, class_key: str, instance_key: str) -> Path:
    return Path(workdir) / ADAPTERS_DIR / class_key / instance_key


def class_adapters_folder(workdir: Path, class_key: str) -> Path:
    return Path(workdir) / ADAPTERS_DIR / class_key


def workdir_of_adapter(folder: Path) -> Path:
    """The workdir an adapter folder (WORKDIR/adapters/<class>/<instance>) belongs to."""
    return Path(folder).parents[2]


def checkpoint_folder(workdir: Path, class_key: str, instance_key: str) -> Path:
    return Path(workdir) / CHECKPOINTS_DIR / class_key / instance_key


CLASS_STAGES_DIR = "class_stages"
CLASS_STAGE_KEY = "class-stage"
"""The instance key the class stage trains under (in seeds and file names); not a valid instance key."""


def class_stage_adapter_folder(workdir: Path, class_key: str) -> Path:
    """two-stage: the class LoRA every instance of the class trains on top of (WORKDIR/class_stages/<class>/)."""
    return Path(workdir) / CLASS_STAGES_DIR / class_key / "adapter"


def class_stage_checkpoint_folder(workdir: Path, class_key: str) -> Path:
    return Path(workdir) / CLASS_STAGES_DIR / class_key / "checkpoints"


CAPTION_LORAS_DIR = "caption_loras"
CAPTION_LORA_KEY = "caption-lora"
"""The instance key a lora-captions LoRA trains under (in seeds and outcomes); not a valid instance key."""


def caption_lora_name(instance_keys) -> str:
    """A caption LoRA is named by the instances it learned: "band+signet", or for many a count and a hash, so
    training another set of instances never overwrites one whose adapters point at it."""
    import hashlib

    keys = sorted(instance_keys)
    joined = "+".join(keys)
    if len(joined) <= 60:
        return joined
    return f"{len(keys)}-instances-{hashlib.sha256(joined.encode()).hexdigest()[:10]}"


def caption_lora_adapter_folder(workdir: Path, class_key: str, name: str) -> Path:
    """lora-captions: the one LoRA several instances share (WORKDIR/caption_loras/<class>/<name>/, as deep as
    an instance's adapter folder); each instance's adapter folder holds a copy of its files."""
    return Path(workdir) / CAPTION_LORAS_DIR / class_key / name


def caption_lora_checkpoint_folder(workdir: Path, class_key: str, name: str) -> Path:
    """Beside the instances' checkpoint folders; "-" keeps the name apart from every instance key."""
    return checkpoint_folder(workdir, class_key, f"{CAPTION_LORA_KEY}-{name}")


TRAIN_LOCK = ".train.lock"
"""In an instance's checkpoint folder: held by the catalog train that trains the instance; a second one is
refused for that instance while it runs."""


def class_images_folder(workdir: Path, class_key: str, base_fingerprint: str, resolution: int) -> Path:
    """Prior-preservation images: one set per class, base model and resolution."""
    return Path(workdir) / CLASS_IMAGES_DIR / class_key / f"{base_fingerprint}-{resolution}px"


def embeddings_folder(workdir: Path, variant: str | None = None) -> Path:
    """Reference-photo embeddings; `variant` keeps differently preprocessed caches apart (eval's float-resize)."""
    folder = Path(workdir) / EMBEDDINGS_DIR
    return folder / variant if variant else folder


EVAL_TABLE = "eval.parquet"
EVAL_SUMMARY = "summary.md"
SWEEP_JSON = "sweep.json"
SWEEP_POINTS_DIR = "points"
SWEEP_POINT_RESULT = "result.json"
SWEEP_TABLE = "results.parquet"
SWEEP_SUMMARY = "results.md"
SWEEP_POINT_IMAGES = "images"
COMPARE_TABLE = "compare.parquet"
COMPARE_SUMMARY = "compare.md"
COMPARE_GRID = "grid.png"


def eval_folder(workdir: Path, class_key: str) -> Path:
    return Path(workdir) / EVAL_DIR / class_key


def sweep_folder(workdir: Path, name: str) -> Path:
    return Path(workdir) / SWEEPS_DIR / name


def sweep_point_folder(sweep_dir: Path, point_id: str) -> Path:
    """One grid point: its own workdir (adapter, checkpoints) and, written last, its result."""
    return Path(sweep_dir) / SWEEP_POINTS_DIR / point_id


def sweep_point_images(point_folder: Path, base: bool) -> Path:
    """A grid point's evaluation images: the base model's (same prompts and seeds) or its final adapter's."""
    return Path(point_folder) / SWEEP_POINT_IMAGES / ("base" if base else "final")


def compare_name(class_key: str, instance_key: str) -> str:
    """The sweep `catalog compare` runs (its folder under WORKDIR/sweeps/)."""
    return f"compare-{class_key}-{instance_key}"


def sample_folder(workdir: Path) -> Path:
    return Path(workdir) / SAMPLE_DIR


def runs_folder(workdir: Path) -> Path:
    return Path(workdir) / RUNS_DIR


def default_run_folder(workdir: Path, sheet: Path, day: str, redo_of: Path | None = None) -> Path:
    """WORKDIR/runs/<sheet name>-<YYYYMMDD>, with -redo-<run> for a redo of a reviewed run."""
    redo = f"-redo-{Path(redo_of).name}" if redo_of else ""
    return runs_folder(workdir) / f"{Path(sheet).stem}-{day}{redo}"


def demo_run_folder(workdir: Path) -> Path:
    return runs_folder(workdir) / DEMO_RUN


def workdir_of_run(run_dir: Path) -> Path | None:
    """The workdir of a run folder in the default place (WORKDIR/runs/<run>), else None."""
    run_dir = Path(run_dir).resolve()
    return run_dir.parent.parent if run_dir.parent.name == RUNS_DIR else None


def is_workdir(folder: Path) -> bool:
    return (Path(folder) / ADAPTERS_DIR).is_dir()


# ---------------------------------------------------------------- a run folder

RUN_JSON = "run.json"
REJECTS_CSV = "rejects.csv"
IMAGES_DIR = "images"
BASE_DIR = "base"
PARTS_DIR = "parts"
MANIFEST_PARQUET = "manifest.parquet"
MANIFEST_CSV = "manifest.csv"
DECISIONS_PARQUET = "decisions.parquet"
DECISIONS_CSV = "decisions.csv"
DECISIONS_LOCK = ".decisions.lock"
RUN_LOCK = ".run.lock"
"""Held by the catalog generate that works on the folder; a second one is refused while it runs."""
REPORT_DIR = "report"
REPORT_INDEX = "index.html"
SERVED_ROOTS = (REPORT_DIR, IMAGES_DIR, BASE_DIR)
"""The run folder's subfolders catalog review serves (and nothing else)."""


def candidate_image(sku_folder: str, candidate: int) -> Path:
    """A candidate's image, relative to the run folder (as the manifest's `path` column holds it)."""
    return Path(IMAGES_DIR) / sku_folder / f"{candidate}.png"


def base_image(run_dir: Path, sku_folder: str, candidate: int) -> Path:
    """The base model's image for one candidate's prompt and seed."""
    return Path(run_dir) / BASE_DIR / sku_folder / f"{candidate}.png"


def base_images_folder(run_dir: Path, sku_folder: str) -> Path:
    return Path(run_dir) / BASE_DIR / sku_folder


def part_file(run_dir: Path, sku_folder: str) -> Path:
    return Path(run_dir) / PARTS_DIR / f"{sku_folder}.parquet"


def report_folder(run_dir: Path) -> Path:
    return Path(run_dir) / REPORT_DIR


def report_index(run_dir: Path) -> Path:
    return report_folder(run_dir) / REPORT_INDEX


def report_url_path() -> str:
    """Where catalog review serves the report page."""
    return f"/{REPORT_DIR}/{REPORT_INDEX}"


EXPORT_CSV = "export.csv"
