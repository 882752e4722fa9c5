"""What both benchmark scripts share: the entry point that maps errors to exit code 2,
and the check of the requested device before anything slow starts."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from catalog_gen.errors import CatalogError


def run_main(argv: list[str] | None, parse_args: Callable[[list[str]], argparse.Namespace],
             run_worker: Callable[[argparse.Namespace], None],
             run_bench: Callable[[argparse.Namespace, list[str]], None]) -> int:
    """The parent measures by starting one worker process per kind and round; `--worker` is that child."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        if args.worker:
            run_worker(args)
        else:
            run_bench(args, argv)
    except CatalogError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


REPO_ROOT = Path(__file__).resolve().parents[1]


def run_worker_process(module: str, kind: str, argv: list[str], job_file: Path, workdir: Path, tag: str,
                       extra_env: dict[str, str] | None = None) -> dict:
    """Measure one `kind` in a fresh process (`python -m module ... --worker kind`) and return its result.

    A fresh process per measurement: nothing one kind loaded or warmed up helps another. Progress
    lines go to stdout (shown live); library warnings to a log that is shown only on failure.
    """
    result_file = workdir / f"result-{kind}-{tag}.json"
    log_file = workdir / f"{kind}-{tag}.log"
    command = [sys.executable, "-m", module, *argv, "--worker", kind, "--job", str(job_file),
               "--result", str(result_file)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(extra_env or {})}
    with open(log_file, "w") as log:
        finished = subprocess.run(command, cwd=REPO_ROOT, env=env, stderr=log)
    if finished.returncode != 0 or not result_file.is_file():
        tail = log_file.read_text()[-4000:]
        raise CatalogError(f"the '{kind}' measurement failed (exit {finished.returncode}):\n{tail}")
    return json.loads(result_file.read_text())


def pick_device(requested: str | None) -> str:
    """`requested`, or CUDA when torch sees a GPU, else the CPU; a clear error for a device that cannot run."""
    import torch

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise CatalogError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise CatalogError("--device cuda: torch sees no CUDA GPU on this machine")
    return device
