"""One caption per product photo, for caption-based LoRA training (`catalog train --method lora-captions`).

Where a photo's caption comes from, first found wins:
    column          the products CSV's `caption` cell for the photo's row
    caption file    a `<photo>.txt` beside the photo (the photo's name with .txt; kohya-ss reads the same file)
    title           the products CSV's `title` cell
    instance prompt the class map's instance prompt without an identifier token ("photo of a beaded hoops"),
                    for photos with none of the above (a folder of photos and nothing else)

Nothing here refuses a photo: a photo without its own caption gets the next source, and `fallback_notes`
says which photos did and what they got instead, so a missing caption is seen, not silently replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from catalog_gen.errors import CatalogError

CAPTION_SOURCES = ("column", "caption file", "title", "instance prompt")
CAPTION_FILE_SUFFIX = ".txt"
CAPTION_MAX_BYTES = 16_384
"""A caption file longer than this is not a caption (CLIP reads 77 tokens); it is refused, named."""


@dataclass(frozen=True)
class Caption:
    text: str
    source: str
    """One of CAPTION_SOURCES."""


def caption_file_of(photo: Path) -> Path:
    return Path(photo).with_suffix(CAPTION_FILE_SUFFIX)


def read_caption_file(photo: Path) -> str | None:
    """The text of the photo's caption file, or None when there is none or it is blank."""
    path = caption_file_of(photo)
    if not path.is_file():
        return None
    if path.stat().st_size > CAPTION_MAX_BYTES:
        raise CatalogError(f"caption file {path}: {path.stat().st_size} bytes is not a caption "
                           f"(at most {CAPTION_MAX_BYTES})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise CatalogError(f"caption file {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    return clean_caption(text)


def clean_caption(text: str | None) -> str | None:
    """One line of single-spaced text, or None when nothing is left."""
    if text is None:
        return None
    cleaned = " ".join(text.split())
    return cleaned or None


def caption_for(photo: Path, column: str | None, title: str | None, instance_prompt: str) -> Caption:
    """The caption of one photo from the first source that has one (the module docstring's order)."""
    # Looked up in turn: a photo with a caption cell never has its caption file read.
    for source, find in (("column", lambda: clean_caption(column)), ("caption file", lambda: read_caption_file(photo)),
                         ("title", lambda: clean_caption(title))):
        text = find()
        if text is not None:
            return Caption(text, source)
    return Caption(instance_prompt, "instance prompt")


def fallback_notes(key: str, photos: Sequence[str], captions: Sequence[Caption], column_given: bool) -> list[str]:
    """One line per fallback used: which of the instance's photos had no caption of their own and what they
    were captioned by instead. A photo's own caption is its caption cell when the products CSV has a caption
    column, else its caption file."""
    lacking = {"caption file": "an empty caption cell",
               "title": "no caption cell and no caption file" if column_given else "no caption file",
               "instance prompt": ("no caption cell, caption file or title" if column_given
                                   else "no caption file and no title")}
    own = "column" if column_given else "caption file"
    notes = []
    for source in CAPTION_SOURCES:
        named = [Path(photo).name for photo, caption in zip(photos, captions) if caption.source == source]
        if source == own or source not in lacking or not named:
            continue
        shown = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
        notes.append(f"{key}: {len(named)} of {len(photos)} photos have {lacking[source]}; captioned by their "
                     f"{source} instead: {shown}")
    return notes
