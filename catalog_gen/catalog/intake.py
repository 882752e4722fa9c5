"""Product-safe photo intake: turn a folder of shop photos into a clean, square training set.

Every photo is checked (inside the photo folder, not a symlink, readable, fully decodable,
big enough), normalised (EXIF orientation, alpha over white, 8-bit RGB, padded to a square
so the product is never cropped, resized) and de-duplicated by file hash and by a small
perceptual hash. A bad file never stops the run: it is refused with a short reason and the
good photos go on.

`normalise_photo` and `perceptual_hash` are pure; reading files sits in `load_photo`,
writing in `save_training_set`.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from catalog_gen.errors import CatalogError
from catalog_gen.storage import atomic_directory, atomic_write_json, is_inside, sha256_file

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_HASH_GRID = 32
_COSINES = [
    [math.cos(math.pi * (2 * x + 1) * u / (2 * _HASH_GRID)) for x in range(_HASH_GRID)] for u in range(8)
]


@dataclass(frozen=True)
class IntakeConfig:
    resolution: int = 512
    """Side of the square RGB images handed to training (a multiple of 8 for the VAE)."""
    min_side: int = 64
    """Photos whose shorter side is below this are refused: upscaled, they only teach blur."""
    near_duplicate_bits: int = 6
    """Max Hamming distance between 64-bit perceptual hashes for two photos to count as one."""
    background: tuple[int, int, int] = (255, 255, 255)
    """Colour for transparent areas and square padding; shop photos sit on white."""

    def __post_init__(self) -> None:
        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not is_int(self.resolution) or self.resolution < 8 or self.resolution % 8:
            raise CatalogError(
                f"IntakeConfig.resolution: {self.resolution!r} is not a positive multiple of 8"
            )
        if not is_int(self.min_side) or self.min_side < 1:
            raise CatalogError(f"IntakeConfig.min_side: {self.min_side!r} is not a positive whole number")
        if not is_int(self.near_duplicate_bits) or not 0 <= self.near_duplicate_bits <= 64:
            raise CatalogError(
                f"IntakeConfig.near_duplicate_bits: {self.near_duplicate_bits!r} is not between 0 and 64"
            )
        bg = self.background
        if not (isinstance(bg, tuple) and len(bg) == 3 and all(is_int(c) and 0 <= c <= 255 for c in bg)):
            raise CatalogError(f"IntakeConfig.background: {bg!r} is not an (r, g, b) tuple of 0-255 integers")


@dataclass(frozen=True)
class AcceptedPhoto:
    source: Path
    image: Image.Image
    sha256: str
    phash: int
    duplicates: tuple[Path, ...] = ()
    """Other files folded into this one (exact or near duplicates, in input order)."""


@dataclass(frozen=True)
class RefusedPhoto:
    source: Path
    reason: str


@dataclass(frozen=True)
class IntakeResult:
    accepted: tuple[AcceptedPhoto, ...]
    refused: tuple[RefusedPhoto, ...]
    config: IntakeConfig = field(default_factory=IntakeConfig)
    """The settings used, written into intake.json beside the images."""


class _Refusal(CatalogError):
    """A photo refused for `reason`; intake turns it into a RefusedPhoto, load_photo names the file."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- pure core


def normalise_photo(image: Image.Image, config: IntakeConfig) -> Image.Image:
    """EXIF-upright, 8-bit RGB, alpha over the background, padded to a square, resized."""
    image = ImageOps.exif_transpose(image)
    image = _to_rgb(image, config.background)
    return _pad_and_resize(image, config.resolution, config.background)


def perceptual_hash(image: Image.Image) -> int:
    """64-bit DCT hash: which of the 8x8 lowest frequencies of a 32x32 grey thumbnail are above their median.

    Computed on the normalised image, so the same photo saved as PNG or JPEG, smaller, or
    turned by EXIF hashes alike. The median split makes every bit count; a difference hash
    wastes most of its bits on the flat white around a small product, and then different
    products on white look alike.
    """
    grey = image.convert("L").resize((_HASH_GRID, _HASH_GRID), Image.Resampling.BOX)
    pixels = grey.tobytes()
    rows = [pixels[y * _HASH_GRID : (y + 1) * _HASH_GRID] for y in range(_HASH_GRID)]
    # Separable 2-D DCT, keeping only the 8 lowest frequencies in each direction.
    along_x = [[sum(c * v for c, v in zip(_COSINES[u], row)) for u in range(8)] for row in rows]
    coeffs = [
        sum(_COSINES[v][y] * along_x[y][u] for y in range(_HASH_GRID)) for v in range(8) for u in range(8)
    ]
    median = statistics.median(coeffs[1:])  # the DC term is overall brightness, not layout
    bits = 0
    for value in coeffs:
        bits = (bits << 1) | (value > median)
    return bits


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        image = _high_depth_to_l(image)
        mode = image.mode
    has_alpha = mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info)
    if has_alpha:
        # Composite on the background ourselves: a plain convert("RGB") drops alpha and
        # leaves whatever colour hid under it, usually black.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise _Refusal(f"unsupported colour mode {mode}") from exc


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey to 8-bit by scaling the range, not by clipping (which turns it white)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        scale = 1 / 257
    else:
        _, high = image.getextrema()
        if image.mode == "F":
            scale = 255.0 if high <= 1.0 else 1.0  # float images come as 0-1 or 0-255
        else:
            scale = 1 / 257 if high > 255 else 1.0  # "I" holds 16-bit PNGs on older Pillow
    wide = image.convert("F") if image.mode == "F" else image.convert("I")
    return wide.point(lambda v: v * scale).convert("L")


def _pad_and_resize(image: Image.Image, resolution: int, background: tuple[int, int, int]) -> Image.Image:
    # Scale the longer side to the resolution, then pad the shorter one: cropping could cut
    # off a necklace's clasp or an earring, and the model must see the whole product.
    width, height = image.size
    scale = resolution / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (resolution, resolution), background)
    canvas.paste(image, ((resolution - new_size[0]) // 2, (resolution - new_size[1]) // 2))
    return canvas


# ---------------------------------------------------------------- reading files


def load_photo(path: Path, photo_root: Path, config: IntakeConfig) -> Image.Image:
    """Read one photo and normalise it; raise CatalogError(f"{path}: {reason}") if it is refused.

    A relative `path` is taken inside `photo_root`.
    """
    candidate = Path(photo_root) / path
    try:
        _check_path(candidate, Path(photo_root))
        return normalise_photo(_decode(candidate, config), config)
    except _Refusal as refusal:
        raise CatalogError(f"{path}: {refusal.reason}") from None


def _check_path(candidate: Path, photo_root: Path) -> None:
    # Symlinks are refused even when they point inside: the training set must be the files
    # the shop handed over, not whatever a link happens to point at when training runs.
    if candidate.is_symlink():
        raise _Refusal("symlink")
    try:
        if not is_inside(candidate, photo_root):
            raise _Refusal("outside the photo folder")
        resolved_rel = candidate.resolve().relative_to(photo_root.resolve())
    except (OSError, RuntimeError) as exc:  # a symlink loop on the way
        raise _Refusal("unresolvable path (symlink loop)") from exc
    # Inside once resolved but not as written: a folder on the way is a link.
    lexical = Path(os.path.normpath(os.path.abspath(candidate)))
    root_lexical = Path(os.path.normpath(os.path.abspath(photo_root)))
    if not lexical.is_relative_to(root_lexical) or lexical.relative_to(root_lexical) != resolved_rel:
        raise _Refusal("symlink")
    if not candidate.exists():
        raise _Refusal("missing")
    if not candidate.is_file():
        raise _Refusal("not a regular file")
    if candidate.stat().st_size == 0:
        raise _Refusal("empty file")


@contextmanager
def _strict_decoding() -> Iterator[None]:
    # A half-downloaded JPEG decodes "fine" with LOAD_TRUNCATED_IMAGES on, grey bottom and all;
    # force it off while we load (a process-wide flag, so restore it afterwards), and make
    # PIL's decompression-bomb warning an error so a huge image is refused, not decoded.
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _decode(candidate: Path, config: IntakeConfig) -> Image.Image:
    try:
        with _strict_decoding(), Image.open(candidate) as opened:
            opened.load()
            # Turn upright here, while the file's own EXIF reader is at hand (TIFF keeps the
            # tag outside info); normalise_photo's second turn is then a no-op.
            image = ImageOps.exif_transpose(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _Refusal(f"image too large (decompression bomb guard: {exc})") from exc
    except UnidentifiedImageError as exc:
        raise _Refusal("unreadable image (cannot identify image file)") from exc
    except Exception as exc:  # noqa: BLE001 - a bad file must never stop the run, whatever PIL throws
        message = str(exc) or type(exc).__name__
        if "truncated" in message.lower():
            raise _Refusal("truncated image") from exc
        raise _Refusal(f"damaged image ({message})") from exc
    width, height = image.size
    if min(width, height) < config.min_side:
        raise _Refusal(f"too small: {width}x{height} px, minimum {config.min_side} px")
    return image


# ---------------------------------------------------------------- the intake run


@dataclass
class _Kept:
    source: Path
    image: Image.Image
    sha256: str
    phash: int
    duplicates: list[Path]


def intake_photos(paths: Sequence[Path], photo_root: Path, config: IntakeConfig) -> IntakeResult:
    """Check, normalise and de-duplicate `paths` in the order given; never raises for a bad file.

    The first of a set of duplicates is kept; later ones are refused naming it.
    """
    photo_root = Path(photo_root)
    kept: list[_Kept] = []
    by_sha: dict[str, _Kept] = {}
    refused: list[RefusedPhoto] = []
    for path in paths:
        candidate = photo_root / path
        try:
            _check_path(candidate, photo_root)
            sha = _hash_file(candidate)
            if sha in by_sha:
                original = by_sha[sha]
                original.duplicates.append(candidate)
                raise _Refusal(f"exact duplicate of {_display(original.source, photo_root)}")
            image = normalise_photo(_decode(candidate, config), config)
            phash = perceptual_hash(image)
            near = next((k for k in kept if hamming(k.phash, phash) <= config.near_duplicate_bits), None)
            if near is not None:
                near.duplicates.append(candidate)
                raise _Refusal(f"near duplicate of {_display(near.source, photo_root)}")
        except _Refusal as refusal:
            refused.append(RefusedPhoto(source=candidate, reason=refusal.reason))
            continue
        record = _Kept(candidate, image, sha, phash, [])
        kept.append(record)
        by_sha[sha] = record
    accepted = tuple(AcceptedPhoto(k.source, k.image, k.sha256, k.phash, tuple(k.duplicates)) for k in kept)
    return IntakeResult(accepted=accepted, refused=tuple(refused), config=config)


def _hash_file(candidate: Path) -> str:
    try:
        return sha256_file(candidate)
    except OSError as exc:
        raise _Refusal(f"unreadable file ({exc.strerror or exc})") from exc


def _display(source: Path, photo_root: Path) -> str:
    """The file's name as the shop sees it: relative to the photo folder when inside it."""
    try:
        return source.relative_to(photo_root).as_posix()
    except ValueError:
        return str(source)


# ---------------------------------------------------------------- writing the training set


def save_training_set(result: IntakeResult, out_dir: Path) -> Path:
    """Write accepted photos as out_dir/NNN_<stem>.png plus out_dir/intake.json; return out_dir.

    The folder is built aside and swapped in whole, so a previous, longer run never leaves
    stale images behind for training to pick up.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        accepted = []
        for number, photo in enumerate(result.accepted, start=1):
            name = f"{number:03d}_{_safe_stem(photo.source.stem)}.png"
            photo.image.save(staging / name, format="PNG")
            accepted.append(
                {
                    "file": name,
                    "source": str(photo.source),
                    "sha256": photo.sha256,
                    "phash": f"{photo.phash:016x}",
                    "duplicates": [str(p) for p in photo.duplicates],
                }
            )
        refused = [{"source": str(r.source), "reason": r.reason} for r in result.refused]
        manifest = {"config": asdict(result.config), "accepted": accepted, "refused": refused}
        atomic_write_json(staging / "intake.json", manifest)
    return out_dir


def _safe_stem(stem: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")
    return cleaned[:60] or "photo"
