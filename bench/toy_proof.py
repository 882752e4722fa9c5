"""Proof in numbers on the toy world: `python -m bench.toy_proof [--out DIR] [--parts ...]`.

Prints Markdown tables (and writes them with a JSON of every number to DIR/) for:
    base       zero-shot class accuracy of the toy CLIP, base-model images against sample photos
    embedders  same- vs other-instance ROC AUC of DINO and CLIP-I on the sample photos; noise and
               blank images through the calibrated nightly gates
    thresholds what the toy_nightly recipe's fixed CLIP-T and memorisation thresholds are derived from
    learning   DreamBooth-LoRA (the toy demo recipe) on held-out instances from 4 photos
    claims     the seed reports' claims: steps, rank, number of photos, token at inference, prior
               preservation, one measured row each with its sign

Every figure is from the TOY WORLD (catalog_gen/toy/MODEL_CARD.md), not from Stable Diffusion. Trained
adapters are kept in DIR, so a rerun only redraws and rescores. Measured part by part on 2 CPU cores:
base,embedders,thresholds 49 s, learning 442 s, claims 1165 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from catalog_gen.errors import CatalogError
from catalog_gen.toy import proof, world

PARTS = ("base", "embedders", "thresholds", "learning", "claims")
HELD_OUT_RUNS = (("ring", "bold"), ("hoops", "charlotte"), ("necklace", "pendant"))
BANNER = "TOY WORLD figures (a small model trained here on procedural drawings; not Stable Diffusion)"


def table(columns: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def part_base(toolkit: proof.Toolkit, results: dict) -> str:
    images, labels = proof.base_model_images(toolkit, per_class=24)
    photos, photo_labels = sample_photos(results["out"])
    rows = [["base-model images, class prompts (24 per class, 3 metals)", len(images),
             proof.zero_shot_accuracy(toolkit, images, labels)],
            ["sample catalogue photos (all 19 instances)", len(photos),
             proof.zero_shot_accuracy(toolkit, photos, [label.split("/")[0] for label in photo_labels])]]
    results["base"] = {"generated_accuracy": rows[0][2], "photo_accuracy": rows[1][2]}
    return "### Base model: zero-shot class accuracy of the toy CLIP (target >= 0.80)\n\n" + table(
        ["images", "n", "accuracy (4 classes)"], rows)


def sample_photos(out: Path) -> tuple[list, list[str]]:
    """The sample catalogue's usable photos at 64 px, with their class/instance, as intake leaves them."""
    from catalog_gen.catalog import intake
    from catalog_gen.catalog.sample_data import write_sample_catalogue
    from catalog_gen.train.workflow import PhotoSource, assign_photos

    sample = out / "sample"
    if not (sample / "products.csv").is_file():
        write_sample_catalogue(sample)
    source = PhotoSource(photos_dir=sample / "photos", products_csv=sample / "products.csv")
    photos, labels = [], []
    for (class_key, instance_key), paths in sorted(assign_photos(source).groups().items()):
        result = intake.intake_photos(paths, source.photo_root, intake.IntakeConfig(resolution=world.RESOLUTION))
        photos += [item.image for item in result.accepted]
        labels += [f"{class_key}/{instance_key}"] * len(result.accepted)
    return photos, labels


def part_embedders(toolkit: proof.Toolkit, results: dict) -> str:
    photos, labels = sample_photos(results["out"])
    rows = []
    for name, embedder in (("DINO", toolkit.dino), ("CLIP-I", toolkit.clip)):
        embeddings = embedder.embed_images(photos).numpy()
        found = proof.same_vs_other_auc(embeddings, labels)
        within = proof.same_vs_other_auc(embeddings, labels, within=[label.split("/")[0] for label in labels])
        rows.append([name, len(photos), found["same"], found["other"], found["auc"], within["auc"]])
    results["embedders"] = {row[0]: {"same": row[2], "other": row[3], "auc": row[4], "auc_within_class": row[5]}
                            for row in rows}
    text = ("### Embedders: same-instance against other-instance photo similarity (target AUC >= 0.9)\n\n"
            + table(["embedder", "photos", "mean cos same", "mean cos other", "ROC AUC", "AUC within class"], rows))
    # Noise and blank images against each instance's photos, through the calibrated gates.
    by_instance: dict[str, list] = {}
    for photo, label in zip(photos, labels):
        by_instance.setdefault(label, []).append(photo)
    gate_rows = []
    for kind, images in proof.noise_and_blank_images(8).items():
        passed = total = 0
        for label, reference in by_instance.items():
            class_key = label.split("/")[0]
            verdicts = proof.gate_verdicts(toolkit, images, reference, world.class_prompt(class_key))
            passed += sum(v.passed for v in verdicts)
            total += len(verdicts)
        gate_rows.append([kind, total, passed])
    results["gates_junk"] = {row[0]: {"scored": row[1], "passed": row[2]} for row in gate_rows}
    return text + "\n\n### Junk through the calibrated gates (each instance's photos as reference)\n\n" + table(
        ["images", "scored", "passed"], gate_rows)


def part_thresholds(toolkit: proof.Toolkit, results: dict) -> str:
    from catalog_gen.config import GenerateConfig, build_config, read_recipe

    photos, labels = sample_photos(results["out"])
    found = proof.threshold_evidence(toolkit, photos, labels)
    config = build_config(GenerateConfig, read_recipe(proof.NIGHTLY_RECIPE, "generate"), {}, origin=proof.NIGHTLY_RECIPE)
    results["thresholds"] = found
    rows = [["CLIP-T", "photos vs own class prompt (median)", found["clip_t_own_median"], config.min_clip_t],
            ["", "photos vs other classes' prompts (median)", found["clip_t_other_median"], ""],
            ["", "midpoint", found["clip_t_midpoint"], ""],
            ["memorisation (DINO)", "two photos of one product (max)", found["dino_same_product_max"],
             config.memorisation_dino],
            ["", "two photos of one product (median)", found["dino_same_product_median"], ""],
            ["", "a photo and its blurred copy (min)", found["dino_blurred_copy_min"], ""]]
    return (f"### Where the {proof.NIGHTLY_RECIPE} recipe's fixed thresholds come from ({len(photos)} sample photos)\n\n"
            + table(["gate", "measured", "value", "recipe threshold"], rows))


def part_learning(toolkit: proof.Toolkit, results: dict, instances=HELD_OUT_RUNS) -> str:
    rows, grids = [], []
    for class_key, instance_key in instances:
        experiment = proof.Experiment(class_key, instance_key)
        adapter = proof.train(experiment, results["out"], f"learning-{class_key}-{instance_key}")
        sets, images = proof.learning_sets(toolkit, experiment, adapter)
        row = proof.learning_row(sets)
        results.setdefault("learning", {})[f"{class_key}/{instance_key}"] = row
        rows.append([f"{class_key}/{instance_key}", "CLIP-I", row["clip_i_base"], row["clip_i_tuned"],
                     row["clip_i_real"], row["clip_i_gap_closed"], row["clip_i_fresh_base"], row["clip_i_fresh_tuned"]])
        rows.append(["", "DINO", row["dino_base"], row["dino_tuned"], row["dino_real"], row["dino_gap_closed"],
                     row["dino_fresh_base"], row["dino_fresh_tuned"]])
        rows.append(["", "KID to fresh photos (DINO features)", row["kid_photos_base"], row["kid_photos_tuned"], "",
                     row["kid_photos_base"] / max(row["kid_photos_tuned"], 1e-9), "", ""])
        grids.append((f"{class_key}/{instance_key}", [proof.open_rgb(p) for p in adapter.photo_paths], images))
    picture = results["out"] / "toy-learning.png"
    learning_grid(grids, picture)
    return ("### DreamBooth-LoRA on held-out instances, 4 photos (toy_demo recipe; "
            f"{proof.Experiment().images} images per set, same prompts and seeds)\n\n"
            "Gap closed = (fine-tuned - base) / (real-to-real - base), target >= 0.5; KID column 'gap closed' "
            "holds base / fine-tuned, target >= 2. 'fresh' = 32 new photos of the style, never trained on.\n\n"
            + table(["instance", "metric", "base", "fine-tuned", "real-to-real", "gap closed / ratio",
                     "fresh: base", "fresh: fine-tuned"], rows) + f"\n\nPicture: {picture}")


def learning_grid(grids, path: Path, per_row: int = 6) -> None:
    """Per instance three rows: training photos, base model, fine-tuned (same prompts and seeds)."""
    from PIL import Image, ImageDraw

    cell, label_width = world.RESOLUTION, 150
    lines = []
    for name, photos, images in grids:
        lines += [(f"{name}: photos", photos[:per_row]), ("base model", images["base"][:per_row]),
                  ("fine-tuned", images["tuned"][:per_row])]
    canvas = Image.new("RGB", (label_width + per_row * cell, len(lines) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for n, (label, images) in enumerate(lines):
        draw.text((4, n * cell + cell // 2 - 6), label, fill="black")
        for m, image in enumerate(images):
            canvas.paste(image.convert("RGB").resize((cell, cell)), (label_width + m * cell, n * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def part_claims(toolkit: proof.Toolkit, results: dict) -> str:
    from bench.toy_claims import claims_table

    return claims_table(toolkit, results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.toy_proof", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/toy-proof"), help="work and output folder")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        print(f"error: unknown part(s) {', '.join(sorted(set(parts) - set(PARTS)))}", file=sys.stderr)
        return 2
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        toolkit = proof.load_toolkit()
        results: dict = {"out": args.out}
        sections = [f"## {BANNER}"]
        for part in parts:
            section = globals()[f"part_{part}"](toolkit, results)
            print(section + "\n", flush=True)
            sections.append(section)
        footer = f"_Measured by `python -m bench.toy_proof --parts {args.parts}` in {time.perf_counter() - started:.0f} s._"
        print(footer)
        (args.out / "toy-proof.md").write_text("\n\n".join(sections + [footer]) + "\n")
        (args.out / "toy-proof.json").write_text(json.dumps({k: v for k, v in results.items() if k != "out"},
                                                            indent=2, default=float) + "\n")
    except CatalogError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
