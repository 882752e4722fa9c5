"""A learning-rate probe on the toy world: `python -m bench.toy_lr_probe [--out DIR]`.

DreamBooth-LoRA on two held-out instances (ring/bold, hoops/charlotte; 4 photos) at lr 2e-3 for 300
steps and lr 1e-3 for 600 steps, beside the toy_demo recipe's 5e-3 / 300 (bench.toy_proof's learning
part). Prints the share of the base-to-real gap closed (CLIP-I, DINO) and KID to 16 fresh photos, and
writes DIR/grid.png (photos, base model, fine-tuned). 12 images per set, one thread. TOY WORLD figures
(catalog_gen/toy/MODEL_CARD.md), not Stable Diffusion.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from catalog_gen.toy import proof

INSTANCES = (("ring", "bold"), ("hoops", "charlotte"))
SETTINGS = ((2e-3, 300), (1e-3, 600))
SAMPLER = proof.Sampler("dpm++", 20, 4.0)
"""The toy_nightly sampler when this probe was measured (it is DDPM 100 / guidance 3 since bench.toy_sampler_probe)."""


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench.toy_proof import learning_grid, table

    parser = argparse.ArgumentParser(prog="python -m bench.toy_lr_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/toy-lr-probe"), help="work and output folder")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    toolkit = proof.load_toolkit(sampler=SAMPLER)
    rows, grids = [], []
    for class_key, instance_key in INSTANCES:
        for lr, steps in SETTINGS:
            experiment = proof.Experiment(class_key, instance_key, images=12, reference_photos=16, overrides=(
                ("learning_rate", lr), ("steps", steps), ("checkpoint_every", steps)))
            name = f"{class_key}-{instance_key}-lr{lr}-s{steps}"
            adapter = proof.train(experiment, args.out, name)
            sets, images = proof.learning_sets(toolkit, experiment, adapter)
            row = proof.learning_row(sets)
            rows.append([f"{class_key}/{instance_key}", f"{lr:g}", steps, row["clip_i_gap_closed"],
                         row["dino_gap_closed"], f"{row['kid_photos_base']:.4f} -> {row['kid_photos_tuned']:.4f}"])
            grids.append((name, [proof.open_rgb(p) for p in adapter.photo_paths], images))
            print(" | ".join(str(v) for v in rows[-1]), flush=True)
    learning_grid(grids, args.out / "grid.png")
    print("\nTOY WORLD figures (not Stable Diffusion)\n")
    print(table(["instance", "lr", "steps", "CLIP-I gap closed", "DINO gap closed", "KID to fresh photos"], rows))
    print(f"\n_Measured by `python -m bench.toy_lr_probe` in {time.perf_counter() - started:.0f} s; "
          f"picture: {args.out / 'grid.png'}._")
    return 0


if __name__ == "__main__":
    sys.exit(main())
