"""Resumable training checkpoints, in safetensors and JSON only (no pickle).

A checkpoint folder `step-000050/` holds:
    lora.safetensors       every trainable tensor, by parameter name
    optimizer.safetensors  the optimizer state, flattened to "<param index>/<state key>[/...]"
    state.json             step, loss history, optimizer param groups, grad-scaler scale,
                           the training fingerprint it belongs to, timings
It is built under a temporary name and renamed, so a kill -9 leaves either a complete
checkpoint or none. All randomness is derived from (seed, step), so loading the latest
checkpoint and going on gives the same adapter as a run that was never interrupted.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from catalog_gen.errors import CatalogError
from catalog_gen.storage import atomic_directory, atomic_write_json

_STEP_DIR = re.compile(r"^step-(\d{6})$")
LORA_FILE = "lora.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
VALIDATION_DIR = "validation"


@dataclass
class TrainingState:
    """What the loop needs besides the weights to carry on exactly where it stopped."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    grad_scale: float | None = None
    seconds: float = 0.0


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def save_checkpoint(root: Path, trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    state: TrainingState, fingerprint: str, extra: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    folder = root / checkpoint_name(state.step)
    tensors, scalars = _flatten_optimizer_state(optimizer)
    with atomic_directory(folder) as staging:
        save_file({name: p.detach().float().cpu().contiguous() for name, p in trainable.items()},
                  str(staging / LORA_FILE))
        save_file(tensors, str(staging / OPTIMIZER_FILE))
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
        atomic_write_json(staging / STATE_FILE, {
            "step": state.step,
            "losses": state.losses,
            "grad_scale": state.grad_scale,
            "seconds": state.seconds,
            "fingerprint": fingerprint,
            "optimizer_scalars": scalars,
            "param_groups": groups,
            **(extra or {}),
        })
    return folder


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file; a damaged one is a one-line error naming it, not a traceback."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # SafetensorError, OSError: not a safetensors file, truncated, missing
        raise CatalogError(f"checkpoint file {path} cannot be read ({error}); delete that step-* folder to "
                           "resume from the one before, or pass --force to start this instance over") from error


def load_checkpoint(folder: Path, trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    fingerprint: str) -> TrainingState:
    try:
        meta = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as error:
        raise CatalogError(f"checkpoint {folder}: unreadable state.json ({error})") from error
    if meta.get("fingerprint") != fingerprint:
        raise CatalogError(
            f"checkpoint {folder} was made with different training settings or photos; "
            "resume with the same recipe, or pass --force to start this instance over"
        )
    weights, optimizer_state = _load_tensors(folder / LORA_FILE), _load_tensors(folder / OPTIMIZER_FILE)
    missing = sorted(set(trainable) - set(weights))
    if missing:
        raise CatalogError(f"checkpoint {folder}: lora.safetensors lacks {len(missing)} tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(weights[name].to(param.dtype))
    _restore_optimizer_state(optimizer, optimizer_state, meta)
    return TrainingState(step=meta["step"], losses=list(meta["losses"]), grad_scale=meta.get("grad_scale"),
                         seconds=float(meta.get("seconds", 0.0)))


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0 keeps all: `catalog eval` reads every one)."""
    if keep <= 0:
        return
    for _, folder in list_checkpoints(root)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)


def _flatten_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split the optimizer state into tensors and JSON scalars, keyed by their path.

    The state is nested (bitsandbytes keeps its quantisation maps in a dict per
    parameter), so paths are joined with "/": "3/exp_avg", "3/<quant state>/absmax1".
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}/{key}", inner)
        elif torch.is_tensor(value):
            tensors[prefix] = value.detach().cpu().contiguous()
        else:
            scalars[prefix] = value

    for index, values in optimizer.state_dict()["state"].items():
        walk(str(index), values)
    return tensors, scalars


def _restore_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for path, value in list(tensors.items()) + list(meta["optimizer_scalars"].items()):
        index, *keys = path.split("/")
        node = state.setdefault(int(index), {})
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    current = optimizer.state_dict()
    groups = []
    for saved, live in zip(meta["param_groups"], current["param_groups"]):
        groups.append({**saved, "params": live["params"]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def checkpoint_lora(folder: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A checkpoint's trainable tensors (raw parameter names) and the LoRA configs stored beside them
    (None for checkpoints written before they were)."""
    meta = json.loads((Path(folder) / STATE_FILE).read_text())
    return _load_tensors(Path(folder) / LORA_FILE), meta.get("lora_configs")
