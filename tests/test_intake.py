"""Intake: every refusal reason, every colour-mode fix, padding, de-duplication, the saved set."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFile

from catalog_gen.errors import CatalogError
from catalog_gen.catalog.intake import (
    IntakeConfig,
    hamming,
    intake_photos,
    load_photo,
    normalise_photo,
    perceptual_hash,
    save_training_set,
)
from catalog_gen.storage import sha256_file

SMALL = IntakeConfig(resolution=64, min_side=16)


def product(seed: int = 0, size: tuple[int, int] = (160, 160)) -> Image.Image:
    """A product-like photo: a dark shape on white, placed differently for each seed."""
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    w, h = size
    x, y = (seed * 37) % (w // 2), (seed * 53) % (h // 2)
    draw.ellipse((x, y, x + w // 2, y + h // 3), fill=(150, 110, 40))
    draw.rectangle((w - x - w // 4, h - y - h // 4, w - x - 1, h - y - 1), fill=(40, 40, 60))
    return image


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def reasons(result) -> dict[str, str]:
    return {r.source.name: r.reason for r in result.refused}


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"resolution": 0}, "resolution"),
        ({"resolution": 100}, "resolution"),
        ({"min_side": 0}, "min_side"),
        ({"near_duplicate_bits": -1}, "near_duplicate_bits"),
        ({"near_duplicate_bits": 65}, "near_duplicate_bits"),
        ({"background": (256, 0, 0)}, "background"),
        ({"background": (255, 255)}, "background"),
    ],
)
def test_config_rejects_nonsense_naming_field_and_value(kwargs, field):
    with pytest.raises(CatalogError) as error:
        IntakeConfig(**kwargs)
    assert field in str(error.value)
    assert str(next(iter(kwargs.values()))) in str(error.value)


# ---------------------------------------------------------------- normalisation (pure)


def test_alpha_is_composited_on_white_not_black():
    rgba = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse((30, 30, 70, 70), fill=(200, 30, 30, 255))
    out = normalise_photo(rgba, SMALL)
    assert out.mode == "RGB" and out.size == (64, 64)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    r, g, b = out.getpixel((32, 32))
    assert r > 180 and g < 60 and b < 60


def test_la_and_palette_transparency_go_on_white(tmp_path):
    la = Image.new("LA", (80, 80), (0, 0))
    assert normalise_photo(la, SMALL).getpixel((1, 1)) == (255, 255, 255)

    palette = Image.new("P", (80, 80), 0)
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    ImageDraw.Draw(palette).rectangle((20, 20, 60, 60), fill=1)
    save(palette, tmp_path / "p.png", transparency=0)
    out = load_photo(Path("p.png"), tmp_path, SMALL)
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((32, 32))[1] > 150


def test_exif_rotated_photo_comes_out_upright(tmp_path):
    # Upright: a wide image with a red block in its top-left corner.
    upright = Image.new("RGB", (160, 80), (255, 255, 255))
    ImageDraw.Draw(upright).rectangle((0, 0, 39, 19), fill=(255, 0, 0))
    # Stored the way a sideways phone stores it: turned a quarter left, Orientation 6 to undo.
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    assert stored.size == (80, 160)
    save(stored, tmp_path / "turned.jpg", exif=exif, quality=95)

    out = load_photo(Path("turned.jpg"), tmp_path, SMALL)
    # Upright and padded: content is 64x32 in rows 16..47; red sits at its top-left.
    assert out.getpixel((3, 18))[0] > 200 and out.getpixel((3, 18))[1] < 80
    assert out.getpixel((60, 18)) == pytest.approx((255, 255, 255), abs=8)
    assert out.getpixel((3, 45)) == pytest.approx((255, 255, 255), abs=8)
    assert out.getpixel((3, 5)) == (255, 255, 255)  # padding above, so it really is landscape


def test_cmyk_jpeg_becomes_sensible_rgb(tmp_path):
    save(Image.new("RGB", (96, 96), (200, 40, 40)).convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = load_photo(Path("cmyk.jpg"), tmp_path, SMALL)
    assert out.mode == "RGB"
    assert out.getpixel((32, 32)) == pytest.approx((200, 40, 40), abs=12)


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    raw = (16384).to_bytes(2, "little") * 48 + (49152).to_bytes(2, "little") * 48
    wide = Image.frombytes("I;16", (96, 96), raw * 96)
    save(wide, tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode in ("I;16", "I")
    out = load_photo(Path("grey16.png"), tmp_path, SMALL)
    left, right = out.getpixel((8, 32)), out.getpixel((56, 32))
    assert left == pytest.approx((64, 64, 64), abs=2)
    assert right == pytest.approx((191, 191, 191), abs=2)

    # Mode "I" with 16-bit values (older Pillow reads 16-bit PNGs this way) scales alike.
    assert normalise_photo(Image.new("I", (32, 32), 40000), SMALL).getpixel((5, 5)) == pytest.approx(
        (156, 156, 156), abs=2
    )


def test_padding_keeps_the_whole_wide_object_and_pads_white():
    wide = Image.new("RGB", (300, 100), (255, 255, 255))
    ImageDraw.Draw(wide).rectangle((0, 40, 299, 59), fill=(20, 20, 20))  # touches both side edges
    out = normalise_photo(wide, IntakeConfig(resolution=96))
    assert out.size == (96, 96)
    assert max(out.getpixel((0, 48))) < 80  # leftmost object pixel survived
    assert max(out.getpixel((95, 48))) < 80  # rightmost too
    assert out.getpixel((48, 4)) == (255, 255, 255)  # padding above
    assert out.getpixel((48, 91)) == (255, 255, 255)  # and below


def test_perceptual_hash_survives_resave_and_separates_different_photos():
    a = normalise_photo(product(1), SMALL)
    buffer = io.BytesIO()
    product(1).resize((120, 120)).save(buffer, format="JPEG", quality=60)
    resaved = normalise_photo(Image.open(buffer), SMALL)
    other = normalise_photo(product(2), SMALL)
    assert hamming(perceptual_hash(a), perceptual_hash(resaved)) <= 6
    assert hamming(perceptual_hash(a), perceptual_hash(other)) > 6


# ---------------------------------------------------------------- refusals


def test_each_bad_file_is_refused_with_its_reason(tmp_path):
    root = tmp_path / "photos"
    good = save(product(), root / "good.jpg", quality=90)
    (root / "empty.jpg").write_bytes(b"")
    (root / "garbage.jpg").write_bytes(b"this is not a picture at all" * 20)
    (root / "truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    save(Image.new("RGB", (20, 20), "red"), root / "tiny.png")
    names = ["good.jpg", "empty.jpg", "garbage.jpg", "truncated.jpg", "tiny.png", "nowhere.jpg"]

    result = intake_photos([Path(n) for n in names], root, IntakeConfig())
    assert [p.source.name for p in result.accepted] == ["good.jpg"]
    assert reasons(result) == {
        "empty.jpg": "empty file",
        "garbage.jpg": "unreadable image (cannot identify image file)",
        "truncated.jpg": "truncated image",
        "tiny.png": "too small: 20x20 px, minimum 64 px",
        "nowhere.jpg": "missing",
    }


def test_truncated_is_refused_even_if_someone_turned_on_truncated_loading(tmp_path, monkeypatch):
    good = save(product(), tmp_path / "good.jpg", quality=90)
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:-400])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    result = intake_photos([Path("cut.jpg")], tmp_path, IntakeConfig())
    assert reasons(result) == {"cut.jpg": "truncated image"}
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is given back


@pytest.mark.parametrize("side", [100, 40])  # above 2x the limit: PIL errors; above 1x: it warns
def test_decompression_bombs_are_refused(tmp_path, monkeypatch, side):
    save(Image.new("RGB", (side, side), "white"), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    result = intake_photos([Path("bomb.png")], tmp_path, IntakeConfig(min_side=16))
    assert not result.accepted
    assert reasons(result)["bomb.png"].startswith("image too large (decompression bomb guard")


def test_paths_outside_the_photo_folder_are_refused(tmp_path):
    root = tmp_path / "photos"
    save(product(), root / "inside.jpg")
    outside = save(product(3), tmp_path / "elsewhere" / "outside.jpg")
    paths = [Path("inside.jpg"), Path("../elsewhere/outside.jpg"), outside]
    result = intake_photos(paths, root, IntakeConfig())
    assert [p.source.name for p in result.accepted] == ["inside.jpg"]
    assert [r.reason for r in result.refused] == ["outside the photo folder"] * 2


def test_symlinks_are_refused_even_pointing_inside(tmp_path):
    root = tmp_path / "photos"
    save(product(), root / "real.jpg")
    outside = save(product(4), tmp_path / "secret.jpg")
    os.symlink(root / "real.jpg", root / "link_inside.jpg")
    os.symlink(outside, root / "link_outside.jpg")
    (root / "sub").mkdir()
    os.symlink(root / "sub", root / "linked_dir")
    save(product(5), root / "sub" / "deep.jpg")
    paths = [Path(p) for p in ("real.jpg", "link_inside.jpg", "link_outside.jpg", "linked_dir/deep.jpg")]
    result = intake_photos(paths, root, IntakeConfig())
    assert [p.source.name for p in result.accepted] == ["real.jpg"]
    assert [r.reason for r in result.refused] == ["symlink", "symlink", "symlink"]


def test_load_photo_raises_catalog_error_naming_the_file_and_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(CatalogError, match=r"^empty\.jpg: empty file$"):
        load_photo(Path("empty.jpg"), tmp_path, IntakeConfig())
    with pytest.raises(CatalogError, match=r"nope\.jpg: missing"):
        load_photo(Path("nope.jpg"), tmp_path, IntakeConfig())


# ---------------------------------------------------------------- duplicates and the whole run


def test_exact_and_near_duplicates_are_counted_once(tmp_path):
    first = save(product(1), tmp_path / "a.jpg", quality=90)
    (tmp_path / "a_copy.jpg").write_bytes(first.read_bytes())
    save(product(1).resize((150, 150)), tmp_path / "a_smaller.jpg", quality=60)
    save(product(2), tmp_path / "b.jpg", quality=90)
    paths = [Path(n) for n in ("a.jpg", "a_copy.jpg", "a_smaller.jpg", "b.jpg")]

    result = intake_photos(paths, tmp_path, IntakeConfig())
    assert [p.source.name for p in result.accepted] == ["a.jpg", "b.jpg"]
    assert reasons(result) == {
        "a_copy.jpg": "exact duplicate of a.jpg",
        "a_smaller.jpg": "near duplicate of a.jpg",
    }
    kept = result.accepted[0]
    assert kept.duplicates == (tmp_path / "a_copy.jpg", tmp_path / "a_smaller.jpg")
    assert kept.sha256 == sha256_file(first)
    assert result.accepted[1].duplicates == ()


def test_run_goes_on_with_good_photos_in_input_order_and_is_deterministic(tmp_path):
    for seed in range(4):
        save(product(seed, size=(200, 140)), tmp_path / f"p{seed}.jpg", quality=90)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    paths = [Path(n) for n in ("p3.jpg", "broken.jpg", "p0.jpg", "p2.jpg", "missing.jpg", "p1.jpg")]

    first = intake_photos(paths, tmp_path, IntakeConfig(resolution=128))
    second = intake_photos(paths, tmp_path, IntakeConfig(resolution=128))
    assert [p.source.name for p in first.accepted] == ["p3.jpg", "p0.jpg", "p2.jpg", "p1.jpg"]
    assert [r.source.name for r in first.refused] == ["broken.jpg", "missing.jpg"]
    assert all(p.image.size == (128, 128) and p.image.mode == "RGB" for p in first.accepted)
    assert [(p.sha256, p.phash) for p in first.accepted] == [(p.sha256, p.phash) for p in second.accepted]
    assert first.refused == second.refused


def test_save_training_set_writes_images_and_manifest_and_drops_stale_files(tmp_path):
    photos = tmp_path / "photos"
    for seed in range(3):
        save(product(seed), photos / f"shot {seed}.jpg", quality=90)
    (photos / "empty.jpg").write_bytes(b"")
    names = ["shot 0.jpg", "empty.jpg", "shot 1.jpg", "shot 2.jpg"]
    result = intake_photos([Path(n) for n in names], photos, SMALL)

    out = save_training_set(result, tmp_path / "train")
    assert out == tmp_path / "train"
    expected = ["001_shot_0.png", "002_shot_1.png", "003_shot_2.png", "intake.json"]
    assert sorted(p.name for p in out.iterdir()) == expected
    with Image.open(out / "002_shot_1.png") as reloaded:
        assert reloaded.mode == "RGB" and reloaded.size == (64, 64)
    manifest = json.loads((out / "intake.json").read_text())
    assert [a["file"] for a in manifest["accepted"]] == ["001_shot_0.png", "002_shot_1.png", "003_shot_2.png"]
    assert manifest["accepted"][0]["sha256"] == sha256_file(photos / "shot 0.jpg")
    assert manifest["accepted"][0]["source"].endswith("shot 0.jpg")
    assert manifest["refused"] == [{"source": str(photos / "empty.jpg"), "reason": "empty file"}]
    assert manifest["config"]["resolution"] == 64

    # A later, smaller run replaces the folder whole: no stale image is left for training.
    smaller = intake_photos([Path("shot 2.jpg")], photos, SMALL)
    save_training_set(smaller, out)
    assert sorted(p.name for p in out.iterdir()) == ["001_shot_2.png", "intake.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
