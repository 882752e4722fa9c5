"""Generation benchmark: time per image against its floor, batch throughput against a naive loop,
and gate-scoring speed with torch against ONNX Runtime.

    python -m bench.generate_bench                                    # tiny preset, 64 px, every part
    python -m bench.generate_bench --preset sd15-shape --resolution 256 --steps 4 --parts per-image \
        --batch-sizes 1 --warmup 1 --repeats 2
    # on a CUDA GPU (the ONNX rows need onnxruntime-gpu):
    python -m bench.generate_bench --device cuda
    python -m bench.generate_bench --device cuda --preset sd15-shape --resolution 512 --steps 25 --parts per-image

Four measurements, each in its own fresh process, started only once the machine is quiet:

    per-image  catalog_gen.models.sampling.draw() on the pipeline generate() loads (base model, recipe
               scheduler, a LoRA loaded with load_lora_weights) against the floor on identical tensors:
               `steps` x one UNet forward of the CFG batch (latents doubled, the scheduler's timesteps,
               negative + positive text embeddings) + one VAE decode; no scheduler, no guidance
               arithmetic, no text encoding, no conversion to PIL. Target: draw / floor <= 1.10. The
               adapter is random (training's targets and rank): its cost does not depend on its values.
               draw, floor and floor-with-LoRA-disabled run in turns, so drift hits all three alike.
    ours       catalog_gen.generate.generation.generate() on a 40-SKU sheet over 4 trained adapters (10 SKUs each)
               with the recipe's gates, calibration and embedders; cold reference-embedding cache.
    loop       the straightforward loop over the same 40 SKUs: for every SKU load the adapter, embed its
               reference photos, draw and score the candidates with the same settings, seeds and k + M
               rule, save the PNGs, unload the adapter. Target: loop wall / ours wall >= 3. Both load the
               base model and embedders once; wall time includes that, and ours/loop alternate per round.
    scoring    embed_images() of the CLIP and DINO embedders (preprocessing included) on 64 images of
               the generated size and of 512 px, backend torch against onnx, each in blocks of calls.

Before each measurement (and before the untimed adapter training) the script waits, up to
--quiet-wait seconds, until no train_bench runs and the machine is idle, and prints what it found.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from bench.common import pick_device, run_main, run_worker_process
from catalog_gen.config import GenerateConfig, TrainConfig, build_config, read_recipe
from catalog_gen.errors import CatalogError
from catalog_gen.storage import atomic_write_json

PARTS = ("per-image", "throughput", "scoring")
TARGET_RATIO = 1.10
TARGET_SPEEDUP = 3.0
BENCH_CLASS = "ring"
BENCH_INSTANCES = ("band", "bold", "dome", "signet")  # the sample catalogue's first four ring instances
SKUS_PER_INSTANCE = 10
PROMPT = "photo of a sks band ring in gold, front view, on white marble"
SCORING_IMAGES = 64
QUIET_LOAD = 0.5  # 1-minute load average under which the machine counts as quiet
QUIET_BUSY_CORES = 0.25  # or: cores busy over a 10 s window while this bench sat idle


# ----------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.generate_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny",
                        help="base model: a preset (tiny, tiny-sd2, tiny-sdxl, sd15-shape, sdxl-shape, ...) or any "
                             "--base-model spec")
    parser.add_argument("--recipe", default="tiny_nightly", help="generation recipe ([generate] and [templates])")
    parser.add_argument("--resolution", type=int, default=None, help="image side in px (default: the preset's own)")
    parser.add_argument("--steps", type=int, default=None, help="inference steps (default: the recipe's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--batch-sizes", default=None, help="per-image batch sizes (default: 1 and the recipe's)")
    parser.add_argument("--warmup", type=int, default=2, help="per-image and scoring runs left out of the timing")
    parser.add_argument("--repeats", type=int, default=7, help="timed per-image and scoring runs (median reported)")
    parser.add_argument("--lora-rank", type=int, default=4, help="rank of the adapter loaded for per-image")
    parser.add_argument("--train-steps", type=int, default=10, help="training steps of each throughput adapter")
    parser.add_argument("--rounds", type=int, default=1, help="throughput: ours then loop, this many times")
    parser.add_argument("--clip", default="tiny-clip", help="CLIP embedder spec (gates and scoring)")
    parser.add_argument("--dino", default="tiny-dino", help="DINO embedder spec (gates and scoring)")
    parser.add_argument("--quiet-wait", type=int, default=600, help="longest wait (s) for a quiet machine")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement to this JSON file")
    # Internal: how the parent starts one measurement in a child process.
    parser.add_argument("--worker", choices=("per-image", "ours", "loop", "scoring"), help=argparse.SUPPRESS)
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if args.warmup < 1 or args.repeats < 1 or args.rounds < 1:
        parser.error("--warmup, --repeats and --rounds must be >= 1 (the first run pays one-off costs)")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, parse_args, run_worker, run_bench)


# ----------------------------------------------------------------------------- parent process

def run_bench(args: argparse.Namespace, argv: list[str]) -> None:
    # 1. Validate the settings and the device before anything slow happens.
    device = pick_device(args.device)
    config = bench_config(args)
    batch_sizes = _batch_sizes(args.batch_sizes, config.batch_size)
    parts = [part for part in PARTS if part in args.parts.split(",")]
    command = "python -m bench.generate_bench " + shlex.join(argv)
    print(f"command: {command}", flush=True)
    print(f"host: {environment(device)}", flush=True)

    results: dict = {"command": command, "environment": environment(device), "device": device,
                     "config": config.to_dict(), "waits": []}
    with tempfile.TemporaryDirectory(prefix="catalog-gen-genbench-") as tmp:
        workdir = Path(tmp)
        job = {"config": config.to_dict(), "device": device, "warmup": args.warmup, "repeats": args.repeats,
               "batch_sizes": batch_sizes, "lora_rank": args.lora_rank, "recipe": args.recipe,
               "templates": read_recipe(args.recipe, "templates"), "workdir": str(workdir)}
        # 2. Untimed set-up for the throughput part: 4 trained adapters and a 40-row sheet (after any
        #    other benchmark has finished: training would slow it down).
        if "throughput" in parts:
            print(f"set-up: {wait_for_quiet(args.quiet_wait)}", flush=True)
            job.update(prepare_throughput(config, args.train_steps, workdir))
        job_file = workdir / "job.json"
        job_file.write_text(json.dumps(job))

        # 3. One fresh process per measurement, each after the machine has gone quiet.
        def measure(kind: str, index: int = 0) -> dict:
            results["waits"].append(f"{kind}: {wait_for_quiet(args.quiet_wait)}")
            print(results["waits"][-1], flush=True)
            return run_child(kind, argv, job_file, workdir, index)

        if "per-image" in parts:
            results["per-image"] = measure("per-image")
        if "throughput" in parts:
            rounds = []
            for index in range(args.rounds):
                rounds.append({"ours": measure("ours", index), "loop": measure("loop", index)})
            results["throughput"] = rounds
        if "scoring" in parts:
            results["scoring"] = measure("scoring")

    # 4. Report.
    print()
    print(report(results, args))
    if args.json is not None:
        atomic_write_json(args.json, results)


def bench_config(args: argparse.Namespace) -> GenerateConfig:
    from catalog_gen.models.presets import PRESETS

    resolution = args.resolution or (PRESETS[args.preset].resolution if args.preset in PRESETS else 512)
    overrides = {"base_model": args.preset, "resolution": resolution, "inference_steps": args.steps,
                 "clip_model": args.clip, "dino_model": args.dino}
    return build_config(GenerateConfig, read_recipe(args.recipe, "generate"), overrides, origin=args.recipe)


def _batch_sizes(text: str | None, recipe_batch: int) -> list[int]:
    if text is None:
        return sorted({1, recipe_batch})
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError as error:
        raise CatalogError(f"--batch-sizes must be comma-separated integers, got {text!r}") from error
    if any(size < 1 for size in sizes):
        raise CatalogError(f"--batch-sizes must be >= 1, got {text!r}")
    return sizes


def prepare_throughput(config: GenerateConfig, train_steps: int, workdir: Path) -> dict:
    """Train the 4 adapters (tiny_demo recipe, few steps) and write the 40-row SKU sheet."""
    from catalog_gen.catalog.sample_data import write_sample_catalogue
    from catalog_gen.train.workflow import PhotoSource, train_class

    started = time.perf_counter()
    catalogue = write_sample_catalogue(workdir / "catalogue")
    source = PhotoSource(photos_dir=catalogue.photos_dir, products_csv=catalogue.products_csv)
    train = build_config(TrainConfig, read_recipe("tiny_demo", "train"),
                         {"base_model": config.base_model, "resolution": config.resolution, "steps": train_steps,
                          "checkpoint_every": 0, "validation_images": 0}, origin="tiny_demo")
    print(f"set-up: training {len(BENCH_INSTANCES)} adapters ({train_steps} steps each) ...", flush=True)
    summary = train_class(source, BENCH_CLASS, list(BENCH_INSTANCES), workdir, train)
    failed = [o for o in summary.outcomes if o.status != "trained"]
    if failed or len(summary.outcomes) != len(BENCH_INSTANCES):
        raise CatalogError(f"set-up: adapters not trained: {[(o.key, o.status, o.detail) for o in failed]}")
    sheet = workdir / "skus.csv"
    sheet.write_text(sku_sheet(BENCH_INSTANCES, SKUS_PER_INSTANCE))
    print(f"set-up: done in {time.perf_counter() - started:.1f} s (not timed)", flush=True)
    return {"sheet": str(sheet), "train_steps": train_steps}


def sku_sheet(instances, per_instance: int) -> str:
    """per_instance SKUs per instance, rows interleaved across instances as a shop export would be;
    n_images alternates 2 and 1, seed is left to the run seed."""
    views = ("front view", "three-quarter view", "top view", "side view")
    settings = ("on white marble", "on a linen cloth", "on a wooden tray", "on a velvet bust", "on sand")
    metals = ("gold", "silver", "rose gold")
    lines = ["sku,class,instance,n_images,seed,view,setting,metal"]
    for number in range(per_instance):
        for instance in instances:
            lines.append(f"BENCH-{instance.upper()}-{number:02d},{BENCH_CLASS},{instance},{2 - number % 2},,"
                         f"{views[number % 4]},{settings[number % 5]},{metals[number % 3]}")
    return "\n".join(lines) + "\n"


def run_child(kind: str, argv: list[str], job_file: Path, workdir: Path, index: int) -> dict:
    print(f"[{kind}] starting a fresh process ...", flush=True)
    # generate() picks its device through accelerate
    cpu = {"ACCELERATE_USE_CPU": "1"} if json.loads(job_file.read_text())["device"] == "cpu" else {}
    result = run_worker_process("bench.generate_bench", kind, argv, job_file, workdir, str(index), cpu)
    others = _other_benchmarks()
    if others:  # started while this one ran: a quiet start proves nothing then
        result["warning"] = (f"WARNING: [{kind}] train_bench (pids {' '.join(others)}) was running when this "
                             "measurement ended: its timings are inflated")
        print(result["warning"], flush=True)
    return result


def _other_benchmarks() -> list[str]:
    return subprocess.run(["pgrep", "-f", "train_bench"], capture_output=True, text=True).stdout.split()


def wait_for_quiet(limit_s: int, poll_s: float = 10.0) -> str:
    """Wait until no train_bench runs and the machine is idle; give up after limit_s and say so.

    Idle means a 1-minute load average below QUIET_LOAD, or, because that average still holds
    this bench's own previous measurement for a minute or two, fewer than QUIET_BUSY_CORES cores
    busy over a poll_s window in which this bench itself sat idle.
    """
    started = time.monotonic()
    while True:
        others = _other_benchmarks()
        load = os.getloadavg()[0]
        waited = time.monotonic() - started
        if not others and load < QUIET_LOAD:
            return f"quiet after {waited:.0f} s (1-min load {load:.2f}, no train_bench)"
        busy = _busy_cores(poll_s)
        waited = time.monotonic() - started
        if not others and busy is not None and busy < QUIET_BUSY_CORES:
            return (f"quiet after {waited:.0f} s ({busy:.2f} cores busy over {poll_s:.0f} s, no train_bench; "
                    f"1-min load {os.getloadavg()[0]:.2f} still decaying)")
        if waited >= limit_s:
            busy_text = "unknown" if busy is None else f"{busy:.2f}"
            return (f"WARNING: machine NOT quiet after {waited:.0f} s (train_bench pids {' '.join(others) or 'none'}, "
                    f"1-min load {os.getloadavg()[0]:.2f}, {busy_text} cores busy): measured anyway, timings inflated")


def _busy_cores(seconds: float) -> float | None:
    """Cores busy over the next `seconds`, from /proc/stat (None where there is none)."""
    def snapshot():
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total
    try:
        idle0, total0 = snapshot()
        time.sleep(seconds)
        idle1, total1 = snapshot()
    except OSError:
        time.sleep(seconds)
        return None
    return (1 - (idle1 - idle0) / max(1, total1 - total0)) * (os.cpu_count() or 1)


def environment(device: str) -> str:
    import diffusers
    import onnxruntime
    import peft
    import torch
    import transformers

    where = f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    if device == "cuda":
        where = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB), " + where
    return (f"{platform.system()} {platform.machine()}, {where}; python {platform.python_version()}, torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"onnxruntime {onnxruntime.__version__}")


# ----------------------------------------------------------------------------- report (pure)

def report(results: dict, args: argparse.Namespace) -> str:
    config = GenerateConfig(**results["config"])
    lines = ["| setting | value |", "|---|---|",
             f"| command | `{results['command']}` |",
             f"| host | {results['environment']} |",
             f"| device | {results['device']} |",
             f"| recipe | {args.recipe}: {config.base_model}, {config.resolution} px, {config.scheduler} {config.inference_steps} "
             f"steps, guidance {config.guidance}, batch {config.batch_size}, negative prompt "
             f"{'yes' if config.negative_prompt else 'no'}, embedders {config.clip_model} + {config.dino_model} "
             f"({config.embedder_backend}) |"]
    lines += [f"| machine quiet? | {wait} |" for wait in results["waits"]]
    measured = [results.get("per-image"), results.get("scoring")]
    measured += [run for one in results.get("throughput", []) for run in one.values()]
    lines += [f"| contention | {run['warning']} |" for run in measured if run and run.get("warning")]
    if "per-image" in results:
        lines += ["", *per_image_table(results["per-image"], config, results["device"])]
    if "throughput" in results:
        lines += ["", *throughput_table(results["throughput"], config)]
    if "scoring" in results:
        lines += ["", *scoring_table(results["scoring"])]
    return "\n".join(lines)


def per_image_table(result: dict, config: GenerateConfig, device: str) -> list[str]:
    lines = [f"Per-image time ({result['dtype']}, median of {result['repeats']} runs after {result['warmup']} "
             f"warm-up, draw and floors run in turns; LoRA rank {result['lora_rank']} loaded with "
             f"load_lora_weights; CPU cores used {result['cores_used']:.2f}, 1-min load "
             f"{result['load_average'][0]:.2f}..{result['load_average'][1]:.2f})",
             "",
             "| preset | px | device | steps | batch | draw s/img | floor s/img | draw / floor | target <= 1.10 "
             "| per-turn ratio median [quartiles] | floor, LoRA disabled s/img | text encode s/img | to PIL s/img |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        ratio = row["draw_s"] / row["floor_s"]
        turns = [d / f for d, f in zip(row["runs_s"]["draw"], row["runs_s"]["floor"])]
        spread = statistics.quantiles(turns, n=4) if len(turns) > 1 else turns * 3
        lines.append(f"| {config.base_model} | {config.resolution} | {device} | {config.inference_steps} | {row['batch']} "
                     f"| {row['draw_s']:.4g} | {row['floor_s']:.4g} | {ratio:.2f} "
                     f"| {'met' if ratio <= TARGET_RATIO else 'NOT met'} "
                     f"| {spread[1]:.2f} [{spread[0]:.2f}, {spread[2]:.2f}] | {row['floor_no_lora_s']:.4g} "
                     f"| {row['text_s']:.3g} | {row['to_pil_s']:.3g} |")
    lines += ["", f"adapter swap on this model (median of 3 after 1): load_lora_weights {result['adapter_load_s']:.3f} s, "
                  f"unload_lora_weights {result['adapter_unload_s']:.3f} s; floor = steps x UNet(CFG batch) + VAE "
                  "decode on draw()'s own latents, text embeddings and timesteps; draw / floor = ratio of the medians"]
    return lines


def throughput_table(rounds: list[dict], config: GenerateConfig) -> list[str]:
    lines = [f"Throughput: {len(BENCH_INSTANCES) * SKUS_PER_INSTANCE} SKUs over {len(BENCH_INSTANCES)} adapters "
             f"(sheet n_images 1 or 2, max_extra {config.max_extra}, batch_size {config.batch_size}); wall = "
             "everything from the call to the last file, loading the base model and embedders included",
             "",
             "| round | run | adapter loads | draw calls (mean batch) | candidates | kept | wall s | images/s "
             "| model load s | draw s | score s | adapter load+unload s | references s | rest s | CPU cores used |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for index, one in enumerate(rounds, start=1):
        for name, run in (("generate() (ours)", one["ours"]), ("per-SKU loop", one["loop"])):
            parts = ("load_s", "draw_s", "score_s", "adapter_s", "references_s")
            rest = run["wall_s"] - sum(run[key] for key in parts)
            lines.append(f"| {index} | {name} | {run['adapter_loads']} "
                         f"| {run['draw_calls']} ({run['candidates'] / run['draw_calls']:.2f}) | {run['candidates']} "
                         f"| {run['kept']} | {run['wall_s']:.2f} | {run['candidates'] / run['wall_s']:.2f} | "
                         + " | ".join(f"{run[key]:.2f}" for key in parts) + f" | {rest:.2f} | {run['cores_used']:.2f} |")
    speedup = statistics.median(one["loop"]["wall_s"] / one["ours"]["wall_s"] for one in rounds)
    no_load = statistics.median((one["loop"]["wall_s"] - one["loop"]["load_s"]) /
                                (one["ours"]["wall_s"] - one["ours"]["load_s"]) for one in rounds)
    same = all(one["loop"]["candidates_per_sku"] == one["ours"]["candidates_per_sku"] for one in rounds)
    loop = rounds[-1]["loop"]
    lines += ["",
              f"speed-up, loop wall / ours wall (median of {len(rounds)} rounds): {speedup:.2f}x "
              f"(target >= {TARGET_SPEEDUP}x: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}); "
              f"without the model load both pay once: {no_load:.2f}x; same candidates per SKU in both: {same}",
              f"loop, per SKU (last round): adapter load {loop['adapter_load_mean_s'] * 1000:.1f} ms + unload "
              f"{loop['adapter_unload_mean_s'] * 1000:.1f} ms, reference embeddings "
              f"{loop['references_s'] / loop['skus'] * 1000:.1f} ms; per candidate: draw "
              f"{loop['draw_s'] / loop['candidates'] * 1000:.1f} ms, scoring {loop['score_s'] / loop['candidates'] * 1000:.1f} ms",
              "ours: stages timed by wrapping generate()'s own calls (_load_context, load/unload_lora_weights, "
              "ReferenceEmbeddings.get, _draw); score s from the manifest's score_seconds; rest = prompts, text "
              "embeddings, gate decisions, PNG and Parquet writes, bookkeeping"]
    return lines


def scoring_table(result: dict) -> list[str]:
    lines = [f"Gate scoring: {result['images']} images per call, embed_images() with preprocessing, median of "
             f"2 x {result['repeats']} calls, each block after {result['warmup']} warm-up; {result['clip']} + {result['dino']} "
             f"{'(tiny random-weight towers, not ViT-B/32 / ViT-S/16)' if result['clip'].startswith('tiny') else ''}; "
             f"onnxruntime threads: {result['onnx_threads']}; "
             "each backend in blocks of calls, twice over",
             "",
             "| model | image px | torch images/s | onnx images/s | onnx / torch | preprocessing only images/s |",
             "|---|---|---|---|---|---|"]
    for size in result["sizes"]:
        for model in ("clip", "dino", "clip+dino"):
            torch_rate, onnx_rate = (result["rates"].get(backend, {}).get(str(size), {}).get(model)
                                     for backend in ("torch", "onnx"))
            ratio = f"{onnx_rate / torch_rate:.2f}" if torch_rate and onnx_rate else "n/a"
            pre = result["preprocess"].get(str(size), {}).get(model)
            lines.append(f"| {model} | {size} | {_rate(torch_rate)} | {_rate(onnx_rate)} | {ratio} | {_rate(pre)} |")
    lines += [f"{backend}: not measured: {why}" for backend, why in result["not_measured"].items()]
    lines.append("load s (first load includes the one-off ONNX export when not cached): "
                 + ", ".join(f"{backend} {seconds:.1f}" for backend, seconds in result["load_s"].items()))
    return lines


def _rate(value) -> str:
    return "not measured" if value is None else f"{value:.1f}"


# ----------------------------------------------------------------------------- child process

def run_worker(args: argparse.Namespace) -> None:
    job = json.loads(args.job.read_text())
    measure = {"per-image": measure_per_image, "ours": measure_ours, "loop": measure_loop,
               "scoring": measure_scoring}[args.worker]
    load_before, cpu_before, wall_before = os.getloadavg()[0], time.process_time(), time.perf_counter()
    result = measure(job)
    # Other work on the machine slows a CPU benchmark down: the cores this process got say whether it ran alone.
    result["cores_used"] = (time.process_time() - cpu_before) / (time.perf_counter() - wall_before)
    result["load_average"] = [load_before, os.getloadavg()[0]]
    args.result.write_text(json.dumps(result))


def load_generation_pipeline(config: GenerateConfig, device):
    """The pipeline exactly as generate() loads it (generation._load_context)."""
    from catalog_gen.models.loading import load_pipeline, resolve_base_model
    from catalog_gen.models.sampling import make_scheduler

    pipeline = load_pipeline(resolve_base_model(config.base_model), device, config.precision)
    pipeline.scheduler = make_scheduler(config.scheduler, pipeline.scheduler.config)
    return pipeline


def _timed(run: Callable[[], object], warmup: int, repeats: int, device) -> list[float]:
    import torch

    seconds = []
    for index in range(warmup + repeats):
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmup:
            seconds.append(time.perf_counter() - started)
    return seconds


def measure_per_image(job: dict) -> dict:
    """draw() against the floor, run in turns (draw, floor, floor without LoRA, draw, ...) so that
    any drift in the machine's speed falls on all three alike."""
    import torch

    from catalog_gen.train.lora_files import DIFFUSERS_WEIGHTS_NAME
    from catalog_gen.models.sampling import draw

    config, device = GenerateConfig(**job["config"]), torch.device(job["device"])
    pipeline = load_generation_pipeline(config, device)
    folder = write_random_adapter(pipeline.unet, job["lora_rank"], Path(job["workdir"]) / "per-image-adapter")

    def load_adapter() -> None:
        pipeline.load_lora_weights(str(folder), weight_name=DIFFUSERS_WEIGHTS_NAME, adapter_name="sku_adapter")

    load_adapter()
    negative = config.negative_prompt or None
    rows = []
    for batch in job["batch_sizes"]:
        prompts, seeds = [PROMPT] * batch, list(range(batch))
        inputs = floor_inputs(pipeline, config, prompts, seeds)

        def floor_without_lora() -> None:  # what the unfused LoRA layers cost
            pipeline.disable_lora()
            try:
                floor_once(pipeline, inputs)
            finally:
                pipeline.enable_lora()

        runs = {"draw": lambda: draw(pipeline, prompts, seeds, steps=config.inference_steps, resolution=config.resolution,
                                     guidance=config.guidance, negative_prompt=negative, batch_size=batch),
                "floor": lambda: floor_once(pipeline, inputs), "floor_no_lora": floor_without_lora}
        print(f"[per-image] batch {batch}: draw / floor / floor without LoRA in turns ...", flush=True)
        times = _in_turns(runs, job["warmup"], job["repeats"], device)
        text = _timed(lambda: encode_text(pipeline, prompts, negative), 1, job["repeats"], device)
        decoded = decode(pipeline, inputs["latents"])
        to_pil = _timed(lambda: pipeline.image_processor.postprocess(decoded, output_type="pil"), 1, job["repeats"], device)
        rows.append({"batch": batch, **{f"{name}_s": statistics.median(times[name]) / batch for name in runs},
                     "text_s": statistics.median(text) / batch, "to_pil_s": statistics.median(to_pil) / batch,
                     "runs_s": times})
    # What one adapter swap costs on this model: what the per-SKU loop pays per SKU and generate() per instance.
    swap = _in_turns({"unload": pipeline.unload_lora_weights, "load": load_adapter}, 1, 3, device)
    return {"rows": rows, "dtype": str(pipeline.unet.dtype).replace("torch.", ""), "warmup": job["warmup"],
            "repeats": job["repeats"], "lora_rank": job["lora_rank"],
            "adapter_load_s": statistics.median(swap["load"]), "adapter_unload_s": statistics.median(swap["unload"])}


def _in_turns(runs: dict[str, Callable], warmup: int, repeats: int, device) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(warmup + repeats):
        for name, run in runs.items():
            took = _timed(run, 0, 1, device)[0]
            if index >= warmup:
                times[name].append(took)
    return times


def write_random_adapter(unet, rank: int, folder: Path) -> Path:
    """A diffusers LoRA file of the trained adapters' shape (training's targets, given rank), small
    random weights; its cost per forward does not depend on the values."""
    import torch
    from peft import LoraConfig

    from catalog_gen.train.lora_files import save_diffusers_lora
    from catalog_gen.train.training import UNET_LORA_TARGETS

    generator = torch.Generator().manual_seed(0)
    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in UNET_LORA_TARGETS):
            layers[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.01
            layers[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.01
    config = LoraConfig(r=rank, lora_alpha=float(rank), target_modules=list(UNET_LORA_TARGETS))
    folder.mkdir(parents=True, exist_ok=True)
    save_diffusers_lora(folder, layers, None, config.to_dict())
    return folder


def floor_inputs(pipeline, config: GenerateConfig, prompts: list[str], seeds: list[int]) -> dict:
    """The tensors draw() feeds the UNet and VAE: its latents, the CFG text batch, the scheduler's timesteps."""
    import torch

    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    latents = torch.stack([
        torch.randn((pipeline.unet.config.in_channels, config.resolution // pipeline.vae_scale_factor,
                     config.resolution // pipeline.vae_scale_factor), generator=g)
        for g in generators]).to(pipeline.device, dtype=pipeline.unet.dtype)
    text, pooled = encode_text(pipeline, prompts, config.negative_prompt or None)
    added = None
    if pooled is not None:  # SDXL: the pooled text and the size/crop conditioning its pipeline gives the UNet
        size = (config.resolution, config.resolution)
        time_ids = pipeline._get_add_time_ids(size, (0, 0), size, text.dtype,
                                              text_encoder_projection_dim=pipeline.text_encoder_2.config.projection_dim)
        added = {"text_embeds": pooled, "time_ids": time_ids.to(pipeline.device).repeat(len(pooled), 1)}
    pipeline.scheduler.set_timesteps(config.inference_steps, device=pipeline.device)
    return {"latents": latents, "doubled": torch.cat([latents] * 2), "text": text, "added": added,
            "timesteps": pipeline.scheduler.timesteps.clone()}


def encode_text(pipeline, prompts: list[str], negative: str | None):
    """The classifier-free-guidance text batch (negative, then positive), and for SDXL its pooled text too."""
    import torch

    negatives = [negative] * len(prompts) if negative else None
    with torch.no_grad():
        if getattr(pipeline, "text_encoder_2", None) is not None:
            positive, negative_embeds, pooled, negative_pooled = pipeline.encode_prompt(
                prompts, device=pipeline.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                negative_prompt=negatives)
            return torch.cat([negative_embeds, positive]), torch.cat([negative_pooled, pooled])
        positive, negative_embeds = pipeline.encode_prompt(prompts, pipeline.device, 1, True, negative_prompt=negatives)
    return torch.cat([negative_embeds, positive]), None


def floor_once(pipeline, inputs: dict) -> None:
    import torch

    with torch.no_grad():
        for t in inputs["timesteps"]:
            pipeline.unet(inputs["doubled"], t, encoder_hidden_states=inputs["text"],
                          added_cond_kwargs=inputs["added"], return_dict=False)
        decode(pipeline, inputs["latents"])


def decode(pipeline, latents):
    import torch

    with torch.no_grad():
        return pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor, return_dict=False)[0]


def _import_models() -> None:
    """The libraries' lazy imports, done before any clock starts (both runs would pay them once)."""
    from diffusers import StableDiffusionPipeline  # noqa: F401
    from transformers import CLIPModel, ViTModel  # noqa: F401


def _timing(clock: Counter, key: str, function: Callable) -> Callable:
    """`function`, adding its time to clock[key] and its calls to clock[key + '_calls']."""
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            clock[key] += time.perf_counter() - started
            clock[key + "_calls"] += 1
    return timed


def measure_ours(job: dict) -> dict:
    """generate() as `catalog generate` runs it. Its stages are timed by wrapping, never changing, the
    functions it calls: model loading, adapter load/unload, reference embeddings and draw calls."""
    import polars as pl

    from catalog_gen.generate import generation
    from catalog_gen.generate.generation import GenerationRequest, generate

    workdir, run_dir = Path(job["workdir"]), Path(job["workdir"]) / "run-ours"
    shutil.rmtree(workdir / "embeddings", ignore_errors=True)  # cold reference cache, as on a first night
    request = GenerationRequest(Path(job["sheet"]), workdir, run_dir, templates=job["templates"], force=True)
    clock: Counter = Counter()
    load_context = generation._load_context

    def observed_load_context(*args, **kwargs):
        started = time.perf_counter()
        context = load_context(*args, **kwargs)
        clock["load"] += time.perf_counter() - started
        pipeline = context.pipeline
        pipeline.load_lora_weights = _timing(clock, "adapter", pipeline.load_lora_weights)
        pipeline.unload_lora_weights = _timing(clock, "adapter", pipeline.unload_lora_weights)
        context.references.get = _timing(clock, "references", context.references.get)
        return context

    generation._load_context = observed_load_context
    generation._draw = _timing(clock, "draw", generation._draw)
    _import_models()
    print("[ours] generate() ...", flush=True)
    started = time.perf_counter()
    summary = generate(request, GenerateConfig(**job["config"]))
    wall = time.perf_counter() - started
    if summary.errors:
        raise CatalogError(f"generate() recorded errors: {summary.errors[:3]}")
    manifest = pl.read_parquet(run_dir / "manifest.parquet")
    return {"wall_s": wall, "skus": summary.skus_done, "candidates": summary.candidates, "kept": summary.kept,
            "passed": summary.passed, "candidates_per_sku": dict(Counter(manifest["sku"].to_list())),
            "adapter_loads": clock["adapter_calls"] // 2, "load_s": clock["load"], "draw_s": clock["draw"],
            "draw_calls": clock["draw_calls"], "score_s": float(manifest["score_seconds"].sum()),
            "adapter_s": clock["adapter"], "references_s": clock["references"]}


def measure_loop(job: dict) -> dict:
    """The straightforward loop: every SKU loads its adapter and embeds its references anew."""
    import polars as pl
    import torch

    from catalog_gen.generate import skus
    from catalog_gen.quality import embedders, gates
    from catalog_gen.train.adapters import read_adapter
    from catalog_gen.layout import adapter_folder
    from catalog_gen.catalog.class_map import load_class_map
    from catalog_gen.generate.generation import use_prompt_noun
    from catalog_gen.train.lora_files import DIFFUSERS_WEIGHTS_NAME

    config, device = GenerateConfig(**job["config"]), torch.device(job["device"])
    workdir, out = Path(job["workdir"]), Path(job["workdir"]) / "run-loop"
    shutil.rmtree(out, ignore_errors=True)
    print("[loop] per-SKU loop ...", flush=True)
    clock: Counter = Counter()
    loads, unloads, records = [], [], []
    _import_models()
    started = time.perf_counter()
    # 1. The base model and the embedders, once (the loop only reloads the adapter).
    pipeline = load_generation_pipeline(config, device)
    models = SimpleNamespace(clip=embedders.load_clip(config.clip_model, device=str(device), backend=config.embedder_backend),
                             dino=embedders.load_dino(config.dino_model, device=str(device), backend=config.embedder_backend))
    class_map = load_class_map("jewelry")
    rows, _ = skus.read_sku_sheet(Path(job["sheet"]))
    clock["load"] = time.perf_counter() - started
    # 2. Every SKU on its own: adapter in, references, candidates, scores, PNGs, adapter out.
    for row in rows:
        class_spec = class_map.get_class(row.class_key)
        adapter = read_adapter(adapter_folder(workdir, row.class_key, row.instance_key))
        t0 = time.perf_counter()
        pipeline.load_lora_weights(str(adapter.folder), weight_name=DIFFUSERS_WEIGHTS_NAME, adapter_name="sku_adapter")
        loads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        photos = [embedders._open_photo(path) for path in adapter.photo_paths]
        reference_clip = models.clip.embed_images(photos).numpy()
        reference_dino = models.dino.embed_images(photos).numpy()
        clock["references"] += time.perf_counter() - t0
        thresholds = gates.base_thresholds(config)
        if config.calibrate:
            thresholds = gates.calibrate(thresholds, reference_clip, reference_dino, config.calibration_ratio)
        variables = {**row.variables, "token": adapter.token, "instance": class_spec.instances[row.instance_key].name,
                     "noun": class_spec.noun, "instance_prompt": adapter.record["instance_prompt"]}
        prompt = skus.render_prompt(job["templates"].get(row.class_key, config.template), variables)
        text = models.clip.embed_texts([use_prompt_noun(prompt, adapter.token, class_spec.noun)]).numpy()
        images = loop_candidates(pipeline, models, config, row, prompt, text, reference_clip, reference_dino,
                                 thresholds, clock)
        t0 = time.perf_counter()
        for index, (seed, image, verdict) in enumerate(images):
            path = out / f"{row.sku}" / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, format="PNG")
            records.append({"sku": row.sku, "candidate": index, "seed": seed, "passed": verdict.passed})
        clock["write"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        pipeline.unload_lora_weights()
        unloads.append(time.perf_counter() - t0)
    pl.DataFrame(records).write_parquet(out / "manifest.parquet")
    wall = time.perf_counter() - started
    per_sku = dict(Counter(r["sku"] for r in records))
    return {"wall_s": wall, "skus": len(rows), "candidates": len(records), "candidates_per_sku": per_sku,
            "kept": sum(min(sum(r["passed"] for r in records if r["sku"] == row.sku),
                            row.n_images or config.n_images) for row in rows),
            "adapter_loads": len(loads), "load_s": clock["load"], "draw_s": clock["draw"],
            "draw_calls": clock["draw_calls"], "score_s": clock["score"],
            "references_s": clock["references"], "write_s": clock["write"], "adapter_s": sum(loads) + sum(unloads),
            "adapter_load_mean_s": statistics.mean(loads), "adapter_unload_mean_s": statistics.mean(unloads)}


def loop_candidates(pipeline, models, config: GenerateConfig, row, prompt: str, text, reference_clip, reference_dino,
                    thresholds, clock: Counter) -> list:
    """generate()'s k + M rule, written plainly: draw k; while fewer than k pass, draw more, up to k + M."""
    from catalog_gen.quality import gates
    from catalog_gen import seeds as seed_of
    from catalog_gen.models.sampling import draw

    k = row.n_images or config.n_images
    budget, found = k + config.max_extra, []
    while len(found) < budget:
        passed = sum(verdict.passed for _, _, verdict in found)
        if passed >= k:
            break
        wanted = min(k - passed if len(found) >= k else k, budget - len(found))
        seeds = [seed_of.candidate(row.sku, i, seed_of.sku_run_seed(config.seed, row.seed, 0))
                 for i in range(len(found), len(found) + wanted)]
        t0 = time.perf_counter()
        images = draw(pipeline, [prompt] * wanted, seeds, steps=config.inference_steps, resolution=config.resolution,
                      guidance=config.guidance, negative_prompt=config.negative_prompt or None,
                      batch_size=config.batch_size)
        clock["draw"] += time.perf_counter() - t0
        clock["draw_calls"] += 1
        t0 = time.perf_counter()
        scored = gates.score_images(images, models.clip.embed_images(images).numpy(),
                                    models.dino.embed_images(images).numpy(), text, reference_clip, reference_dino)
        clock["score"] += time.perf_counter() - t0
        found += [(seed, image, gates.decide(scores, thresholds)) for seed, image, scores in zip(seeds, images, scored)]
    return found


def measure_scoring(job: dict) -> dict:
    """embed_images() per backend and image size, in blocks run twice (torch CLIP, torch DINO, onnx CLIP,
    onnx DINO, preprocessing, then all again). Not call by call in turns: onnxruntime's and torch's
    worker threads spin for a while after each call, which would slow whichever runs next on 2 cores."""
    import numpy as np
    import torch
    from PIL import Image

    from catalog_gen.quality import embedders

    config, device = GenerateConfig(**job["config"]), torch.device(job["device"])
    rng = np.random.default_rng(0)
    sizes = sorted({config.resolution, 512})
    load_s: dict = {}
    not_measured: dict = {}
    models: dict = {}
    for backend in ("torch", "onnx"):
        started = time.perf_counter()  # includes the one-off ONNX export when it is not cached yet
        try:
            models[("clip", backend)] = embedders.load_clip(config.clip_model, device=str(device), backend=backend)
            models[("dino", backend)] = embedders.load_dino(config.dino_model, device=str(device), backend=backend)
        except CatalogError as error:  # e.g. --device cuda with the CPU-only onnxruntime
            not_measured[backend] = str(error)
            models = {key: model for key, model in models.items() if key[1] != backend}
            continue
        load_s[backend] = time.perf_counter() - started
    rates: dict = {backend: {} for backend in load_s}
    preprocess: dict = {}
    for size in sizes:
        batch = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(SCORING_IMAGES)]
        print(f"[scoring] {size} px: {', '.join(f'{m} {b}' for m, b in models)} and preprocessing ...", flush=True)
        runs = {f"{model} {backend}": (lambda m=embedder: m.embed_images(batch)) for (model, backend), embedder in models.items()}
        for model in ("clip", "dino"):
            transform = models[(model, next(iter(load_s)))].transform
            runs[f"{model} preprocess"] = lambda t=transform: [t(image) for image in batch]
        times = _in_blocks(runs, job["warmup"], job["repeats"], device)
        rate = {name: len(batch) / statistics.median(seconds) for name, seconds in times.items()}
        for backend in rates:
            rates[backend][str(size)] = _with_both(rate[f"clip {backend}"], rate[f"dino {backend}"])
        preprocess[str(size)] = _with_both(rate["clip preprocess"], rate["dino preprocess"])
    return {"sizes": sizes, "rates": rates, "preprocess": preprocess, "load_s": load_s, "not_measured": not_measured,
            "images": SCORING_IMAGES, "warmup": job["warmup"], "repeats": job["repeats"], "clip": config.clip_model,
            "dino": config.dino_model, "onnx_threads": _onnx_threads()}


def _in_blocks(runs: dict[str, Callable], warmup: int, repeats: int, device, passes: int = 2) -> dict[str, list[float]]:
    """Each run `warmup` + `repeats` times in a row, all of them, `passes` times over; warm-ups left out."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(passes):
        for name, run in runs.items():
            times[name] += _timed(run, warmup, repeats, device)
    return times


def _with_both(clip_rate: float, dino_rate: float) -> dict:
    """Images/s of each embedder, and of both in a row (what the gates run per candidate)."""
    return {"clip": clip_rate, "dino": dino_rate, "clip+dino": 1 / (1 / clip_rate + 1 / dino_rate)}


def _onnx_threads() -> str:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    return f"intra-op {options.intra_op_num_threads} (0 = one per physical core)"


if __name__ == "__main__":
    sys.exit(main())
