"""The toy world's committed weights: written by pretrain.py's export, checked on every build.

    weights/toy-sd/     a diffusers StableDiffusionPipeline folder (fp16 safetensors)
    weights/toy-clip/   a transformers CLIPModel folder
    weights/toy-dino/   a transformers ViTModel folder (DINO layout: CLS of the last hidden state)
    weights/SHA256SUMS  `sha256sum -c` format, one line per file of the three folders
    weights/training_curves.json, weights/training-curves.png

`copy_checked(name, staging)` is what the `toy`, `toy-clip` and `toy-dino` presets build with: it
verifies every file against SHA256SUMS and refuses, naming the file and both hashes, on any change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib import resources
from pathlib import Path

from catalog_gen.errors import CatalogError
from catalog_gen.storage import sha256_file

FOLDERS = ("toy-sd", "toy-clip", "toy-dino")
SUMS = "SHA256SUMS"
RETRAIN = "python -m catalog_gen.toy.pretrain --out toy-pretrain"


def weights_root() -> Path:
    """The package's weights/, or $CATALOG_GEN_TOY_WEIGHTS (an export of your own retraining)."""
    configured = os.environ.get("CATALOG_GEN_TOY_WEIGHTS")
    return Path(configured) if configured else Path(str(resources.files("catalog_gen.toy"))) / "weights"


def expected_hashes(root: Path | None = None) -> dict[str, str]:
    """relative path -> sha256, from SHA256SUMS."""
    root = root or weights_root()
    sums = root / SUMS
    if not sums.is_file():
        raise CatalogError(f"the toy world's weights are missing ({sums} not found); reinstall catalog-gen "
                           f"from its repository, or retrain them with `{RETRAIN}`")
    table = {}
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        table[name] = digest
    return table


def weights_digest(root: Path | None = None) -> str:
    """Short hash of SHA256SUMS: names the cached copy, so new weights build a new folder."""
    root = root or weights_root()
    expected_hashes(root)
    return hashlib.sha256((root / SUMS).read_bytes()).hexdigest()[:12]


def copy_checked(folder: str, staging: Path, root: Path | None = None) -> None:
    """Copy weights/<folder>/ into `staging`, refusing any file whose sha256 differs from SHA256SUMS."""
    root = root or weights_root()
    table = expected_hashes(root)
    listed = {name for name in table if name.startswith(folder + "/")}
    if not listed:
        raise CatalogError(f"{root / SUMS} lists no files of {folder}/")
    for name in sorted(listed):
        source = root / name
        if not source.is_file():
            raise CatalogError(f"toy world: {source} is missing (listed in {SUMS}); retrain with `{RETRAIN}`")
        found = sha256_file(source)
        if found != table[name]:
            raise CatalogError(f"toy world: {name} has sha256 {found[:16]}..., {SUMS} records "
                               f"{table[name][:16]}...; the file was changed or damaged: restore it from the "
                               f"repository or retrain with `{RETRAIN}`")
        target = staging / Path(name).relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


# ---------------------------------------------------------------- export (pretrain.py's last stage)

def export(out: Path, ship_to: Path | None = None) -> Path:
    """Write the three shipped folders from a finished pretraining folder, then their hashes."""
    import torch

    from catalog_gen.models.embedder_presets import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD,
                                              preprocessor_config)
    from catalog_gen.models.presets import save_pipeline, save_transformers_model
    from catalog_gen.toy import architecture, pretrain

    root = ship_to or weights_root()
    for stage in ("vae", "clip", "dino", "unet"):
        if not (out / stage / "checkpoint.pt").is_file():
            raise CatalogError(f"{out}: stage '{stage}' has no checkpoint; run pretrain first")
        if not pretrain.Stage(out, stage).done:
            raise CatalogError(f"{out}: stage '{stage}' has not finished its {pretrain.PLANS[stage].steps} steps; "
                               "run pretrain again to finish it (it resumes)")
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    def state(stage: str) -> dict:
        return torch.load(out / stage / "checkpoint.pt", map_location="cpu", weights_only=True)["modules"]

    tokenizer_dir = out / "tokenizer"
    tok = pretrain.tokenizer(out)
    # 1. The Stable Diffusion folder: EMA UNet, jointly trained text encoder, VAE with its latent scale.
    vae = architecture.make_vae()
    vae.load_state_dict(state("vae")["vae"])
    cache = torch.load(out / "unet-latents.pt", weights_only=True)
    vae.register_to_config(scaling_factor=round(float(cache["scaling_factor"]), 5))
    unet, text_encoder = architecture.make_unet(), architecture.make_text_encoder(tok)
    unet_state = state("unet")
    unet.load_state_dict(unet_state["ema"])
    text_encoder.load_state_dict(unet_state["text_encoder"])
    save_pipeline(staging / "toy-sd", unet, vae, text_encoder, tokenizer_dir, torch.float16)
    # 2. The embedders, in the layout of openai/clip-vit-base-patch32 and facebook/dino-vits16.
    clip = architecture.make_clip(tok)
    clip.load_state_dict(state("clip")["clip"])
    save_transformers_model(clip.half(), staging / "toy-clip")
    size = architecture.EMBEDDER_IMAGE
    _write_json(staging / "toy-clip" / "preprocessor_config.json",
                preprocessor_config("CLIPImageProcessor", CLIP_MEAN, CLIP_STD, size))
    for source in sorted(tokenizer_dir.iterdir()):
        shutil.copyfile(source, staging / "toy-clip" / source.name)
    dino = architecture.make_dino()
    dino.load_state_dict(state("dino")["dino"])
    save_transformers_model(dino.half(), staging / "toy-dino")
    _write_json(staging / "toy-dino" / "preprocessor_config.json",
                preprocessor_config("ViTImageProcessor", IMAGENET_MEAN, IMAGENET_STD, size))
    # 3. Curves, then the hashes of everything the presets copy.
    _write_curves(out, staging)
    lines = [f"{sha256_file(path)}  {path.relative_to(staging).as_posix()}"
             for folder in FOLDERS for path in sorted((staging / folder).rglob("*")) if path.is_file()]
    (staging / SUMS).write_text("\n".join(lines) + "\n")
    if root.exists():
        shutil.rmtree(root)
    staging.rename(root)
    total = sum(path.stat().st_size for path in root.rglob("*") if path.is_file())
    print(f"export: {root} ({total / 1e6:.1f} MB)", flush=True)
    return root


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _write_curves(out: Path, staging: Path) -> None:
    curves = {}
    for stage in ("vae", "clip", "dino", "unet"):
        rows = [json.loads(line) for line in (out / stage / "log.jsonl").read_text().splitlines() if line.strip()]
        # A resumed stage logs its steps again from the checkpoint on: keep the last value per step.
        by_step = {row["step"]: row for row in rows}
        curves[stage] = [by_step[step] for step in sorted(by_step)]
    _write_json(staging / "training_curves.json", curves)
    from matplotlib.figure import Figure  # no pyplot: nothing global is switched

    figure = Figure(figsize=(12, 3))
    for axis, (stage, rows) in zip(figure.subplots(1, 4), curves.items()):
        axis.plot([row["step"] for row in rows], [row["loss"] for row in rows])
        axis.set_title(f"toy {stage}: training loss")
        axis.set_xlabel("step")
        axis.set_yscale("log")
    figure.tight_layout()
    figure.savefig(staging / "training-curves.png", dpi=80)
