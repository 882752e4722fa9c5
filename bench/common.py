"""What both benchmark scripts share: the entry point that maps errors to exit code 2,
and the check of the requested device before anything slow starts."""
from __future__ import annotations

import argparse
import sys
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


def pick_device(requested: str | None) -> str:
    """`requested`, or CUDA when torch sees a GPU, else the CPU; a clear error for a device that cannot run."""
    import torch

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise CatalogError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise CatalogError("--device cuda: torch sees no CUDA GPU on this machine")
    return device
