"""Why does prior preservation raise class drift on the toy world? `python -m bench.toy_prior_probe`.

Two DreamBooth-LoRA runs with prior preservation on the held-out ring/bold (the toy_demo recipe, 24 images
per set, the same base-model images as bench.toy_proof's claims part), one per suspect:
    prior-lr2.5e-3   the prior term doubles the gradient: half the learning rate
    prior-guidance4  the class images are drawn at the sampler's default guidance 7.5 while the toy recipe
                     samples at 4: draw them at 4 (by wrapping the sampler for that run only)
Prints class drift (1 - DINO cos between base and fine-tuned class-prompt images, same seeds) and DINO /
CLIP-I to the photos. Compare with the claims part's prior off / on rows. TOY WORLD figures, not SD.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from catalog_gen.toy import proof


def main(argv: list[str] | None = None) -> int:
    import torch

    from catalog_gen.models import sampling

    parser = argparse.ArgumentParser(prog="python -m bench.toy_prior_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/toy-prior-probe"), help="work and output folder")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    from bench.toy_claims import CLAIM_SAMPLER, CLAIM_TRAINING

    toolkit = proof.load_toolkit(sampler=CLAIM_SAMPLER)  # the claims part's setting, which it probes
    default = proof.Experiment(overrides=CLAIM_TRAINING)
    base = proof.base_sets(toolkit, default, proof.train(default, args.out, "claims-default").token)
    real_draw = sampling.draw

    def draw_at_guidance_4(pipeline, prompts, seeds, **settings):
        settings.setdefault("guidance", 4.0)
        return real_draw(pipeline, prompts, seeds, **settings)

    print("| run | class drift | DINO to photos | CLIP-I to photos |\n|---|---|---|---|")
    for name, overrides, wrap in (("prior-lr2.5e-3", (("prior_preservation", True), ("learning_rate", 2.5e-3)), False),
                                  ("prior-guidance4", (("prior_preservation", True),), True)):
        experiment = proof.Experiment(overrides=CLAIM_TRAINING + overrides)
        sampling.draw = draw_at_guidance_4 if wrap else real_draw
        try:
            adapter = proof.train(experiment, args.out, name)
        finally:
            sampling.draw = real_draw
        sets, _ = proof.learning_sets(toolkit, experiment, adapter, base=base)
        row = proof.learning_row(sets)
        print(f"| {name} | {row['class_drift']:.3f} | {row['dino_tuned']:.3f} | {row['clip_i_tuned']:.3f} |", flush=True)
    print(f"\n_Measured by `python -m bench.toy_prior_probe` in {time.perf_counter() - started:.0f} s (toy world)._")
    return 0


if __name__ == "__main__":
    sys.exit(main())
