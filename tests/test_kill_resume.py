"""A real `kill -9` in the middle of `catalog train`, then `catalog train --resume`.

Checkpoints are built under a temporary name and renamed, so the kill leaves complete
checkpoints and maybe one staging folder; the resumed run must carry on from the newest
complete one and end with exactly the adapter an uninterrupted run produces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from catalog_gen.train.adapters import read_adapter
from catalog_gen.train.checkpoints import list_checkpoints
from catalog_gen.config import METHODS, read_recipe
from catalog_gen.layout import caption_lora_checkpoint_folder, caption_lora_name

pytestmark = pytest.mark.slow

# ~33 steps/s on one thread of this 2-core machine when it is idle: the run lasts about three
# seconds past its first checkpoint (step 5), so the kill lands mid-run, and the whole test stays short
# (eight of them run: every method, SD 2.x and SDXL).
STEPS = 100
CATALOG = Path(sys.executable).parent / "catalog"


@pytest.fixture
def background():
    """Processes a test starts beside its own work; whatever is still running at the end is killed."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def _write_recipe(path: Path, method: str, base_model: str = "tiny") -> Path:
    """tiny_demo with a checkpoint every 5 steps and no validation images, for one method and base model."""
    values = {**read_recipe("tiny_demo", "train"), "checkpoint_every": 5, "validation_images": 0, "method": method,
              "base_model": base_model}
    path.write_text("[train]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    return path


def _train_command(sample_catalogue, workdir: Path, recipe: Path, *extra: str) -> list[str]:
    return [str(CATALOG), "train", "--class", "ring", "--instance", "band",
            "--photos", str(sample_catalogue.photos_dir), "--products", str(sample_catalogue.products_csv),
            "--workdir", str(workdir), "--recipe", str(recipe), "--steps", str(STEPS), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "CATALOG_GEN_CACHE": os.environ["CATALOG_GEN_CACHE"], "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _wait_for_a_checkpoint(process: subprocess.Popen, checkpoints: Path, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not any(checkpoints.glob("step-*/state.json")):
        if process.poll() is not None:
            pytest.fail(f"training ended (rc {process.returncode}) before its first checkpoint:\n"
                        f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no checkpoint after {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


# Every method: textual inversion and pivotal tuning resume their learned tokens too (where the reference
# scripts lose them).
@pytest.mark.parametrize(("method", "base_model"), [(method, "tiny") for method in METHODS]
                         + [("dreambooth-lora", "tiny-sd2"), ("dreambooth-lora", "tiny-sdxl")])
def test_kill_9_then_resume_gives_the_uninterrupted_adapter(method, base_model, sample_catalogue, tiny_model, tmp_path,
                                                           background):
    recipe = _write_recipe(tmp_path / "kill.toml", method, base_model)
    workdir = tmp_path / "killed"
    checkpoints = (caption_lora_checkpoint_folder(workdir, "ring", caption_lora_name(["band"]))
                   if method == "lora-captions" else workdir / "checkpoints" / "ring" / "band")
    adapter = workdir / "adapters" / "ring" / "band"
    # The same settings without interruption, run beside the killed one on the second core (one thread each, as
    # in every run here: the thread count changes how MKL sums, so it must match for bitwise equality).
    reference = tmp_path / "uninterrupted"
    with open(tmp_path / "uninterrupted.log", "w") as reference_log:
        uninterrupted = subprocess.Popen(_train_command(sample_catalogue, reference, recipe), env=_env(),
                                         stdout=reference_log, stderr=subprocess.STDOUT, cwd=tmp_path)
    background.append(uninterrupted)

    # 1. Start training and kill -9 it once a complete checkpoint is on disk.
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        process = subprocess.Popen(_train_command(sample_catalogue, workdir, recipe), env=_env(),
                                   stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            _wait_for_a_checkpoint(process, checkpoints, log)
            assert process.poll() is None, "the run finished before the kill: raise STEPS"
            os.kill(process.pid, signal.SIGKILL)
        finally:
            process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (adapter / "adapter.json").exists()

    # 2. Only complete checkpoints count: whatever else the kill left is ignored.
    complete = list_checkpoints(checkpoints)
    assert complete and complete[-1][0] < STEPS
    for step, folder in complete:
        assert folder.name == f"step-{step:06d}"
        assert json.loads((folder / "state.json").read_text())["step"] == step
        assert load_file(str(folder / "lora.safetensors")) and (folder / "optimizer.safetensors").is_file()
    left_over = sorted(p.name for p in checkpoints.iterdir() if p not in {f for _, f in complete})
    assert all(name == ".train.lock" or name.startswith(".step-") and name.endswith(".partial")
               for name in left_over), left_over
    # A staging folder caught mid-write, and a step folder without state.json, must never be resumed from.
    newest = complete[-1][0]
    staging = checkpoints / f".step-{newest + 5:06d}.kill9.partial"
    staging.mkdir()
    (staging / "state.json").write_text("{}")
    (checkpoints / "step-000999").mkdir()
    (checkpoints / "step-000999" / "lora.safetensors").write_bytes(b"half")
    assert list_checkpoints(checkpoints) == complete

    # 3. Resume: it carries on from the newest complete checkpoint to the end.
    resumed = subprocess.run(_train_command(sample_catalogue, workdir, recipe, "--resume"), env=_env(),
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-3000:]
    assert f"ring/band ({STEPS} steps" in resumed.stdout
    record = read_adapter(adapter).record
    assert record["steps"] == STEPS and len(record["loss_curve"]) == STEPS
    assert record["resumed_from_step"] == newest > 0
    assert "step-000999" not in record["checkpoints"] and record["checkpoints"][-1] == f"step-{STEPS:06d}"
    assert not staging.exists()  # the resumed run removed what the killed one left half written

    # 4. The uninterrupted run: the same adapter, bit for bit.
    assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "uninterrupted.log").read_text()[-3000:]
    expected = read_adapter(reference / "adapters" / "ring" / "band")
    assert expected.record.get("resumed_from_step") is None
    assert record["loss_curve"] == expected.record["loss_curve"]
    assert record["fingerprint"] == expected.record["fingerprint"]
    weight_files = [name for name in record["files"].values() if name]
    assert len(weight_files) == {"dreambooth-lora": 2, "textual-inversion": 1, "pivotal": 3, "dreambooth": 2,
                                 "lora-captions": 2, "two-stage": 2}[method]
    for name in weight_files:
        a, b = load_file(str(adapter / name)), load_file(str(expected.folder / name))
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[key], b[key]) for key in a), name
