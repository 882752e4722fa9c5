"""The sample catalogue: deterministic, covers the taxonomy, carries the odd files, survives intake."""

from __future__ import annotations

import csv
import re
import tomllib
from collections import defaultdict
from importlib import resources
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from catalog_gen.catalog import taxonomy
from catalog_gen.errors import CatalogError
from catalog_gen.catalog.intake import IntakeConfig, intake_photos
from catalog_gen.catalog.sample_data import SampleCatalogue, write_sample_catalogue
from catalog_gen.storage import sha256_file

TAXONOMY = tomllib.loads((resources.files("catalog_gen.class_maps") / "jewelry.toml").read_text("utf-8"))
ALL_INSTANCES = {(c, i) for c, spec in TAXONOMY["classes"].items() for i in spec["instances"]}


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> SampleCatalogue:
    return write_sample_catalogue(tmp_path_factory.mktemp("sample") / "catalogue", seed=0)


def photos_by_instance(cat: SampleCatalogue) -> dict[tuple[str, str], list[Path]]:
    """The photos grouped by the project's own title rules, as training groups them."""
    assigned = taxonomy.assign_from_products(cat.products_csv, cat.photos_dir, taxonomy.load_class_map("jewelry"))
    assert assigned.skipped == ()
    return assigned.groups()


def test_layout_and_csv_columns(catalogue):
    assert catalogue.photos_dir == catalogue.root / "photos"
    assert catalogue.products_csv.read_text("utf-8").splitlines()[0] == "sku,title,image"
    header = catalogue.skus_csv.read_text("utf-8").splitlines()[0]
    assert header == "sku,class,instance,n_images,seed,view,setting,metal"
    listed = {row["image"] for row in rows(catalogue.products_csv)}
    assert listed == {p.name for p in catalogue.photos_dir.iterdir()}  # every file listed, nothing extra
    assert all(re.fullmatch(r"[A-Z]{2}-[A-Z]{4}-\d{3}", row["sku"]) for row in rows(catalogue.products_csv))


def test_same_seed_same_bytes_other_seed_other_pictures(tmp_path, catalogue):
    again = write_sample_catalogue(tmp_path / "again", seed=0)
    assert again.products_csv.read_bytes() == catalogue.products_csv.read_bytes()
    assert again.skus_csv.read_bytes() == catalogue.skus_csv.read_bytes()
    assert again.odd_files == catalogue.odd_files
    for row in rows(catalogue.products_csv):
        name = row["image"]
        assert sha256_file(again.photos_dir / name) == sha256_file(catalogue.photos_dir / name)

    other = write_sample_catalogue(tmp_path / "other", seed=1, photos_per_instance=3)
    name = rows(catalogue.products_csv)[0]["image"]
    assert sha256_file(other.photos_dir / name) != sha256_file(catalogue.photos_dir / name)


def test_titles_resolve_to_every_class_and_instance(catalogue):
    class_map = taxonomy.load_class_map("jewelry")
    instance_of_sku = defaultdict(set)
    for row in rows(catalogue.products_csv):
        matched = taxonomy.match_title(row["title"], class_map)
        assert isinstance(matched, tuple), matched  # not a Skipped (unassigned / ambiguous)
        instance_of_sku[row["sku"]].add(matched)
    assert all(len(found) == 1 for found in instance_of_sku.values())  # a product is one instance
    assert set().union(*instance_of_sku.values()) == ALL_INSTANCES
    assert set(photos_by_instance(catalogue)) == ALL_INSTANCES
    titles = {row["title"] for row in rows(catalogue.products_csv)}
    assert "Beaded Hoop Earrings in Gold" in titles
    assert any(t.startswith("Charlotte Huggie Hoops") for t in titles)


def test_skus_csv_is_a_usable_generation_run(catalogue):
    jobs = rows(catalogue.skus_csv)
    assert len(jobs) >= 24
    assert {(j["class"], j["instance"]) for j in jobs} <= ALL_INSTANCES
    assert len({j["instance"] for j in jobs}) >= 5
    known_skus = {row["sku"] for row in rows(catalogue.products_csv)}
    for job in jobs:
        assert job["sku"] in known_skus
        assert int(job["n_images"]) > 0 and int(job["seed"]) >= 0
        assert job["view"] and job["setting"] and job["metal"] in ("gold", "silver", "rose gold")


def open_kind(path: Path) -> str:
    """What a file really is, read from its bytes (not from the catalogue's own notes)."""
    data = path.read_bytes()
    if not data:
        return "empty"
    try:
        with Image.open(path) as image:
            mode, fmt, size = image.mode, image.format, image.size
            orientation = image.getexif().get(0x0112, 1)
            corner_alpha = image.getpixel((0, 0))[3] if mode == "RGBA" else None
            image.load()
    except Image.UnidentifiedImageError:
        return "unidentified"
    except OSError:
        return "truncated"
    if size == (20, 20):
        return "tiny"
    if mode == "RGBA":
        return "transparent" if corner_alpha == 0 else "rgba"
    if orientation == 6:
        return "exif6"
    return {"CMYK": "cmyk", "I;16": "gray16", "I": "gray16"}.get(mode, f"{fmt}/{mode}")


def test_odd_files_are_present_listed_and_really_odd(catalogue):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    listed = {row["image"] for row in rows(catalogue.products_csv)}
    assert set(catalogue.odd_files) <= listed
    kinds = {name: open_kind(catalogue.photos_dir / name) for name in catalogue.odd_files}
    for wanted in ("transparent", "exif6", "cmyk", "gray16", "truncated", "unidentified", "tiny", "empty"):
        assert wanted in kinds.values(), f"no {wanted} file among {kinds}"

    # An exact duplicate (byte-identical, other name) and a near one (same picture, other bytes).
    hashes = defaultdict(list)
    for name in listed:
        hashes[sha256_file(catalogue.photos_dir / name)].append(name)
    assert any(len(names) == 2 for names in hashes.values())
    near = [n for n, note in catalogue.odd_files.items() if "re-saved" in note]
    assert len(near) == 1
    with Image.open(catalogue.photos_dir / near[0]) as image:
        assert image.format == "JPEG" and image.size != (256, 256)


def test_intake_keeps_at_least_three_photos_per_instance_and_refuses_the_bad_ones(catalogue):
    refusals = []
    for key, paths in photos_by_instance(catalogue).items():
        result = intake_photos(paths, catalogue.photos_dir, IntakeConfig(resolution=128))
        assert len(result.accepted) >= 3, f"{key}: only {len(result.accepted)} kept, refused {result.refused}"
        assert len(result.accepted) == 4, f"{key}: a good photo was refused: {result.refused}"
        refusals += [(r.source.name, r.reason) for r in result.refused]

    reasons = sorted(reason.split(" of ")[0] for _, reason in refusals)
    assert reasons == sorted(
        [
            "empty file",
            "exact duplicate",
            "near duplicate",
            "too small: 20x20 px, minimum 64 px",
            "truncated image",
            "unreadable image (cannot identify image file)",
        ]
    )
    assert {name for name, _ in refusals} <= set(catalogue.odd_files)


def test_bad_arguments_and_foreign_folders_are_refused(tmp_path):
    with pytest.raises(CatalogError, match="photos_per_instance 2"):
        write_sample_catalogue(tmp_path / "few", photos_per_instance=2)
    with pytest.raises(CatalogError, match="size 32"):
        write_sample_catalogue(tmp_path / "tiny", size=32)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(CatalogError, match="not a sample catalogue"):
        write_sample_catalogue(precious)
    assert (precious / "thesis.txt").read_text() == "do not delete"
