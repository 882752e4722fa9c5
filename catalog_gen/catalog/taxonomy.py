"""Photo assignment: which product photo trains which (class, instance) adapter.

Photos reach an instance of a class map (see class_map.py) in one of three ways: folders
(photo_root/<class>/<instance>/), keyword rules over product titles, or explicit class/instance
columns in a products CSV. Every photo ends either assigned or skipped with a reason, so the
report can account for all of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import polars as pl

# ClassMap, ClassSpec, InstanceSpec and load_class_map are also re-exported for callers of taxonomy.*.
from catalog_gen.catalog.class_map import ClassMap, ClassSpec, InstanceSpec, load_class_map, match_words
from catalog_gen.errors import CatalogError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
SKIP_KINDS = frozenset(
    {"unassigned", "ambiguous", "too_few_photos", "unknown_class", "unknown_instance", "missing_file", "bad_row"}
)
VIA = frozenset({"folder", "title", "column"})


# ---------------------------------------------------------------- title rules

def _has(words: tuple[str, ...], keyword: str) -> bool:
    phrase = match_words(keyword)
    return any(words[i:i + len(phrase)] == phrase for i in range(len(words) - len(phrase) + 1))


def _pick(title: str, owners: Mapping[str, tuple[str, ...]], what: str, plural: str) -> str | Skipped:
    """The one owner (class or instance) whose keywords occur in the title, or why there is none."""
    words = match_words(title)
    hits = {key: [kw for kw in kws if _has(words, kw)] for key, kws in owners.items()}
    hits = {key: kws for key, kws in hits.items() if kws}
    if len(hits) == 1:
        return next(iter(hits))
    if not hits:
        return Skipped(title, "unassigned", f"no {what} keyword in title {title!r}; {plural}: {', '.join(owners)}")
    named = ", ".join(f"{key} ({'/'.join(kws)})" for key, kws in hits.items())
    return Skipped(title, "ambiguous", f"title {title!r} matches several {plural}: {named}")


def _match_class(title: str, class_map: ClassMap) -> str | Skipped:
    return _pick(title, {k: c.keywords for k, c in class_map.classes.items()}, "class", "classes")


def _match_instance(title: str, spec: ClassSpec) -> str | Skipped:
    if len(spec.instances) == 1:  # a one-instance class takes every product of the class
        return next(iter(spec.instances))
    return _pick(title, {k: i.keywords for k, i in spec.instances.items()},
                 f"{spec.key} instance", f"{spec.key} instances")


def match_title(title: str, class_map: ClassMap) -> tuple[str, str] | Skipped:
    """(class, instance) for a product title, or a Skipped (item = the title) saying why not."""
    class_key = _match_class(title or "", class_map)
    if isinstance(class_key, Skipped):
        return class_key
    instance_key = _match_instance(title or "", class_map.classes[class_key])
    return instance_key if isinstance(instance_key, Skipped) else (class_key, instance_key)


# ---------------------------------------------------------------- assignments

@dataclass(frozen=True)
class Assignment:
    image: Path
    class_key: str
    instance_key: str
    via: str
    sku: str | None = None
    title: str | None = None
    caption: str | None = None
    """The products CSV's `caption` cell (None: no caption column, or an empty cell)."""

    def __post_init__(self) -> None:
        if self.via not in VIA:
            raise CatalogError(f"assignment of {self.image}: via must be one of {sorted(VIA)}, got {self.via!r}")


@dataclass(frozen=True)
class Skipped:
    item: str
    kind: str
    reason: str

    def __post_init__(self) -> None:
        if self.kind not in SKIP_KINDS:
            raise CatalogError(f"skipped {self.item}: kind must be one of {sorted(SKIP_KINDS)}, got {self.kind!r}")


@dataclass(frozen=True)
class Taxonomy:
    class_map: ClassMap
    assignments: tuple[Assignment, ...]
    skipped: tuple[Skipped, ...]
    min_photos: int | None = None  # None: the class map's min_photos
    caption_column: bool = False
    """The photos came from a products CSV with a `caption` column (lora-captions' first caption source)."""

    def __post_init__(self) -> None:
        if self.min_photos is None:
            object.__setattr__(self, "min_photos", self.class_map.min_photos)
        _check_min_photos(self.min_photos)
        for a in self.assignments:
            self.class_map.get_instance(a.class_key, a.instance_key)

    def _all_groups(self) -> dict[tuple[str, str], list[Path]]:
        groups: dict[tuple[str, str], list[Path]] = {}
        for a in self.assignments:
            groups.setdefault((a.class_key, a.instance_key), []).append(a.image)
        return groups

    def groups(self) -> dict[tuple[str, str], list[Path]]:
        """(class, instance) -> sorted images, only for instances with at least min_photos."""
        return enforce_min_photos(self._all_groups(), self.min_photos)[0]

    def table(self) -> pl.DataFrame:
        counts = {k: len(v) for k, v in self._all_groups().items()}
        rows = []
        for class_key, instance_key in self.class_map.instance_keys():
            n = counts.get((class_key, instance_key), 0)
            status = ("no photos" if n == 0 else "ok" if n >= self.min_photos
                      else f"too few photos ({n} < {self.min_photos})")
            rows.append({"class": class_key, "instance": instance_key, "photos": n, "status": status})
        schema = {"class": pl.String, "instance": pl.String, "photos": pl.Int64, "status": pl.String}
        return pl.DataFrame(rows, schema=schema)


def enforce_min_photos(
    groups: Mapping[tuple[str, str], Sequence[Path]], min_photos: int
) -> tuple[dict[tuple[str, str], list[Path]], list[Skipped]]:
    """Split groups into those with enough photos and a too_few_photos Skipped for each of the rest."""
    _check_min_photos(min_photos)
    kept, skipped = {}, []
    for (class_key, instance_key), images in sorted(groups.items()):
        if len(images) >= min_photos:
            kept[(class_key, instance_key)] = sorted(Path(p) for p in images)
        else:
            skipped.append(Skipped(f"{class_key}/{instance_key}", "too_few_photos",
                                   f"{len(images)} photo(s), fewer than the minimum of {min_photos}"))
    return kept, skipped


def _check_min_photos(min_photos: Any) -> None:
    if not isinstance(min_photos, int) or isinstance(min_photos, bool) or min_photos < 1:
        raise CatalogError(f"min_photos must be an integer >= 1, got {min_photos!r}")


def _finish(class_map: ClassMap, assignments: list[Assignment], skipped: list[Skipped],
            min_photos: int | None, caption_column: bool = False) -> Taxonomy:
    taxonomy = Taxonomy(class_map, tuple(assignments), tuple(skipped), min_photos)
    too_few = enforce_min_photos(taxonomy._all_groups(), taxonomy.min_photos)[1]
    return Taxonomy(class_map, taxonomy.assignments, taxonomy.skipped + tuple(too_few), taxonomy.min_photos,
                    caption_column)


def _folder_key(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())  # "Easy Daily", "easy-daily" -> easy_daily


def _is_photo(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))  # skip .DS_Store and friends


def _photos_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_photo(p) and not any(s.startswith(".") for s in p.parts))


def assign_from_folders(photo_root: Path, class_map: ClassMap, min_photos: int | None = None) -> Taxonomy:
    """Assign photos laid out as photo_root/<class>/<instance>/*.{jpg,jpeg,png,webp}."""
    root = Path(photo_root)
    if not root.is_dir():
        raise CatalogError(f"photo folder {root} does not exist or is not a folder")
    assignments: list[Assignment] = []
    skipped: list[Skipped] = []
    for class_dir in _entries(root):
        if not class_dir.is_dir():
            if _is_photo(class_dir):
                skipped.append(Skipped(class_dir.name, "unassigned", "photo is not inside a <class>/<instance> folder"))
            continue
        class_key = _folder_key(class_dir.name)
        if class_key not in class_map.classes:
            reason = (f"folder '{class_dir.name}' ({len(_photos_under(class_dir))} photos) is not a class; "
                      f"known: {', '.join(class_map.classes)}")
            skipped.append(Skipped(f"{class_dir.name}/", "unknown_class", reason))
            continue
        spec = class_map.classes[class_key]
        for instance_dir in _entries(class_dir):
            rel = f"{class_dir.name}/{instance_dir.name}"
            if not instance_dir.is_dir():
                if _is_photo(instance_dir):
                    skipped.append(Skipped(rel, "unassigned", f"photo is not inside an instance folder of "
                                                              f"'{class_key}'; known: {', '.join(spec.instances)}"))
                continue
            instance_key = _folder_key(instance_dir.name)
            photos = _photos_under(instance_dir)
            if instance_key not in spec.instances:
                reason = (f"folder '{instance_dir.name}' ({len(photos)} photos) is not an instance of "
                          f"'{class_key}'; known: {', '.join(spec.instances)}")
                skipped.append(Skipped(f"{rel}/", "unknown_instance", reason))
                continue
            assignments += [Assignment(p, class_key, instance_key, "folder") for p in photos]
    return _finish(class_map, assignments, skipped, min_photos)


# ---------------------------------------------------------------- products CSV

def _read_products(path: Path) -> pl.DataFrame:
    try:
        # Every column as text: SKUs like "0012" must keep their zeros.
        frame = pl.read_csv(path, infer_schema=False, encoding="utf8")
    except FileNotFoundError as exc:
        raise CatalogError(f"products CSV {path} does not exist") from exc
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise CatalogError(f"cannot read products CSV {path}: {str(exc).splitlines()[0]}") from exc
    names = [c.lstrip("\ufeff").strip().lower() for c in frame.columns]
    if len(set(names)) != len(names):
        raise CatalogError(f"products CSV {path}: duplicate column names {frame.columns}")
    frame.columns = names
    if "image" not in names or not ({"title", "class"} & set(names)):
        raise CatalogError(f"products CSV {path}: needs an 'image' column and a 'title' (or 'class') column; "
                           f"found: {', '.join(names)}")
    return frame


def _classify_row(row: Mapping[str, str | None], item: str, class_map: ClassMap) -> tuple[str, str, str] | Skipped:
    title = (row.get("title") or "").strip()
    class_cell, instance_cell = (row.get("class") or "").strip(), (row.get("instance") or "").strip()
    class_key = _cell_or_title(class_cell, class_map.classes, "class", "the class map", item,
                               lambda: _match_class(title, class_map))
    if isinstance(class_key, Skipped):
        return class_key
    spec = class_map.classes[class_key]
    instance_key = _cell_or_title(instance_cell, spec.instances, "instance", f"class '{class_key}'", item,
                                  lambda: _match_instance(title, spec))
    if isinstance(instance_key, Skipped):
        return instance_key
    return class_key, instance_key, "column" if class_cell or instance_cell else "title"


def _cell_or_title(cell: str, known: Mapping[str, Any], what: str, where: str, item: str,
                   by_title: Callable[[], str | Skipped]) -> str | Skipped:
    """One half of a row's (class, instance); a Skipped names the CSV row (item), not the title."""
    # Explicit columns win over title rules; an empty cell falls back to the title for that half.
    if cell:
        key = _folder_key(cell)
        if key not in known:
            return Skipped(item, f"unknown_{what}", f"{what} '{cell}' is not in {where}; known: {', '.join(known)}")
        return key
    key = by_title()
    return Skipped(item, key.kind, key.reason) if isinstance(key, Skipped) else key


def assign_from_products(
    products_csv: Path, photo_root: Path | None, class_map: ClassMap, min_photos: int | None = None
) -> Taxonomy:
    """Assign photos listed in a CSV (sku, title, image [, class, instance]); images relative to photo_root."""
    csv_path = Path(products_csv)
    root = Path(photo_root) if photo_root is not None else csv_path.parent
    frame = _read_products(csv_path)
    assignments: list[Assignment] = []
    skipped: list[Skipped] = []
    seen: dict[Path, int] = {}
    for index, row in enumerate(frame.iter_rows(named=True)):
        line = index + 2  # header is line 1 (exact unless a quoted field spans lines)
        sku = (row.get("sku") or "").strip() or None
        item = f"{csv_path.name} line {line}" + (f" (sku {sku})" if sku else "")
        image = (row.get("image") or "").strip()
        if not image:
            skipped.append(Skipped(item, "bad_row", f"line {line}: empty image"))
            continue
        path = Path(image) if Path(image).is_absolute() else root / image
        if not path.is_file():
            skipped.append(Skipped(item, "missing_file", f"line {line}: image file {path} not found"))
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            kinds = "/".join(sorted(IMAGE_SUFFIXES))
            skipped.append(Skipped(item, "bad_row", f"line {line}: {image} is not a {kinds} photo"))
            continue
        resolved = path.resolve()
        if resolved in seen:  # one photo must not train two adapters
            skipped.append(Skipped(item, "bad_row", f"line {line}: {image} already listed on line {seen[resolved]}"))
            continue
        seen[resolved] = line
        result = _classify_row(row, item, class_map)
        if isinstance(result, Skipped):
            skipped.append(result)
            continue
        title = (row.get("title") or "").strip() or None
        caption = (row.get("caption") or "").strip() or None
        assignments.append(Assignment(path, result[0], result[1], result[2], sku=sku, title=title, caption=caption))
    return _finish(class_map, assignments, skipped, min_photos, caption_column="caption" in frame.columns)
