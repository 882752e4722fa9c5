"""SKU sheets for the nightly generator: read, check against the class map, name folders, write CSVs.

A sheet (CSV or Parquet) has one row per product to generate: sku, class, instance, optional
n_images and seed, and any other columns, which become prompt template variables. Every row
ends either accepted or rejected with its line number and a reason, so the run can account
for all of them. Everything here is pure except the reader and the two CSV writers.
"""

from __future__ import annotations

import hashlib
import numbers
import re
import string
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import polars as pl

from catalog_gen.catalog.class_map import ClassMap
from catalog_gen.errors import CatalogError
from catalog_gen.storage import atomic_path

REQUIRED_COLUMNS = ("sku", "class", "instance")
OPTIONAL_COLUMNS = ("n_images", "seed")
MAX_IMAGES_PER_SKU = 64
MAX_SEED = 2**63 - 1
BUILTIN_VARIABLES = frozenset({"token", "instance", "noun", "instance_prompt"})
FOLDER_NAME_MAX = 80
_DIGITS = re.compile(r"[0-9]+")  # int() would also take "+4", "4_0" and non-ASCII digits
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_WINDOWS_RESERVED = frozenset({"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                               *(f"lpt{i}" for i in range(1, 10))})
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # OWASP CSV injection guidance


@dataclass(frozen=True)
class SkuRow:
    line: int
    sku: str
    class_key: str
    instance_key: str
    n_images: int | None
    seed: int | None
    variables: Mapping[str, str]
    """Every other column with a non-empty cell (column name -> stripped value)."""


@dataclass(frozen=True)
class RejectedRow:
    line: int
    sku: str
    reason: str


# ---------------------------------------------------------------- reading

def read_sku_sheet(path: Path) -> tuple[list[SkuRow], list[RejectedRow]]:
    """Read a .csv or .parquet SKU sheet; rows that are wholly empty are ignored."""
    path = Path(path)
    frame, lines = _read_frame(path)
    frame = _normalise_columns(frame, path)
    rows: list[SkuRow] = []
    rejects: list[RejectedRow] = []
    first_line: dict[str, int] = {}
    for line, raw in zip(lines, frame.iter_rows(named=True)):
        cells = {name: (value or "").strip() for name, value in raw.items()}
        if not any(cells.values()):  # a blank line or a spreadsheet's trailing ",,,,"
            continue
        result = _parse_row(line, cells, first_line)
        (rejects if isinstance(result, RejectedRow) else rows).append(result)
    return rows, rejects


def _read_frame(path: Path) -> tuple[pl.DataFrame, list[int]]:
    """Every column as text (SKUs like "0012" keep their zeros), and each row's line number."""
    suffix = path.suffix.lower()
    if path.is_dir():
        raise CatalogError(f"SKU sheet {path} is a folder; give the .csv or .parquet file")
    if suffix not in (".csv", ".parquet"):
        raise CatalogError(f"SKU sheet {path}: must be a .csv or .parquet file")
    if not path.is_file():
        raise CatalogError(f"SKU sheet {path} does not exist")
    try:
        if suffix == ".parquet":
            frame = pl.read_parquet(path)
            return frame.select(pl.all().cast(pl.String)), list(range(2, frame.height + 2))
        frame = pl.read_csv(path, infer_schema=False, encoding="utf8")  # polars drops a BOM itself
    except (OSError, pl.exceptions.PolarsError) as exc:
        message = str(exc).splitlines()[0]
        hint = "; save it as UTF-8 CSV" if "utf-8" in message.lower() else ""
        raise CatalogError(f"cannot read SKU sheet {path}: {message}{hint}") from exc
    return frame, _csv_lines(frame)


def _csv_lines(frame: pl.DataFrame) -> list[int]:
    # A quoted cell may span lines; count its line breaks so line numbers match an editor's.
    line = 2 + sum(name.count("\n") for name in frame.columns)
    lines = []
    for row in frame.iter_rows():
        lines.append(line)
        line += 1 + sum(value.count("\n") for value in row if value)
    return lines


def _normalise_columns(frame: pl.DataFrame, path: Path) -> pl.DataFrame:
    names = [c.lstrip("\ufeff").strip().lower() for c in frame.columns]
    renamed = [n.rsplit("_duplicated_", 1)[0] for n in names if "_duplicated_" in n]  # polars: "sku_duplicated_0"
    if len(set(names)) != len(names) or set(renamed) & set(names):
        raise CatalogError(f"SKU sheet {path}: duplicate column names {frame.columns}")
    frame.columns = names
    if "" in names:  # a trailing comma on the header line is harmless when its column is empty
        if frame.get_column("").str.strip_chars().fill_null("").str.len_chars().sum():
            raise CatalogError(f"SKU sheet {path}: column {names.index('') + 1} has values but no name")
        frame = frame.drop("")
    for column in REQUIRED_COLUMNS:
        if column not in frame.columns:
            raise CatalogError(f"SKU sheet {path}: missing required column '{column}'; "
                               f"found: {', '.join(frame.columns)}")
    return frame


def _parse_row(line: int, cells: dict[str, str], first_line: dict[str, int]) -> SkuRow | RejectedRow:
    sku = cells["sku"]
    if not sku:
        return RejectedRow(line, "", "empty sku")
    if sku in first_line:
        return RejectedRow(line, sku, f"duplicate sku '{sku}' (first on line {first_line[sku]})")
    first_line[sku] = line
    problems = [f"empty {column}" for column in ("class", "instance") if not cells[column]]
    n_images = _whole_number(cells.get("n_images", ""), "n_images", 1, MAX_IMAGES_PER_SKU, problems)
    seed = _whole_number(cells.get("seed", ""), "seed", 0, MAX_SEED, problems)
    if problems:
        return RejectedRow(line, sku, "; ".join(problems))
    variables = {k: v for k, v in cells.items() if k not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS and v}
    return SkuRow(line, sku, cells["class"], cells["instance"], n_images, seed, MappingProxyType(variables))


def _whole_number(cell: str, column: str, low: int, high: int, problems: list[str]) -> int | None:
    if not cell:
        return None
    kind = "a positive integer" if low == 1 else "a non-negative integer"
    if not _DIGITS.fullmatch(cell):
        problems.append(f"{column} '{cell}' is not {kind}")
        return None
    value = int(cell)
    if not low <= value <= high:
        problems.append(f"{column} {value} is out of range: must be {kind} from {low} to {high}")
        return None
    return value


# ---------------------------------------------------------------- checking against the class map

def _key(cell: str) -> str:
    return re.sub(r"[\s\-]+", "_", cell.strip().lower())  # "Easy Daily", "easy-daily" -> easy_daily


def validate_rows(
    rows: Sequence[SkuRow],
    class_map: ClassMap,
    adapter_problem: Callable[[str, str], str | None],
    template_for: Callable[[str], str],
    builtin_variables: frozenset[str] = BUILTIN_VARIABLES,
) -> tuple[list[SkuRow], list[RejectedRow]]:
    """Rows whose class, instance, adapter and template variables check out, keys normalised.

    adapter_problem(class, instance) says why that instance's adapter cannot be used (None: it can).
    """
    good: list[SkuRow] = []
    rejects: list[RejectedRow] = []
    fields: dict[str, tuple[str, set[str]]] = {}  # class -> (template, its fields); a bad template raises
    for row in rows:
        problems = [f"column '{name}' would shadow the built-in template variable {{{name}}}; rename the column"
                    for name in sorted(set(row.variables) & builtin_variables)]
        class_key, instance_key = _key(row.class_key), _key(row.instance_key)
        if class_key not in class_map.classes:
            problems.append(f"unknown class '{row.class_key}'; known: {', '.join(class_map.classes)}")
        else:
            spec = class_map.classes[class_key]
            if instance_key not in spec.instances:
                problems.append(f"unknown instance '{row.instance_key}' in class '{class_key}'; "
                                f"known: {', '.join(spec.instances)}")
            elif (problem := adapter_problem(class_key, instance_key)) is not None:
                problems.append(problem)
            if class_key not in fields:
                template = template_for(class_key)
                fields[class_key] = (template, template_fields(template))
            template, needed = fields[class_key]
            for name in sorted(needed - builtin_variables - set(row.variables)):
                problems.append(f"missing template variable '{name}' needed by template {template!r}; "
                                f"add a '{name}' column or fill its cell")
        if problems:
            rejects.append(RejectedRow(row.line, row.sku, "; ".join(problems)))
        else:
            good.append(replace(row, class_key=class_key, instance_key=instance_key))
    return good, rejects


# ---------------------------------------------------------------- prompt templates

def _parse_template(template: str) -> list[tuple[str, str | None]]:
    """(literal text, field name or None) pieces; only plain {name} placeholders are allowed."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise CatalogError(f"prompt template {template!r} is not valid ({exc}); "
                           f"write literal braces as {{{{ and }}}}") from exc
    pieces = []
    for literal, name, spec, conversion in parsed:
        # "{a.b}" and "{a[0]}" would reach into objects; "{0}", "{a!r}" and "{a:>9}" have no place in a prompt.
        if name is not None and (not name or name.isdigit() or "." in name or "[" in name or spec or conversion):
            field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise CatalogError(f"prompt template {template!r}: placeholder {field} is not allowed (no attribute or "
                               f"index access, positional fields, conversions or format specs); use a plain {{name}}")
        pieces.append((literal, name))
    return pieces


def template_fields(template: str) -> set[str]:
    return {name for _, name in _parse_template(template) if name is not None}


def render_prompt(template: str, variables: Mapping[str, str]) -> str:
    pieces = _parse_template(template)
    missing = [name for _, name in pieces if name is not None and name not in variables]
    if missing:
        raise CatalogError(f"prompt template {template!r}: no value for {', '.join(dict.fromkeys(missing))}")
    # Built by hand rather than str.format, so no value is ever looked up beyond variables[name].
    return "".join(literal + (str(variables[name]) if name is not None else "") for literal, name in pieces)


# ---------------------------------------------------------------- folder names

def _sanitise(sku: str) -> str:
    # Accents folded first ("été" -> "ete") so names stay readable; everything else unsafe -> "_".
    folded = "".join(c for c in unicodedata.normalize("NFKD", sku) if not unicodedata.combining(c))
    name = _UNSAFE.sub("_", folded).strip(". ")[:FOLDER_NAME_MAX].rstrip(". ")
    if name.split(".", 1)[0].lower() in _WINDOWS_RESERVED:  # "CON", "con.txt": reserved on Windows
        name = "_" + name[:FOLDER_NAME_MAX - 1]
    return name or "sku"


def _with_hash(base: str, sku: str, width: int) -> str:
    base = base[:FOLDER_NAME_MAX - width - 1].rstrip(". ")
    return f"{base or 'sku'}-{hashlib.sha256(sku.encode('utf-8')).hexdigest()[:width]}"


def sku_folder_names(skus: Sequence[str]) -> dict[str, str]:
    """A safe folder name per SKU, unique even on case-insensitive file systems, independent of order."""
    bases = {sku: _sanitise(sku) for sku in skus}
    by_folded: dict[str, set[str]] = {}
    for sku, base in bases.items():
        by_folded.setdefault(base.lower(), set()).add(sku)
    width = {sku: 8 if base != sku or len(by_folded[base.lower()]) > 1 else 0 for sku, base in bases.items()}
    while True:
        names = {sku: _with_hash(bases[sku], sku, w) if w else bases[sku] for sku, w in width.items()}
        owners: dict[str, set[str]] = {}
        for sku, name in names.items():
            owners.setdefault(name.lower(), set()).add(sku)
        clashing = {sku for group in owners.values() if len(group) > 1 for sku in group}
        if not clashing:  # only a crafted SKU like "A-<hash of a>" gets here twice
            return names
        for sku in clashing:  # widen every clashing name; a full 64-hex hash cannot clash
            width[sku] = {0: 8, 8: 16}.get(width[sku], 64)


# ---------------------------------------------------------------- CSV output

def escape_csv_cell(value: Any) -> str:
    """A cell as text, with a leading ' on text a spreadsheet would run as a formula."""
    if value is None:
        return ""
    if isinstance(value, numbers.Number) and not isinstance(value, bool):  # ints, floats, numpy scalars
        return str(value)
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _escape_expr(column: str) -> pl.Expr:
    col = pl.col(column).cast(pl.String)
    starts = pl.any_horizontal([col.str.starts_with(p) for p in _FORMULA_START])
    return pl.when(starts).then(pl.lit("'") + col).otherwise(col).alias(column)


def write_csv_escaped(frame: pl.DataFrame, path: Path) -> Path:
    """Write `frame` as UTF-8 CSV atomically, every text cell (and header) escaped against formulas."""
    exprs = []
    for name, dtype in frame.schema.items():
        if dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum):
            exprs.append(_escape_expr(name))
        elif dtype.is_nested() or dtype == pl.Object:
            raise CatalogError(f"cannot write column '{name}' ({dtype}) to CSV {path}")
        else:
            exprs.append(pl.col(name))
    escaped = frame.select(exprs) if exprs else frame
    escaped.columns = [escape_csv_cell(name) for name in frame.columns]
    path = Path(path)
    with atomic_path(path) as tmp:
        escaped.write_csv(tmp)
    return path


def write_rejects(rejects: Sequence[RejectedRow], path: Path) -> Path:
    frame = pl.DataFrame(
        {"line": [r.line for r in rejects], "sku": [r.sku for r in rejects], "reason": [r.reason for r in rejects]},
        schema={"line": pl.Int64, "sku": pl.String, "reason": pl.String},
    )
    return write_csv_escaped(frame, path)
