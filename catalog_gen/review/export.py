"""`catalog export RUN_DIR --approved DEST`: approved images in marketplace shape.

Square on white (padded, never cropped), the profile's size and format, sRGB, the
generation parameters kept (EXIF description, XMP), and an AI-generated marker: IPTC's
DigitalSourceType "trainedAlgorithmicMedia" in XMP, the field marketplaces and the
IPTC photo metadata standard read for synthetic images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape

from catalog_gen import layout
from catalog_gen.errors import CatalogError
from catalog_gen.storage import atomic_path

AI_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


@dataclass(frozen=True)
class ExportProfile:
    name: str
    size: int
    format: str  # "JPEG" or "PNG"
    quality: int = 95


PROFILES = {
    "marketplace": ExportProfile("marketplace", 2048, "JPEG", 95),
    "web": ExportProfile("web", 1200, "JPEG", 90),
    "lossless": ExportProfile("lossless", 2048, "PNG"),
}


def approved_candidates(run_dir: Path):
    """Manifest rows of the candidates a reviewer approved (latest decision per candidate)."""
    import polars as pl

    from catalog_gen.generate.manifest import read_manifest
    from catalog_gen.review.decisions import load_decisions

    if not Path(run_dir).is_dir():
        raise CatalogError(f"run folder {run_dir} does not exist")
    decisions_file = Path(run_dir) / layout.DECISIONS_PARQUET
    if not decisions_file.is_file():
        raise CatalogError(f"{run_dir} has no {decisions_file.name}: review the run first (catalog review {run_dir})")
    # load_decisions names the file when it cannot be read (a corrupt or foreign Parquet file)
    decisions = load_decisions(run_dir).filter(pl.col("decision") == "approve").select("sku", "candidate")
    manifest = read_manifest(run_dir)
    return manifest.join(decisions, on=["sku", "candidate"], how="inner").sort("sku", "candidate")


def xmp_packet(prompt: str, seed: int, sku: str) -> bytes:
    """XMP with the IPTC AI marker and the generation parameters (all values XML-escaped)."""
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:catalog="https://catalog-gen.invalid/ns/1.0/">'
        f"<Iptc4xmpExt:DigitalSourceType>{AI_SOURCE_TYPE}</Iptc4xmpExt:DigitalSourceType>"
        f"<dc:description>{escape(prompt)}</dc:description>"
        f"<catalog:sku>{escape(sku)}</catalog:sku><catalog:seed>{seed}</catalog:seed>"
        f"<catalog:generator>catalog-gen</catalog:generator>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
    ).encode("utf-8")


def export_image(source: Path, dest: Path, profile: ExportProfile, prompt: str, seed: int, sku: str) -> Path:
    from PIL import Image, ImageCms

    from catalog_gen.catalog.intake import IntakeConfig, normalise_photo

    with Image.open(source) as image:
        # The same product-safe path as training photos: alpha on white, pad to square, resize.
        shaped = normalise_photo(image, IntakeConfig(resolution=profile.size, min_side=1))
    exif = Image.Exif()
    exif[0x010E] = prompt  # ImageDescription
    exif[0x0131] = "catalog-gen (AI-generated image)"  # Software
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    options = dict(icc_profile=srgb, exif=exif, xmp=xmp_packet(prompt, seed, sku))
    if profile.format == "JPEG":
        options.update(quality=profile.quality, subsampling=0)
    with atomic_path(dest) as tmp:
        shaped.save(tmp, format=profile.format, **options)
    return dest


MAX_UPSCALE = 4.0
"""The largest enlargement an export makes without being asked: SD 1.5's 512 px to the marketplace's 2048.
Beyond it the file has the pixel count of a product photo and none of its detail."""


def export_approved(run_dir: Path, dest: Path, profile_name: str = "marketplace",
                    allow_upscale: bool = False) -> list[Path]:
    """Export every approved candidate of a run; returns the files written. Every image is checked before
    the first is written: one that would be enlarged more than MAX_UPSCALE times is refused (naming it)
    unless allow_upscale, and export.csv records each file's enlargement."""
    from PIL import Image

    from catalog_gen.generate.skus import sku_folder_names, write_csv_escaped

    profile = PROFILES.get(profile_name)
    if profile is None:
        raise CatalogError(f"unknown export profile '{profile_name}'; profiles: {', '.join(PROFILES)}")
    rows = approved_candidates(run_dir)
    if rows.height == 0:
        raise CatalogError(f"{run_dir}: no approved candidates to export")
    factors = []
    for path in rows["path"]:
        with Image.open(Path(run_dir) / path) as image:
            width, height = image.size
        factor = profile.size / max(width, height)
        if factor > MAX_UPSCALE and not allow_upscale:
            raise CatalogError(f"{path}: a {width}x{height} px image would be enlarged {factor:.0f}x to {profile.size} px "
                               f"for the '{profile.name}' profile, with no more detail than it has; export a "
                               f"smaller profile, or pass --allow-upscale to export it anyway")
        factors.append(round(factor, 3))
    folders = sku_folder_names(sorted(set(rows["sku"])))
    suffix = ".jpg" if profile.format == "JPEG" else ".png"
    written: list[Path] = []
    names: list[str] = []
    for row in rows.iter_rows(named=True):
        target = Path(dest) / f"{folders[row['sku']]}_{row['candidate']}{suffix}"
        written.append(export_image(Path(run_dir) / row["path"], target, profile, row["prompt"], row["seed"], row["sku"]))
        names.append(target.name)
    write_csv_escaped(rows.with_columns(_export_file_column(names), _upscale_column(factors)), Path(dest) / layout.EXPORT_CSV)
    return written


def _export_file_column(names: Sequence[str]):
    import polars as pl

    return pl.Series("export_file", list(names))


def _upscale_column(factors: Sequence[float]):
    import polars as pl

    return pl.Series("upscale_factor", list(factors))
