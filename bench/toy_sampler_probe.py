"""A sampler probe on the toy world: `python -m bench.toy_sampler_probe [--out DIR]`.

DreamBooth-LoRA (toy_demo recipe at lr 2e-3, 300 steps, 4 photos) on the three held-out instances, each
adapter's images drawn with DPM++ 20 steps at guidance 4 (the earlier toy_nightly setting) and with DDPM
100 steps at guidance 3 (today's); the base model's images for the same prompts and seeds with the same
sampler. Prints the share of the base-to-real gap closed (CLIP-I and DINO to the training photos, as the
gates score them) and writes DIR/grid.png. 12 images per set, one thread. ring/bold and hoops/charlotte
were used to choose DDPM 100 / guidance 3; necklace/pendant was not, and is the check. TOY WORLD figures
(catalog_gen/toy/MODEL_CARD.md), not Stable Diffusion.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from catalog_gen.toy import proof

INSTANCES = (("necklace", "pendant"), ("ring", "bold"), ("hoops", "charlotte"))
SAMPLERS = (proof.Sampler("dpm++", 20, 4.0), proof.Sampler("ddpm", 100, 3.0))
TRAINING = (("learning_rate", 2e-3), ("steps", 300), ("checkpoint_every", 300))
IMAGES = 12


def gap_closed(toolkit: proof.Toolkit, experiment: proof.Experiment, adapter) -> tuple[dict, dict]:
    prompts, seeds = proof.prompts_for(experiment, adapter.token), list(range(experiment.images))
    images = {"base": proof.draw(toolkit, prompts, seeds), "tuned": proof.draw(toolkit, prompts, seeds, adapter.diffusers_file),
              "photos": [proof.open_rgb(path) for path in adapter.photo_paths]}
    sets = proof.embed_sets(toolkit, images)
    base, tuned, real = proof.likeness(sets, "base"), proof.likeness(sets, "tuned"), proof.real_level(sets)
    return {m: (tuned[m] - base[m]) / (real[m] - base[m]) for m in ("clip_i", "dino")}, images


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench.toy_proof import learning_grid, table

    parser = argparse.ArgumentParser(prog="python -m bench.toy_sampler_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/toy-sampler-probe"), help="work and output folder")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    toolkit = proof.load_toolkit()
    rows, grids = [], []
    for class_key, instance_key in INSTANCES:
        experiment = proof.Experiment(class_key, instance_key, overrides=TRAINING, images=IMAGES)
        adapter = proof.train(experiment, args.out, f"{class_key}-{instance_key}")
        for sampler in SAMPLERS:
            proof.use_sampler(toolkit, sampler)
            closed, images = gap_closed(toolkit, experiment, adapter)
            label = f"{sampler.scheduler} {sampler.steps} steps, guidance {sampler.guidance:g}"
            rows.append([f"{class_key}/{instance_key}", label, closed["clip_i"], closed["dino"]])
            grids.append((f"{class_key}/{instance_key} {sampler.scheduler}", images["photos"], images))
            print(" | ".join(str(v) for v in rows[-1]), flush=True)
    learning_grid(grids, args.out / "grid.png")
    print("\nTOY WORLD figures (not Stable Diffusion)\n")
    print(table(["instance", "sampler", "CLIP-I gap closed", "DINO gap closed"], rows))
    print(f"\n_Measured by `python -m bench.toy_sampler_probe` in {time.perf_counter() - started:.0f} s; "
          f"picture: {args.out / 'grid.png'}._")
    return 0


if __name__ == "__main__":
    sys.exit(main())
