"""lora-captions: where each photo's caption comes from, what is said about fallbacks, and one caption-based
LoRA over several instances, end to end on the tiny preset."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from catalog_gen.catalog import captions
from catalog_gen.catalog.taxonomy import assign_from_products, load_class_map
from catalog_gen.errors import CatalogError


# ---------------------------------------------------------------- caption sources (pure, fast)

def test_a_caption_comes_from_the_first_source_that_has_one(tmp_path):
    photo = tmp_path / "ring.jpg"
    assert captions.caption_for(photo, "  gold  band\n", "Band Ring", "photo of a band ring") == \
        captions.Caption("gold band", "column")
    assert captions.caption_for(photo, None, "Band Ring", "photo of a band ring") == captions.Caption("Band Ring", "title")
    assert captions.caption_for(photo, "", "", "photo of a band ring") == \
        captions.Caption("photo of a band ring", "instance prompt")
    (tmp_path / "ring.txt").write_text("\ufeffa thin band ring,\n on marble\n")  # kohya's <photo>.txt, BOM and all
    assert captions.caption_for(photo, None, "Band Ring", "x") == captions.Caption("a thin band ring, on marble",
                                                                                   "caption file")
    assert captions.caption_for(photo, "from the sheet", "Band Ring", "x").source == "column"
    (tmp_path / "ring.txt").write_text(" \n ")  # a blank caption file is no caption
    assert captions.caption_for(photo, None, "Band Ring", "x").source == "title"


def test_a_caption_file_that_is_not_a_caption_is_named(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CatalogError, match=r"caption file .*a\.txt: not UTF-8"):
        captions.caption_for(tmp_path / "a.png", None, None, "x")
    (tmp_path / "b.txt").write_text("word " * 5000)
    with pytest.raises(CatalogError, match=r"caption file .*b\.txt: 25000 bytes is not a caption"):
        captions.caption_for(tmp_path / "b.png", None, None, "x")
    # A photo captioned by its sheet cell does not have its caption file read at all.
    assert captions.caption_for(tmp_path / "b.png", "from the sheet", None, "x").source == "column"


def test_fallback_notes_name_the_photos_and_what_captioned_them():
    found = [captions.Caption("a", "column"), captions.Caption("b", "caption file"), captions.Caption("T", "title"),
             captions.Caption("T", "title"), captions.Caption("p", "instance prompt")]
    photos = ["/p/1.jpg", "/p/2.jpg", "/p/3.jpg", "/p/4.jpg", "/p/5.jpg"]
    assert captions.fallback_notes("ring/band", photos, found, column_given=True) == [
        "ring/band: 1 of 5 photos have an empty caption cell; captioned by their caption file instead: 2.jpg",
        "ring/band: 2 of 5 photos have no caption cell and no caption file; captioned by their title instead: "
        "3.jpg, 4.jpg",
        "ring/band: 1 of 5 photos have no caption cell, caption file or title; captioned by their instance prompt "
        "instead: 5.jpg"]
    # Without a caption column a photo's own caption is its caption file.
    own = [captions.Caption("b", "caption file")] * 3
    assert captions.fallback_notes("ring/band", photos[:3], own, column_given=False) == []
    many = [captions.Caption("T", "title")] * 7
    [note] = captions.fallback_notes("ring/band", [f"/p/{n}.jpg" for n in range(7)], many, column_given=False)
    assert note.endswith("have no caption file; captioned by their title instead: 0.jpg, 1.jpg, 2.jpg, 3.jpg, "
                         "4.jpg and 2 more")


def test_the_products_csv_caption_column_is_read_per_photo(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    products = tmp_path / "products.csv"
    products.write_text("sku,title,image,caption\nR1,Band Ring,a.png,a thin gold band\nR2,Band Ring,b.png,\n")
    result = assign_from_products(products, tmp_path, load_class_map("jewelry"), min_photos=1)
    assert result.caption_column
    assert {a.image.name: a.caption for a in result.assignments} == {"a.png": "a thin gold band", "b.png": None}
    products.write_text("sku,title,image\nR1,Band Ring,a.png\n")
    assert not assign_from_products(products, tmp_path, load_class_map("jewelry"), min_photos=1).caption_column


def test_the_plain_prompt_has_no_identifier_token():
    hoops = load_class_map("jewelry").get_class("hoops")
    assert hoops.plain_prompt_for("easy_daily") == "photo of a pair of easy daily hoops"
    with pytest.raises(CatalogError, match="unknown instance 'nope' in class 'hoops'"):
        hoops.plain_prompt_for("nope")


# ---------------------------------------------------------------- one LoRA over several instances (slow)

def _captioned_catalogue(sample_catalogue, folder: Path) -> tuple[Path, Path]:
    """A copy of the sample photos and a products.csv with a caption column: band's photos captioned but one
    (which has a <photo>.txt beside it instead), signet's left empty (their titles caption them)."""
    import shutil

    photos = shutil.copytree(sample_catalogue.photos_dir, folder / "photos")
    rows = list(csv.DictReader(sample_catalogue.products_csv.open()))
    band = [row for row in rows if row["sku"].startswith("RG-BAND")]
    for number, row in enumerate(band):
        row["caption"] = f"photo of a band ring, plain polished metal, view {number}" if number else ""
    (photos / Path(band[0]["image"]).with_suffix(".txt")).write_text("photo of a band ring from its caption file")
    out = folder / "products.csv"
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["sku", "title", "image", "caption"], lineterminator="\n")
        writer.writeheader()
        writer.writerows({"caption": "", **row} for row in rows)
    return photos, out


@pytest.fixture(scope="module")
def caption_lora(sample_catalogue, tmp_path_factory):
    from catalog_gen.train.workflow import PhotoSource, train_class
    from test_methods import method_config

    folder = tmp_path_factory.mktemp("captions")
    photos, products = _captioned_catalogue(sample_catalogue, folder)
    source = PhotoSource(photos_dir=photos, products_csv=products)
    config = method_config("lora-captions", checkpoint_every=3, validation_images=0)
    summary = train_class(source, "ring", ["band", "signet"], folder / "work", config)
    return source, config, folder / "work", summary


@pytest.mark.slow
def test_one_lora_learns_every_instance_from_its_captions(caption_lora):
    from catalog_gen.train.adapters import read_adapter

    source, config, workdir, summary = caption_lora
    assert [(o.key, o.status) for o in summary.outcomes] == [
        ("ring/caption-lora (band+signet)", "trained"), ("ring/band", "trained"), ("ring/signet", "trained")]
    shared = read_adapter(workdir / "caption_loras" / "ring" / "band+signet")
    band, signet = (read_adapter(workdir / "adapters" / "ring" / i) for i in ("band", "signet"))
    # One LoRA: both instances' folders hold its very file.
    for info in (band, signet):
        assert info.diffusers_file.read_bytes() == shared.diffusers_file.read_bytes()
        assert info.record["weights_sha256"] == shared.record["weights_sha256"]
        assert info.record["caption_lora"] == {"folder": "caption_loras/ring/band+signet", "name": "band+signet",
                                               "instances": ["band", "signet"],
                                               "weights_sha256": shared.record["weights_sha256"]}
        assert info.record["method"] == "lora-captions" and info.tokens == [] and info.token == ""
        assert info.checkpoint_dir == workdir / "checkpoints" / "ring" / "caption-lora-band+signet"
    # Each instance keeps its own photos (its gates' references) and is prompted without an identifier.
    assert band.record["instance_prompt"] == "photo of a band ring"
    assert {p["source"] for p in band.record["photos"]} | {p["source"] for p in signet.record["photos"]} == \
        {p["source"] for p in shared.record["photos"]}
    assert not {p["source"] for p in band.record["photos"]} & {p["source"] for p in signet.record["photos"]}
    # Every photo's caption and where it came from, as trained on.
    band_sources = [p["caption_source"] for p in band.record["photos"]]
    assert band_sources[0] == "caption file" and set(band_sources[1:]) == {"column"}
    assert band.record["photos"][0]["caption"] == "photo of a band ring from its caption file"
    titles = {Path(row["image"]).name: row["title"] for row in csv.DictReader(source.products_csv.open())}
    assert {p["caption_source"] for p in signet.record["photos"]} == {"title"}
    assert [p["caption"] for p in signet.record["photos"]] == [titles[Path(p["source"]).name]
                                                                for p in signet.record["photos"]]
    # The fallbacks are said, naming the photos.
    first = Path(band.record["photos"][0]["source"]).name
    assert summary.notes == [
        f"ring/band: 1 of 4 photos have an empty caption cell; captioned by their caption file instead: {first}",
        "ring/signet: 4 of 4 photos have no caption cell and no caption file; captioned by their title instead: "
        + ", ".join(Path(p["source"]).name for p in signet.record["photos"])]


@pytest.mark.slow
def test_the_captions_are_what_it_learns_from(caption_lora, sample_catalogue, tmp_path):
    """The same photos, steps and seeds with the titles as every caption (the plain sample CSV) end in another
    LoRA; a rerun with nothing changed trains nothing."""
    from catalog_gen.train.adapters import read_adapter
    from catalog_gen.train.workflow import PhotoSource, train_class

    source, config, workdir, _ = caption_lora
    again = train_class(source, "ring", ["band", "signet"], workdir, config)
    assert [o.status for o in again.outcomes] == ["already trained"] * 3
    titles = PhotoSource(photos_dir=sample_catalogue.photos_dir, products_csv=sample_catalogue.products_csv)
    train_class(titles, "ring", ["band", "signet"], tmp_path, config)
    ours, theirs = (load_file(str(read_adapter(w / "adapters" / "ring" / "band").diffusers_file))
                    for w in (workdir, tmp_path))
    assert ours.keys() == theirs.keys() and any(not torch.equal(ours[k], theirs[k]) for k in ours)
    assert read_adapter(workdir / "adapters" / "ring" / "band").record["fingerprint"] != \
        read_adapter(tmp_path / "adapters" / "ring" / "band").record["fingerprint"]


@pytest.mark.slow
def test_a_caption_lora_loads_in_plain_diffusers_and_detach_restores_the_base(caption_lora, tiny_model):
    from catalog_gen.models.loading import load_pipeline
    from catalog_gen.models.sampling import draw
    from catalog_gen.train.adapters import adapter_weights, attach, detach, read_adapter

    _, _, workdir, _ = caption_lora
    band = read_adapter(workdir / "adapters" / "ring" / "band")
    pipeline = load_pipeline(tiny_model, "cpu")

    def image():
        return np.asarray(draw(pipeline, [band.record["instance_prompt"]], [3], steps=3, resolution=64)[0])

    base = image()
    pipeline.load_lora_weights(str(band.folder), weight_name=band.diffusers_file.name, adapter_name="plain")
    plain = image()
    pipeline.unload_lora_weights()
    assert not np.array_equal(plain, base)
    attached = attach(pipeline, adapter_weights(band), "ours")
    assert np.array_equal(image(), plain)  # the generator draws what plain diffusers draws
    detach(pipeline, attached)
    assert np.array_equal(image(), base)


@pytest.mark.slow
def test_a_caption_lora_for_another_set_of_instances_leaves_the_first_in_place(caption_lora, tmp_path):
    """Training band alone after band+signet writes another caption LoRA (named by its instances): signet's
    adapter still points at, and holds, the one it was trained in."""
    import shutil

    from catalog_gen.train.adapters import read_adapter
    from catalog_gen.train.workflow import train_class

    source, config, workdir, _ = caption_lora
    copy = tmp_path / "work"
    shutil.copytree(workdir, copy)
    summary = train_class(source, "ring", ["band"], copy, config)
    assert [(o.key, o.status) for o in summary.outcomes] == [("ring/caption-lora (band)", "trained"),
                                                             ("ring/band", "trained")]
    band, signet = (read_adapter(copy / "adapters" / "ring" / i) for i in ("band", "signet"))
    assert band.record["caption_lora"]["name"] == "band"
    assert signet.record["caption_lora"]["name"] == "band+signet"
    assert signet.diffusers_file.read_bytes() == (copy / "caption_loras/ring/band+signet" /
                                                  signet.diffusers_file.name).read_bytes()
    assert len(list(band.checkpoint_dir.glob("step-*"))) == 2 and band.checkpoint_dir != signet.checkpoint_dir


@pytest.mark.slow
def test_a_dora_caption_lora_is_shared_without_a_kohya_file(sample_catalogue, tmp_path):
    from catalog_gen.train.adapters import adapter_weights, read_adapter
    from catalog_gen.train.workflow import PhotoSource, train_class
    from test_methods import method_config

    source = PhotoSource(photos_dir=sample_catalogue.photos_dir, products_csv=sample_catalogue.products_csv)
    config = method_config("lora-captions", use_dora=True, steps=2, checkpoint_every=0, validation_images=0)
    summary = train_class(source, "ring", ["band", "signet"], tmp_path, config)
    assert [o.status for o in summary.outcomes] == ["trained"] * 3
    band = read_adapter(tmp_path / "adapters" / "ring" / "band")
    assert band.record["files"]["kohya"] is None and not list(band.folder.glob("*.kohya.safetensors"))
    assert adapter_weights(band).lora  # the DoRA file itself, hash-checked
