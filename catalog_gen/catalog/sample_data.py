"""A small, procedurally drawn jewelry catalogue for demos and tests (PIL only, seeded).

It covers every class and instance of class_maps/jewelry.toml with a few photos each,
shop-style titles that the taxonomy's title rules resolve, a skus.csv for a nightly
generation run, and the odd files real shop exports contain (transparent PNGs, EXIF-turned
JPEGs, CMYK, 16-bit grey, corrupt, duplicate, tiny and empty files) so intake is exercised.

Drawing is a pure function of (instance, metal, seeded rng), in sample_drawings.py; this
module names, encodes and lists the photos, and writes them at the end, in one folder
swapped into place whole.
"""

from __future__ import annotations

import csv
import io
import random
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from PIL import Image

from catalog_gen import seeds
from catalog_gen.errors import CatalogError
from catalog_gen.catalog.sample_drawings import render_photo
from catalog_gen.storage import atomic_directory

METALS = ("gold", "silver", "rose gold")  # each has its tones in sample_drawings.METAL_TONES

_CLASS_CODES = {"hoops": "HP", "necklace": "NK", "ring": "RG", "studs": "ST"}

# Title stems per instance: each holds its instance keyword and its class keyword and no
# keyword of a sibling instance, so the title rules put it in exactly one place.
_TITLE_STEMS = {
    ("hoops", "beaded"): "Beaded Hoop Earrings",
    ("hoops", "chunky"): "Chunky Hoop Earrings",
    ("hoops", "charlotte"): "Charlotte Huggie Hoops",
    ("hoops", "croissant"): "Croissant Hoops",
    ("hoops", "dome"): "Dome Hoop Earrings",
    ("hoops", "easy_daily"): "Easy Daily Hoops",
    ("hoops", "rectangle"): "Rectangle Hoop Earrings",
    ("hoops", "special"): "Special Edition Hoops",
    ("hoops", "tube"): "Tube Hoop Earrings",
    ("necklace", "chain"): "Link Chain Necklace",
    ("necklace", "charm"): "Charm Necklace",
    ("necklace", "pendant"): "Pendant Necklace",
    ("ring", "band"): "Classic Band Ring",
    ("ring", "bold"): "Bold Cocktail Ring",
    ("ring", "dome"): "Dome Ring",
    ("ring", "signet"): "Signet Ring",
    ("ring", "slim"): "Slim Ring",
    ("ring", "stacker"): "Stacker Rings, Set of 3",
    ("studs", "studs"): "Stud Earrings",
}
_METAL_TITLES = {"gold": "Gold", "silver": "Sterling Silver", "rose gold": "Rose Gold"}
_TITLE_FORMS = ("{stem} in {metal}", "{stem} - {metal}", "{stem}, {metal}")
_VIEWS = ("front view", "three-quarter view", "top view", "side view")
_SETTINGS = ("on white marble", "on a linen cloth", "on a wooden tray", "on a velvet bust", "on sand")

# Photos saved in an awkward format in place of the normal JPEG; intake must still accept
# them. (class, instance, photo number) -> (kind, note)
_ODD_FORMATS = {
    ("ring", "signet", 1): ("rgba_png", "RGBA PNG with a transparent background"),
    ("necklace", "pendant", 2): ("exif_rotated", "JPEG stored on its side; EXIF Orientation 6 turns it"),
    ("hoops", "beaded", 1): ("cmyk_jpeg", "CMYK JPEG"),
    ("studs", "studs", 2): ("gray16_png", "16-bit grayscale PNG (mode I;16)"),
}
# Extra files listed beside an instance's photos, made from its first photo; intake must
# refuse them, and every instance still keeps all its normal photos. kind -> (where, note)
_ODD_EXTRAS = {
    "truncated": (("hoops", "chunky"), "JPEG cut off halfway (truncated)"),
    "garbage": (("necklace", "chain"), "not an image: random bytes named .jpg"),
    "exact_duplicate": (("ring", "band"), "byte-identical copy of {original}"),
    "near_duplicate": (("ring", "bold"), "{original} shrunk a little and re-saved at JPEG quality 60"),
    "too_small": (("hoops", "tube"), "20x20 px image"),
    "empty": (("hoops", "dome"), "empty 0-byte file"),
}


@dataclass(frozen=True)
class SampleCatalogue:
    root: Path
    photos_dir: Path
    products_csv: Path
    """Columns sku,title,image; image is relative to photos_dir. One row per photo."""
    skus_csv: Path
    """Columns sku,class,instance,n_images,seed,view,setting,metal: a nightly generation run."""
    odd_files: dict[str, str]
    """File name -> what is odd about it."""


@dataclass(frozen=True)
class _Instance:
    class_name: str
    key: str
    index: int

    def sku(self, metal: str) -> str:
        """One product per instance and metal, e.g. HP-BEAD-001 (gold), HP-BEAD-002 (silver)."""
        prefix = _CLASS_CODES.get(self.class_name, self.class_name[:2].upper())
        return f"{prefix}-{self.key.replace('_', '')[:4].upper()}-{METALS.index(metal) + 1:03d}"

    def file_name(self, metal: str, number: int, suffix: str) -> str:
        return f"{self.sku(metal).lower()}-{number}{suffix}"


def write_sample_catalogue(
    root: Path, seed: int = 0, photos_per_instance: int = 4, size: int = 256
) -> SampleCatalogue:
    """Draw and write the catalogue under `root` (replaced whole); same seed, same bytes."""
    root = Path(root)
    taxonomy = _load_taxonomy()
    min_photos = int(taxonomy["taxonomy"].get("min_photos", 3))
    if photos_per_instance < min_photos:
        raise CatalogError(
            f"sample catalogue: photos_per_instance {photos_per_instance} is below the taxonomy's "
            f"min_photos {min_photos}"
        )
    if size < 64:
        raise CatalogError(f"sample catalogue: size {size} px is below 64 px; intake refuses such photos")
    # The folder is replaced whole, so never swallow one that holds something else.
    occupied = root.exists() and (not root.is_dir() or any(root.iterdir()))
    if occupied and not (root / "products.csv").is_file():
        raise CatalogError(f"{root}: exists and is not a sample catalogue; refusing to replace it")

    instances = _instances(taxonomy)
    with atomic_directory(root) as staging:
        photos = staging / "photos"
        photos.mkdir()
        products, odd_files = _write_photos(photos, instances, seed, photos_per_instance, size)
        _write_csv(staging / "products.csv", ["sku", "title", "image"], products)
        _write_csv(staging / "skus.csv", _SKU_COLUMNS, _sku_rows(instances, seed))
    return SampleCatalogue(
        root=root,
        photos_dir=root / "photos",
        products_csv=root / "products.csv",
        skus_csv=root / "skus.csv",
        odd_files=odd_files,
    )


def _load_taxonomy() -> dict:
    text = (resources.files("catalog_gen.class_maps") / "jewelry.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def _instances(taxonomy: dict) -> list[_Instance]:
    found = []
    for class_name, spec in taxonomy["classes"].items():
        for key in spec.get("instances", {}):
            found.append(_Instance(class_name, key, len(found)))
    return found


def _title(instance: _Instance, metal: str) -> str:
    stem = _TITLE_STEMS.get((instance.class_name, instance.key))
    if stem is None:  # an instance added to the taxonomy after this file was written
        stem = f"{instance.key.replace('_', ' ').title()} {instance.class_name.title()}"
    form = _TITLE_FORMS[(instance.index + METALS.index(metal)) % len(_TITLE_FORMS)]
    return form.format(stem=stem, metal=_METAL_TITLES[metal])


def _write_photos(
    photos: Path, instances: list[_Instance], seed: int, per_instance: int, size: int
) -> tuple[list[list[str]], dict[str, str]]:
    rows: list[list[str]] = []
    odd_files: dict[str, str] = {}
    for inst in instances:
        shots = []  # (metal, file name, bytes)
        for number in range(1, per_instance + 1):
            rng = random.Random(seeds.sample_photo(seed, inst.class_name, inst.key, number))
            metal = METALS[(inst.index + number - 1) % len(METALS)]
            framing = inst.index + number
            layer, background = render_photo(inst.class_name, inst.key, metal, rng, size, framing)
            kind, note = _ODD_FORMATS.get((inst.class_name, inst.key, number), (None, ""))
            suffix, data = _encode(kind, layer, background)
            shots.append((metal, inst.file_name(metal, number, suffix), data))
            if number == 1:
                first_image = _flatten(layer, background)
            if kind:
                odd_files[shots[-1][1]] = note

        # Extras are numbered after the normal photos, as a later upload would be.
        metal, first_name, first_bytes = shots[0]
        here = (inst.class_name, inst.key)
        extras = [(kind, note) for kind, (where, note) in _ODD_EXTRAS.items() if where == here]
        for offset, (kind, note) in enumerate(extras, start=1):
            name = inst.file_name(metal, per_instance + offset, ".jpg")
            shots.append((metal, name, _odd_extra(kind, first_bytes, first_image, seed)))
            odd_files[name] = note.format(original=first_name)

        for metal, name, data in shots:
            (photos / name).write_bytes(data)
            rows.append([inst.sku(metal), _title(inst, metal), name])
    return rows, odd_files


def _flatten(layer: Image.Image, background: Image.Image) -> Image.Image:
    return Image.alpha_composite(background, layer).convert("RGB")


def _encode(kind: str | None, layer: Image.Image, background: Image.Image) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    if kind == "rgba_png":
        layer.save(buffer, format="PNG")  # product and shadow only: the rest is transparent
        return ".png", buffer.getvalue()
    photo = _flatten(layer, background)
    if kind == "gray16_png":
        wide = photo.convert("L").convert("I").point(lambda v: v * 257)
        wide.convert("I;16").save(buffer, format="PNG")
        return ".png", buffer.getvalue()
    if kind == "cmyk_jpeg":
        photo.convert("CMYK").save(buffer, format="JPEG", quality=90)
        return ".jpg", buffer.getvalue()
    if kind == "exif_rotated":
        # Store the pixels turned a quarter to the left, as a phone held sideways does;
        # Orientation 6 tells viewers to turn them back a quarter to the right.
        exif = Image.Exif()
        exif[0x0112] = 6
        photo.transpose(Image.Transpose.ROTATE_90).save(buffer, format="JPEG", quality=90, exif=exif)
        return ".jpg", buffer.getvalue()
    photo.save(buffer, format="JPEG", quality=90)
    return ".jpg", buffer.getvalue()


def _odd_extra(kind: str, first_bytes: bytes, first_image: Image.Image, seed: int) -> bytes:
    if kind == "truncated":
        return first_bytes[: len(first_bytes) // 2]
    if kind == "garbage":
        return random.Random(seeds.sample_garbage(seed)).randbytes(4096)
    if kind == "exact_duplicate":
        return first_bytes
    if kind == "empty":
        return b""
    side = first_image.width - first_image.width // 16 if kind == "near_duplicate" else 20
    buffer = io.BytesIO()
    first_image.resize((side, side), Image.Resampling.LANCZOS).save(
        buffer, format="JPEG", quality=60 if kind == "near_duplicate" else 90
    )
    return buffer.getvalue()


_SKU_COLUMNS = ["sku", "class", "instance", "n_images", "seed", "view", "setting", "metal"]


def _sku_rows(instances: list[_Instance], seed: int) -> list[list[str]]:
    """Two generation jobs per instance, each with its own view, setting and metal."""
    rng = random.Random(seeds.sample_skus(seed))
    rows = []
    for inst in instances:
        for metal in rng.sample(METALS, 2):  # two different metals: the SKU is made from the metal
            n_images, job_seed = rng.choice((2, 4, 4, 8)), rng.randrange(2**31)
            view, setting = rng.choice(_VIEWS), rng.choice(_SETTINGS)
            sku = inst.sku(metal)
            rows.append([sku, inst.class_name, inst.key, str(n_images), str(job_seed), view, setting, metal])
    return rows


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    # Written into the staging folder that atomic_directory swaps in whole.
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
