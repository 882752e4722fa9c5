"""Several instances trained by two CPU processes under `accelerate launch`.

Each process takes every other instance (prepared[rank::world_size]); because every random
draw is seeded per (seed, instance, step), an adapter does not depend on which process
trained it, so the two-process run must equal a single-process run bit for bit.

How to launch several CPU processes with accelerate 1.x on one machine: `--cpu` alone runs
ONE process (its launcher only fans out through mpirun with --mpirun_hostfile), so this uses
the torchrun launcher (`--multi_gpu`), which on a machine without CUDA starts plain CPU
processes that join a gloo group (train_class asks PartialState for cpu=True there).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from catalog_gen.train.adapters import read_adapter
from catalog_gen.train.checkpoints import list_checkpoints
from catalog_gen.config import TrainConfig, build_config, read_recipe
from catalog_gen.train.workflow import PhotoSource, train_class

pytestmark = pytest.mark.slow

INSTANCES = ["band", "bold", "dome", "signet"]
STEPS = 3
BIN = Path(sys.executable).parent


@pytest.fixture
def one_torch_thread():
    """Train on one intra-op thread, as every launched process does (torchrun sets OMP_NUM_THREADS=1).

    The thread count changes how MKL sums, so it must match for bitwise equality; and on a
    shared 2-core machine two spinning OpenMP threads make a step many times slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CATALOG_GEN_CACHE=os.environ["CATALOG_GEN_CACHE"],  # the session's presets: never rebuilt
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf-home"),  # no stray accelerate default_config.yaml is read
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def _launch_two_processes(sample_catalogue, workdir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    command = [
        str(BIN / "accelerate"), "launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "0",  # a free port: tests may run side by side
        "--tee", "1", "--log_dir", str(tmp_path / "launch-logs"),  # stdout lines prefixed [default<rank>]:
        "-m", "catalog_gen.cli.main", "train", "--class", "ring",
        *[arg for name in INSTANCES for arg in ("--instance", name)],
        "--photos", str(sample_catalogue.photos_dir), "--products", str(sample_catalogue.products_csv),
        "--workdir", str(workdir), "--recipe", "tiny_demo", "--steps", str(STEPS),
    ]
    return subprocess.run(command, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)


def _trained_by_rank(stdout: str) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for rank, instance in re.findall(r"^\[default(\d+)\]:trained\s+ring/(\w+) ", stdout, flags=re.MULTILINE):
        found.setdefault(int(rank), []).append(instance)
    return found


def test_two_processes_split_the_instances_and_match_one_process(sample_catalogue, tiny_model, tmp_path,
                                                                 one_torch_thread):
    workdir = tmp_path / "two"
    result = _launch_two_processes(sample_catalogue, workdir, tmp_path)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"

    # Each process trained its own share, every instance exactly once.
    by_rank = _trained_by_rank(result.stdout)
    assert by_rank == {0: ["band", "dome"], 1: ["bold", "signet"]}, result.stdout
    assert result.stdout.count("2 trained, 0 already trained, 0 failed") == 2
    for instance in INSTANCES:
        info = read_adapter(workdir / "adapters" / "ring" / instance)
        assert info.diffusers_file.is_file() and info.kohya_file.is_file()
        assert info.record["steps"] == STEPS and info.record["resumed_from_step"] is None
        assert [s for s, _ in list_checkpoints(workdir / "checkpoints" / "ring" / instance)] == [STEPS]

    # The same settings in one process give the same adapters, bit for bit.
    single = tmp_path / "one"
    config = build_config(TrainConfig, read_recipe("tiny_demo", "train"), {"steps": STEPS})
    source = PhotoSource(photos_dir=sample_catalogue.photos_dir, products_csv=sample_catalogue.products_csv)
    summary = train_class(source, "ring", INSTANCES, single, config)
    assert [o.status for o in summary.outcomes] == ["trained"] * len(INSTANCES)
    for instance in INSTANCES:
        two = read_adapter(workdir / "adapters" / "ring" / instance)
        one = read_adapter(single / "adapters" / "ring" / instance)
        assert two.record["token"] == one.record["token"]
        assert two.record["loss_curve"] == one.record["loss_curve"]
        a, b = load_file(str(two.diffusers_file)), load_file(str(one.diffusers_file))
        assert a.keys() == b.keys() and a
        different = [key for key in a if not torch.equal(a[key], b[key])]
        assert not different, f"ring/{instance}: {len(different)} tensors differ, e.g. {different[0]}: " \
            f"max |diff| {(a[different[0]] - b[different[0]]).abs().max().item():.3g}"


def test_two_processes_share_a_sweep_and_match_one_process(sample_catalogue, tiny_model, tmp_path, one_torch_thread):
    import json

    import polars as pl

    from catalog_gen.evaluate.evaluation import EvalConfig
    from catalog_gen.evaluate.sweep import run_sweep

    grid = "steps=4,8"
    command = [
        str(BIN / "accelerate"), "launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "catalog_gen.cli.main", "sweep", "--class", "ring", "--instance", "band", "--name", "two",
        "--photos", str(sample_catalogue.photos_dir), "--products", str(sample_catalogue.products_csv),
        "--workdir", str(tmp_path / "two"), "--recipe", "tiny_sweep", "--grid", grid,
    ]
    result = subprocess.run(command, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    two = pl.read_parquet(tmp_path / "two" / "sweeps" / "two" / "results.parquet").sort("axis_steps")
    assert two["axis_steps"].to_list() == [4, 8]
    points = sorted((tmp_path / "two" / "sweeps" / "two" / "points").glob("*/result.json"))
    assert [json.loads(p.read_text())["point"]["steps"] for p in points] != [] and len(points) == 2

    # One process, same grid: the same adapters and so the same scores (each point is seeded on its own).
    train = build_config(TrainConfig, read_recipe("tiny_sweep", "train"), {})
    evaluation = build_config(EvalConfig, read_recipe("tiny_sweep", "eval"), {})
    source = PhotoSource(photos_dir=sample_catalogue.photos_dir, products_csv=sample_catalogue.products_csv)
    out = run_sweep(source, "ring", "band", tmp_path / "one", "one", {"steps": [4, 8]}, train, evaluation)
    one = pl.read_parquet(out / "results.parquet").sort("axis_steps")
    for metric in ("kid_photos", "clip_i", "dino", "clip_t"):
        assert one[metric].to_list() == pytest.approx(two[metric].to_list(), rel=1e-5, abs=1e-7), metric
