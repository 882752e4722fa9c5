"""Training-step benchmark: our `training.fit()` against a bare UNet step and a naive loop.

    python -m bench.train_bench --preset tiny --resolution 64 --steps 100 --warmup 20 --rounds 3
    python -m bench.train_bench --preset sd15-shape --resolution 256 --steps 5 --warmup 2
    python -m bench.train_bench --preset sd15-shape --resolution 256 --steps 5 --warmup 2 --method dreambooth
    # on a CUDA GPU, the T4 recipe (adds the peak CUDA memory column):
    python -m bench.train_bench --preset sd15-shape --resolution 512 --device cuda --mixed-precision fp16 \
        --optimizer adamw8bit --gradient-checkpointing --prior-preservation

Three measurements, each in its own fresh process (so peak memory is per measurement and one
cannot warm caches for another), on the same base model, recipe and LoRA:

    ours      catalog_gen.train.training.fit() on real photos (sample catalogue -> intake), timed per step
              from its progress callback.
    floor     the same UNet + LoRA + optimizer on fixed, precomputed tensors of the shapes and
              dtypes fit() uses: forward, MSE, backward, clip, optimizer step. Nothing else.
    baseline  the straightforward loop of diffusers' train_dreambooth_lora.py example: every step
              decodes the PNGs, encodes them through the VAE, tokenizes and encodes the prompt
              through the text encoder, then the same UNet step.

For --method other than dreambooth-lora only `ours` is measured: the floor and the baseline are LoRA loops
(the table says n/a).

Reported: the median seconds per step after the warm-up steps, overhead = ours / floor (target
<= 1.15x), speed-up = baseline / ours (target >= 2x), the peak RSS of the `ours` process and, on
CUDA, torch.cuda.max_memory_allocated() of the `ours` process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from bench.common import pick_device, run_main, run_worker_process
from catalog_gen.config import METHODS, TrainConfig
from catalog_gen.errors import CatalogError
from catalog_gen.storage import atomic_write_json

KINDS = ("ours", "floor", "baseline")
TARGET_OVERHEAD = 1.15
TARGET_SPEEDUP = 2.0
CUDA_GOAL_GB = 8.0  # T4 / 16 GB goal of the issue, in GB (10^9 bytes)
BENCH_CLASS = "ring"  # the sample catalogue's class whose first instance is trained


# ----------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.train_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny",
                        help="base model: a preset (tiny, tiny-sd2, tiny-sdxl, sd15-shape, sdxl-shape, ...) or any "
                             "--base-model spec")
    parser.add_argument("--resolution", type=int, default=None, help="training side in px (default: the preset's own)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="steps run first and left out of the timing")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--prior-preservation", action="store_true",
                        help="add class images to every batch (the class's other instances stand in for them)")
    parser.add_argument("--num-class-images", type=int, default=TrainConfig.num_class_images,
                        help="class images fit() encodes up front with --prior-preservation (default: the recipe's)")
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--method", default="dreambooth-lora", choices=METHODS,
                        help="what fit() trains (the floor and baseline are measured for dreambooth-lora only)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat ours, floor, baseline this many times, each in a fresh process, and pool the "
                             "step times (spreads interference from other work on a shared machine over all three)")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement to this JSON file")
    # Internal: how the parent starts one measurement in a child process.
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.steps < 1 or args.warmup < 1:
        parser.error(f"--steps and --warmup must be >= 1 (got {args.steps}, {args.warmup}); the first step "
                     "of fit() includes its setup, so at least one warm-up step is always discarded")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, parse_args, run_worker, run_bench)


# ----------------------------------------------------------------------------- parent process

def run_bench(args: argparse.Namespace, argv: list[str]) -> None:
    import torch

    from catalog_gen.train import training
    from catalog_gen.models.loading import resolve_base_model

    # 1. Validate the recipe and the device before anything slow happens.
    device = pick_device(args.device)
    resolution = args.resolution or _native_resolution(args.preset)
    config = bench_config(args, resolution)
    training.weight_dtype_for(config, torch.device(device))  # fp16 needs CUDA: say so now, not in a child
    command = "python -m bench.train_bench " + shlex.join(argv)
    print(f"command: {command}")
    print(f"host: {environment(device)}")

    # 2. The base model (a preset is built on first use: sd15-shape takes a minute or two) and the job.
    started = time.perf_counter()
    model = resolve_base_model(config.base_model)
    print(f"base model: {model.spec} at {model.path} ({time.perf_counter() - started:.1f} s to resolve)")
    with tempfile.TemporaryDirectory(prefix="catalog-gen-bench-") as tmp:
        workdir = Path(tmp)
        job = prepare_job(model, config, workdir)
        job_file = workdir / "job.json"
        job_file.write_text(json.dumps({"job": job, "config": config.to_dict(), "device": device,
                                        "warmup": args.warmup, "steps": args.steps}))
        print(f"job: {job['class_key']}/{job['instance_key']}, {len(job['photos'])} photos, "
              f"{len(job['class_images'])} class images, recipe {recipe_label(config)}")

        # 3. One fresh process per measurement (and per round).
        kinds = kinds_for(config)
        rounds = [{kind: run_child(kind, argv, job_file, workdir, index) for kind in kinds}
                  for index in range(args.rounds)]
    results = {kind: pool_rounds([one[kind] for one in rounds]) for kind in kinds}

    # 4. Report.
    for kind in kinds:
        print(detail_line(results[kind]))
        if device == "cpu" and results[kind]["cores_used"] < 0.9 * torch.get_num_threads():
            print(f"WARNING: [{kind}] got {results[kind]['cores_used']:.2f} of {torch.get_num_threads()} cores: "
                  "other work was running on this machine, so its timings are inflated")
    row = table_row(args.preset, config, device, args.steps * args.rounds, results)
    print()
    print(TABLE_HEADER)
    print(row)
    print()
    print(verdict(results))
    if args.json is not None:
        atomic_write_json(args.json, {"command": command, "environment": environment(device),
                                      "config": config.to_dict(), "results": results, "row": row})


def kinds_for(config: TrainConfig) -> tuple[str, ...]:
    """The floor and the baseline are LoRA loops: for other methods only fit() itself is measured."""
    return KINDS if config.method == "dreambooth-lora" else ("ours",)


def _native_resolution(spec: str) -> int:
    from catalog_gen.models.presets import PRESETS

    return PRESETS[spec].resolution if spec in PRESETS else 512


def bench_config(args: argparse.Namespace, resolution: int) -> TrainConfig:
    """The recipe every measurement shares. No intermediate checkpoints or validation images:
    those are I/O and sampling, not the training step being measured."""
    return TrainConfig(
        method=args.method, base_model=args.preset, resolution=resolution, steps=args.warmup + args.steps,
        batch_size=args.batch_size, lora_rank=args.lora_rank, lora_alpha=float(args.lora_rank),
        optimizer=args.optimizer, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, prior_preservation=args.prior_preservation,
        num_class_images=args.num_class_images, checkpoint_every=0, validation_images=0, cache_latents=True, seed=0,
    )


def prepare_job(model, config: TrainConfig, workdir: Path) -> dict:
    """Real photos through the real intake: the sample catalogue's first ring instance.

    With prior preservation the photos of the class's other instances stand in for the class
    images, which `catalog train` would draw with the base model first (a separate, untimed phase);
    they are repeated up to num_class_images, because fit() encodes all of them before step 1.
    """
    from catalog_gen.catalog import taxonomy
    from catalog_gen.models.loading import load_tokenizer
    from catalog_gen.catalog.sample_data import write_sample_catalogue
    from catalog_gen.train.methods import method_of
    from catalog_gen.train.workflow import PhotoSource, prepare_instances

    catalogue = write_sample_catalogue(workdir / "catalogue")
    source = PhotoSource(photos_dir=catalogue.photos_dir, products_csv=catalogue.products_csv)
    new_tokens = config.embedding_vectors if method_of(config).new_tokens else None
    prepared, _ = prepare_instances(source, BENCH_CLASS, [], workdir, config.resolution, load_tokenizer(model),
                                    new_token_vectors=new_tokens)
    if not prepared:
        raise CatalogError(f"the sample catalogue gave no trainable '{BENCH_CLASS}' instance")
    item, others = prepared[0], prepared[1:]
    spec = taxonomy.load_class_map(source.class_map).get_class(BENCH_CLASS)
    class_images = []
    if config.prior_preservation:
        pool = [str(p) for other in others for p in other.photos]
        class_images = [pool[index % len(pool)] for index in range(config.num_class_images)]
    return {"class_key": BENCH_CLASS, "instance_key": item.instance_key, "token": item.token,
            "instance_prompt": spec.instance_prompt_for(item.instance_key, item.token),
            "class_prompt": spec.class_prompt, "photos": [str(p) for p in item.photos],
            "class_images": class_images, "initializer": spec.noun}


def run_child(kind: str, argv: list[str], job_file: Path, workdir: Path, round_index: int) -> dict:
    print(f"[{kind}] round {round_index + 1}: starting a fresh process ...", flush=True)
    return run_worker_process("bench.train_bench", kind, argv, job_file, workdir, str(round_index))


def environment(device: str) -> str:
    import diffusers
    import peft
    import torch
    import transformers

    where = f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    if device == "cuda":
        where = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB), " + where
    return (f"{platform.system()} {platform.machine()}, {where}; python {platform.python_version()}, torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")


# ----------------------------------------------------------------------------- report (pure)

TABLE_HEADER = (
    "| preset | px | device | dtype | recipe | steps timed | ours s/step | floor s/step | overhead x "
    "| baseline s/step | speed-up x | peak RSS GiB (ours) | peak CUDA GiB (ours) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def recipe_label(config: TrainConfig) -> str:
    parts = [] if config.method == "dreambooth-lora" else [config.method]
    parts += [f"bs{config.batch_size}"] + ([f"r{config.lora_rank}"] if config.method in ("dreambooth-lora", "pivotal") else [])
    parts.append(config.optimizer)
    if config.gradient_checkpointing:
        parts.append("grad-ckpt")
    if config.prior_preservation:
        parts.append("prior")
    return " ".join(parts)


def table_row(preset: str, config: TrainConfig, device: str, steps: int, results: dict) -> str:
    ours = results["ours"]["median_s"]
    dtype = {"no": "fp32"}.get(config.mixed_precision, config.mixed_precision)
    memory = results["ours"]
    cuda = (f"{memory['cuda_max_allocated'] / 2**30:.2f}" if memory["cuda_max_allocated"] is not None
            else "n/a (cpu)")
    if "floor" in results:
        floor, baseline = results["floor"]["median_s"], results["baseline"]["median_s"]
        compared = f"| {floor:.4g} | {ours / floor:.2f} | {baseline:.4g} | {baseline / ours:.2f} "
    else:
        compared = "| n/a | n/a | n/a | n/a "
    return (f"| {preset} | {config.resolution} | {device} | {dtype} | {recipe_label(config)} | {steps} "
            f"| {ours:.4g} {compared}| {memory['peak_rss_kib'] * 1024 / 2**30:.2f} | {cuda} |")


def pool_rounds(runs: list[dict]) -> dict:
    """One measurement's rounds as one: step times pooled, memory peaks maxed, worst CPU share kept."""
    seconds = [took for run in runs for took in run["step_seconds"]]
    cuda = [run["cuda_max_allocated"] for run in runs if run["cuda_max_allocated"] is not None]
    cuda_reserved = [run["cuda_max_reserved"] for run in runs if run["cuda_max_reserved"] is not None]
    return {
        **runs[0], "rounds": len(runs), "step_seconds": seconds, "median_s": statistics.median(seconds),
        "load_seconds": statistics.mean(run["load_seconds"] for run in runs),
        "first_step_s": statistics.mean(run["first_step_s"] for run in runs),
        "cores_used": min(run["cores_used"] for run in runs),
        "load_average": [min(v for run in runs for v in run["load_average"]),
                         max(v for run in runs for v in run["load_average"])],
        "rss_peaks_kib": _max_per_phase([run["rss_peaks_kib"] for run in runs]),
        "cuda_allocated_peaks": _max_per_phase([run["cuda_allocated_peaks"] for run in runs if run["cuda_allocated_peaks"]]),
        "peak_rss_kib": max(run["peak_rss_kib"] for run in runs),
        "lora_trained": None if runs[0]["lora_trained"] is None else all(run["lora_trained"] for run in runs),
        "cuda_max_allocated": max(cuda) if cuda else None,
        "cuda_max_reserved": max(cuda_reserved) if cuda_reserved else None,
    }


def _max_per_phase(peaks: list[dict]) -> dict:
    phases = peaks[0] if peaks else {}
    return {phase: max((p[phase] for p in peaks if p.get(phase) is not None), default=None) for phase in phases}


def _phases_gib(peaks: dict) -> str:
    return ", ".join(f"{phase} {'n/a' if value is None else f'{value / 2**30:.2f}'}" for phase, value in peaks.items())


def detail_line(result: dict) -> str:
    times = result["step_seconds"]
    line = (f"[{result['kind']}] s/step median {result['median_s']:.4g}, mean {statistics.mean(times):.4g}, "
            f"min {min(times):.4g}, max {max(times):.4g} over {len(times)} steps "
            f"({result['rounds']} process(es), each after {result['warmup']} warm-up); "
            f"first step {result['first_step_s']:.3g} s{' (with fit setup)' if result['kind'] == 'ours' else ''}; "
            f"model load {result['load_seconds']:.1f} s; "
            f"peak RSS {result['peak_rss_kib'] / 2**20:.2f} GiB "
            f"({_phases_gib({k: v and v * 1024 for k, v in result['rss_peaks_kib'].items()})}); "
            f"LoRA trained: {result['lora_trained']}; "
            f"CPU cores used {result['cores_used']:.2f} (lowest round), 1-min load average "
            f"{result['load_average'][0]:.2f}..{result['load_average'][1]:.2f}")
    if result["cuda_max_allocated"] is not None:
        line += (f"; CUDA max allocated {result['cuda_max_allocated'] / 2**30:.2f} GiB "
                 f"({_phases_gib(result['cuda_allocated_peaks'])}), max reserved {result['cuda_max_reserved'] / 2**30:.2f} GiB")
    return line


def verdict(results: dict) -> str:
    if "floor" not in results:
        line = "overhead and speed-up not measured (their floor and baseline are LoRA loops)"
        peak = results["ours"]["cuda_max_allocated"]
        return line + (f"; peak CUDA memory {peak / 1e9:.2f} GB" if peak is not None else "")
    ours, floor, baseline = (results[k]["median_s"] for k in KINDS)
    overhead, speedup = ours / floor, baseline / ours
    line = (f"overhead {overhead:.2f}x (target <= {TARGET_OVERHEAD}x: {'met' if overhead <= TARGET_OVERHEAD else 'NOT met'}); "
            f"speed-up {speedup:.2f}x (target >= {TARGET_SPEEDUP}x: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'})")
    peak = results["ours"]["cuda_max_allocated"]
    if peak is not None:  # the goal is for the T4 recipe: 512 px, fp16, 8-bit Adam, checkpointing, prior
        line += (f"; peak CUDA memory {peak / 1e9:.2f} GB (T4 recipe goal < {CUDA_GOAL_GB:g} GB: "
                 f"{'met' if peak / 1e9 < CUDA_GOAL_GB else 'NOT met'})")
    return line


# ----------------------------------------------------------------------------- child process

def run_worker(args: argparse.Namespace) -> None:
    import torch

    from catalog_gen.train import training

    spec = json.loads(args.job.read_text())
    config = TrainConfig(**spec["config"])
    device = torch.device(spec["device"])
    job = training.InstanceJob(
        spec["job"]["class_key"], spec["job"]["instance_key"], spec["job"]["token"],
        spec["job"]["instance_prompt"], spec["job"]["class_prompt"],
        tuple(Path(p) for p in spec["job"]["photos"]), args.result.parent / f"checkpoints-{args.result.stem}",
        tuple(Path(p) for p in spec["job"]["class_images"]), initializer=spec["job"].get("initializer", ""))

    # 1. Load the frozen base model exactly as `catalog train` does; note the loading peak.
    memory = MemoryMarks(device)
    started = time.perf_counter()
    components = training.load_components(training_model(config), config, device)
    load_seconds = time.perf_counter() - started
    memory.close_phase("load")

    # 2. Time the loop this process is for.
    measure = {"ours": measure_ours, "floor": measure_floor, "baseline": measure_baseline}[args.worker]
    load_before, cpu_before, wall_before = os.getloadavg()[0], time.process_time(), time.perf_counter()
    seconds, first_step = measure(components, config, job, spec["warmup"], spec["steps"], memory)
    # Other work on the machine slows a CPU benchmark down: the cores this process actually got
    # and the load average say whether it ran alone.
    cores_used = (time.process_time() - cpu_before) / (time.perf_counter() - wall_before)
    load_after = os.getloadavg()[0]
    memory.close_phase("steps")

    # 3. Write what was measured.
    result = {
        "kind": args.worker, "warmup": spec["warmup"], "step_seconds": seconds,
        "median_s": statistics.median(seconds), "first_step_s": first_step, "load_seconds": load_seconds,
        "cores_used": cores_used, "load_average": [load_before, load_after],
        "lora_trained": lora_trained(components.unet) if config.method == "dreambooth-lora" else None,
        **memory.summary(),
    }
    args.result.write_text(json.dumps(result))


class MemoryMarks:
    """Peak RSS (and on CUDA, peak allocated/reserved memory) per phase of a process: at the end
    of a phase read the peaks, then reset the marks so the next phase gets its own."""

    def __init__(self, device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.rss_known = True  # until a reset fails, ru_maxrss covers exactly the current phase
        self.rss_kib: dict[str, int | None] = {}
        self.cuda_allocated: dict[str, int] = {}
        self.cuda_reserved: dict[str, int] = {}

    def close_phase(self, name: str) -> None:
        import torch

        self.rss_kib[name] = _peak_rss_kib() if self.rss_known else None
        self.rss_known = _reset_peak_rss()
        if self.cuda:
            self.cuda_allocated[name] = torch.cuda.max_memory_allocated(self.device)
            self.cuda_reserved[name] = torch.cuda.max_memory_reserved(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def summary(self) -> dict:
        known = [kib for kib in self.rss_kib.values() if kib is not None]
        return {
            "rss_peaks_kib": self.rss_kib, "peak_rss_kib": max(known),
            "cuda_allocated_peaks": self.cuda_allocated if self.cuda else None,
            "cuda_max_allocated": max(self.cuda_allocated.values()) if self.cuda else None,
            "cuda_max_reserved": max(self.cuda_reserved.values()) if self.cuda else None,
        }


def training_model(config: TrainConfig):
    from catalog_gen.models.loading import resolve_base_model

    return resolve_base_model(config.base_model)


def measure_ours(components, config: TrainConfig, job, warmup: int, steps: int,
                 memory: MemoryMarks) -> tuple[list[float], float]:
    """fit() as `catalog train` runs it; a step's time is the gap between two progress calls
    (fit reads loss.item() before calling progress, so on CUDA the step has finished).
    The first step also holds fit()'s setup: encoding every photo and class image, adding the LoRA;
    its memory peak is kept apart from the later steps'."""
    from catalog_gen.train import training

    stamps: list[float] = [time.perf_counter()]

    def progress(step: int, loss: float, steps_per_second: float) -> None:
        if step == 1:  # before the stamp, so no timed step pays for reading the marks
            memory.close_phase("fit setup + step 1")
        stamps.append(time.perf_counter())
        _show_progress("ours", step, warmup + steps, stamps[-1] - stamps[-2])

    training.fit(components, config, job, "bench", resume=False, progress=progress)
    gaps = [later - earlier for earlier, later in zip(stamps, stamps[1:])]  # gaps[i] = step i + 1
    return gaps[warmup:], gaps[0]


def measure_floor(components, config: TrainConfig, job, warmup: int, steps: int,
                  memory: MemoryMarks) -> tuple[list[float], float]:
    """The least a LoRA step can cost: fixed inputs, no data, no encoders, no bookkeeping."""
    import torch
    import torch.nn.functional as F

    from catalog_gen.train import training

    optimizer_step = _lora_and_optimizer(components, config, job)
    # Encoded once from the real photos and prompts, so shapes and dtypes are fit()'s own.
    photos, prompts = _batch_paths(job, config, 0)
    pixels = torch.stack([training.load_image_tensor(p, config.resolution) for p in photos])
    mean, std = training.encode_latent_distribution(components, pixels)
    generator = torch.Generator().manual_seed(0)
    latents = training.sample_latents(components, mean, std, generator)
    noise = torch.randn(latents.shape, generator=generator).to(components.device)
    steps_total = components.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps_total, (latents.shape[0],), generator=generator).to(components.device)
    noisy = components.noise_scheduler.add_noise(latents, noise, timesteps).to(components.weight_dtype)
    with torch.no_grad():
        text, pooled = training.encode_text(components, training.tokenize(components, prompts))
    text, added = text.to(components.weight_dtype), training.added_conditioning(components, config.resolution, pooled)

    def step(_: int) -> None:
        with _autocast(components, config):
            prediction = components.unet(noisy, timesteps, text, added_cond_kwargs=added).sample
        optimizer_step(F.mse_loss(prediction.float(), noise.float()))

    return _time_loop("floor", step, components.device, warmup, steps)


def measure_baseline(components, config: TrainConfig, job, warmup: int, steps: int,
                     memory: MemoryMarks) -> tuple[list[float], float]:
    """diffusers' example loop: decode, VAE-encode, tokenize and text-encode on every step."""
    import torch
    import torch.nn.functional as F

    from catalog_gen.train import training

    optimizer_step = _lora_and_optimizer(components, config, job)
    vae, scheduler = components.vae, components.noise_scheduler

    def step(index: int) -> None:
        photos, prompts = _batch_paths(job, config, index)
        pixels = torch.stack([training.load_image_tensor(p, config.resolution) for p in photos])
        with torch.no_grad():
            latents = vae.encode(pixels.to(components.device, dtype=vae.dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        input_ids = training.tokenize(components, prompts)
        with _autocast(components, config):
            with torch.no_grad():
                text, pooled = training.encode_text(components, input_ids)
            prediction = components.unet(noisy.to(components.weight_dtype), timesteps, text.to(components.weight_dtype),
                                         added_cond_kwargs=training.added_conditioning(components, config.resolution,
                                                                                       pooled)).sample
        optimizer_step(F.mse_loss(prediction.float(), noise.float()))

    return _time_loop("baseline", step, components.device, warmup, steps)


def _lora_and_optimizer(components, config: TrainConfig, job) -> Callable:
    """The LoRA, optimizer and grad scaler fit() builds, and the update step fit() runs."""
    import torch

    from catalog_gen.train import training

    training._add_lora(components, config, job.instance_key)
    params = training._trainable(components.unet, "unet.")
    optimizer = training._make_optimizer(config, [{"params": list(params.values()), "lr": config.learning_rate}])
    scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None
    components.unet.train()

    def optimizer_step(loss) -> None:
        training.optimizer_step(loss, optimizer, scaler, list(params.values()), config.max_grad_norm)

    return optimizer_step


def _batch_paths(job, config: TrainConfig, index: int) -> tuple[list[Path], list[str]]:
    """The photos and prompts of step `index`: instance photos in turn, then class images."""
    n = config.batch_size
    photos = [job.photos[(index * n + k) % len(job.photos)] for k in range(n)]
    prompts = [job.instance_prompt] * n
    if config.prior_preservation:
        photos += [job.class_images[(index * n + k) % len(job.class_images)] for k in range(n)]
        prompts += [job.class_prompt] * n
    return photos, prompts


def _autocast(components, config: TrainConfig):
    import torch

    enabled = config.mixed_precision != "no"
    return torch.autocast(components.device.type, dtype=components.weight_dtype if enabled else None, enabled=enabled)


def _time_loop(kind: str, step: Callable[[int], None], device, warmup: int, steps: int) -> tuple[list[float], float]:
    """The timed steps after the warm-up, and the first step's time."""
    import torch

    seconds, first = [], None
    for index in range(warmup + steps):
        started = time.perf_counter()
        step(index)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # fit() syncs through loss.item(); so must the others
        took = time.perf_counter() - started
        first = took if first is None else first
        if index >= warmup:
            seconds.append(took)
        _show_progress(kind, index + 1, warmup + steps, took)
    return seconds, first


def _show_progress(kind: str, step: int, total: int, took: float) -> None:
    if step == total or total <= 20 or step % max(1, total // 10) == 0:
        print(f"[{kind}] step {step}/{total}: {took:.3f} s", flush=True)


def lora_trained(unet) -> bool:
    """LoRA B matrices start at zero: non-zero afterwards proves gradients reached them."""
    return any(bool(p.detach().abs().sum() > 0) for name, p in unet.named_parameters() if "lora_B" in name)


def _peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0) so the measuring phase gets its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
