"""The reviewers' decisions: approve / reject per candidate, validated, merged and stored safely.

RUN_DIR/decisions.parquet and RUN_DIR/decisions.csv (formula-escaped), one row per
(sku, candidate), the latest decision winning:

    sku (str), candidate (int), decision ("approve" | "reject"),
    reason_code (str or null; set for rejects), note (str or null),
    reviewer (str), decided_at (ISO 8601 UTC str, e.g. 2025-06-01T21:04:05.123Z)

An entry with decision "undo" removes its row. Every change is a read-merge-write of the
table under an exclusive lock on RUN_DIR/.decisions.lock (fcntl.flock), so two servers,
two tabs or an import running at the same time never overwrite each other's rows; both
files are written atomically. Validation and merging are pure functions; the lock and the
files sit at the edges. The HTTP server that takes decisions from the page is server.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from catalog_gen.errors import CatalogError
from catalog_gen.layout import DECISIONS_CSV, DECISIONS_LOCK, DECISIONS_PARQUET
from catalog_gen.storage import atomic_path, exclusive_lock

COLUMNS = ("sku", "candidate", "decision", "reason_code", "note", "reviewer", "decided_at")
DECISIONS = ("approve", "reject")
UNDO = "undo"
REASON_CODES = {  # code -> label shown in the page (keys 1-6 pick them, in this order)
    "wrong_product": "Wrong product",
    "wrong_colour_or_metal": "Wrong colour or metal",
    "artefact": "Artefact",
    "background": "Background",
    "cropped": "Cropped",
    "other": "Other (needs a note)",
}
MAX_NOTE = 2000
MAX_REVIEWER = 100
MAX_ENTRIES = 10_000
MAX_BODY_BYTES = 2 << 20
EXPORT_FORMAT = "catalog-gen-decisions"


@dataclass(frozen=True)
class Entry:
    """One validated change: a decision to store, or an undo (decision "undo")."""

    sku: str
    candidate: int
    decision: str
    reason_code: str | None
    note: str | None
    reviewer: str
    decided_at: str
    stamped_by_client: bool = False
    """decided_at came with the entry (an import): an older entry does not replace a newer row."""

    def row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in COLUMNS}


@dataclass(frozen=True)
class ImportResult:
    applied: int
    skipped_older: int
    decisions: Any  # polars DataFrame


# ---------------------------------------------------------------- pure: validation and merging

def utc_now() -> str:
    return format_time(datetime.now(timezone.utc))


def format_time(moment: datetime) -> str:
    """One fixed ISO format, so the strings sort in time order."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def check_reviewer(value: Any, where: str = "reviewer") -> str:
    if not isinstance(value, str) or not value.strip():
        raise CatalogError(f"{where}: expected a non-empty name, got {value!r}")
    name = value.strip()
    if len(name) > MAX_REVIEWER or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise CatalogError(f"{where}: {name[:40]!r} is too long or has control characters "
                           f"(at most {MAX_REVIEWER} printable characters)")
    return name


def parse_entries(raw: Any, known: Mapping[str, Sequence[int]] | set, *, reviewer: str, now: str,
                  from_client_file: bool = False) -> list[Entry]:
    """Check a list of decision entries strictly; raise CatalogError naming the first bad entry.

    `known` maps each SKU to its reviewable candidate numbers. Live entries (from the page)
    may not set reviewer or decided_at; entries of an exported file (`from_client_file`) may,
    and may not be "undo".
    """
    if not isinstance(raw, list):
        raise CatalogError(f"decisions: expected a list of entries, got {type(raw).__name__}")
    if len(raw) > MAX_ENTRIES:
        raise CatalogError(f"decisions: {len(raw)} entries in one batch; at most {MAX_ENTRIES}")
    allowed = set(COLUMNS) if from_client_file else {"sku", "candidate", "decision", "reason_code", "note"}
    return [_parse_entry(n, item, known, allowed, reviewer, now, from_client_file) for n, item in enumerate(raw, 1)]


def _parse_entry(n: int, item: Any, known, allowed: set, reviewer: str, now: str, from_file: bool) -> Entry:
    if not isinstance(item, dict):
        raise CatalogError(f"entry {n}: expected an object, got {type(item).__name__}")
    sku, candidate = item.get("sku"), item.get("candidate")
    name = f"entry {n} (sku {sku!r}, candidate {candidate!r})"
    extra = sorted(set(item) - allowed)
    if extra:
        raise CatalogError(f"{name}: unexpected field(s) {', '.join(map(repr, extra))}; "
                           f"allowed: {', '.join(sorted(allowed))}")
    if not isinstance(sku, str) or not sku:
        raise CatalogError(f"{name}: sku must be a non-empty string")
    if isinstance(candidate, bool) or not isinstance(candidate, int):
        raise CatalogError(f"{name}: candidate must be a whole number")
    if sku not in known:
        raise CatalogError(f"{name}: unknown sku (not in this run's manifest)")
    if candidate not in known[sku]:
        raise CatalogError(f"{name}: unknown candidate; sku {sku!r} has candidates "
                           f"{', '.join(map(str, sorted(known[sku])))}")
    decision = item.get("decision")
    choices = DECISIONS if from_file else (*DECISIONS, UNDO)
    if decision not in choices:
        raise CatalogError(f"{name}: decision {decision!r} is not one of {', '.join(choices)}")
    reason_code, note = item.get("reason_code"), item.get("note")
    if decision == "reject":
        if reason_code not in REASON_CODES:
            raise CatalogError(f"{name}: a reject needs reason_code, one of {', '.join(REASON_CODES)}; "
                               f"got {reason_code!r}")
    elif reason_code is not None:
        raise CatalogError(f"{name}: reason_code {reason_code!r} is only for rejects")
    if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
        raise CatalogError(f"{name}: note must be text of at most {MAX_NOTE} characters")
    note = (note or "").strip() or None
    if reason_code == "other" and note is None:
        raise CatalogError(f"{name}: reason_code 'other' needs a note saying what is wrong")
    who = check_reviewer(item["reviewer"], f"{name}: reviewer") if item.get("reviewer") is not None else reviewer
    stamped = "decided_at" in item
    when = _parse_time(item["decided_at"], name) if stamped else now
    return Entry(sku, candidate, decision, reason_code, note if decision != UNDO else None, who, when, stamped)


def _parse_time(value: Any, name: str) -> str:
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise CatalogError(f"{name}: decided_at must be an ISO 8601 time with a time zone, got {value!r}")
    return format_time(moment)


def merge_decisions(rows: Iterable[Mapping[str, Any]], entries: Sequence[Entry]) -> tuple[list[dict], int]:
    """Apply entries in order to the stored rows; returns (rows sorted by sku and candidate, entries skipped).

    Latest wins: live entries are stamped now; an imported entry older than the stored row is skipped.
    """
    table = {(row["sku"], row["candidate"]): dict(row) for row in rows}
    skipped = 0
    for entry in entries:
        key = (entry.sku, entry.candidate)
        current = table.get(key)
        if entry.stamped_by_client and current is not None and current["decided_at"] > entry.decided_at:
            skipped += 1
        elif entry.decision == UNDO:
            table.pop(key, None)
        else:
            table[key] = entry.row()
    return [table[key] for key in sorted(table)], skipped


def known_candidates(manifest_rows: Iterable[Mapping[str, Any]]) -> dict[str, set[int]]:
    """SKU -> candidate numbers a reviewer can decide on (error rows, candidate -1, are not images)."""
    known: dict[str, set[int]] = {}
    for row in manifest_rows:
        if row["candidate"] is not None and row["candidate"] >= 0 and row.get("path"):
            known.setdefault(row["sku"], set()).add(int(row["candidate"]))
    return known


def export_payload(rows: Sequence[Mapping[str, Any]], run: str) -> dict:
    """What the page's "Export decisions" button downloads (and `catalog review --import` reads)."""
    return {"format": EXPORT_FORMAT, "version": 1, "run": run, "decisions": [dict(row) for row in rows]}


# ---------------------------------------------------------------- files: lock, read, write

def decisions_lock(run_dir: Path):
    """An exclusive lock over the decisions of one run, across threads, processes and servers."""
    return exclusive_lock(Path(run_dir) / DECISIONS_LOCK)


def load_decisions(run_dir: Path):
    """The stored decisions as a polars DataFrame (empty, with the schema, before any review)."""
    import polars as pl

    path = Path(run_dir) / DECISIONS_PARQUET
    if not path.is_file():
        return _frame([])
    try:
        return pl.read_parquet(path).select(COLUMNS)
    except Exception as error:
        raise CatalogError(f"{path}: cannot read decisions ({error})") from error


def read_manifest_keys(run_dir: Path) -> dict[str, set[int]]:
    from catalog_gen.generate.manifest import read_manifest

    return known_candidates(read_manifest(run_dir, ["sku", "candidate", "path"]).iter_rows(named=True))


def record_decisions(run_dir: Path, entries: Any, reviewer: str | None = None):
    """Validate entries (a list of dicts) and merge them into the run's decisions; returns the new table."""
    run_dir = Path(run_dir)
    parsed = parse_entries(entries, read_manifest_keys(run_dir), reviewer=check_reviewer(reviewer or default_reviewer()),
                           now=utc_now())
    return apply_entries(run_dir, parsed)[0]


def import_decisions(run_dir: Path, path: Path, reviewer: str | None = None) -> ImportResult:
    """Apply a decisions file exported from the static report; every entry is checked first."""
    run_dir, path = Path(run_dir), Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogError(f"decisions file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CatalogError(f"{path}: not a JSON file ({error})") from error
    if isinstance(payload, dict):
        if payload.get("format") != EXPORT_FORMAT or "decisions" not in payload:
            raise CatalogError(f"{path}: not an exported decisions file (expected \"format\": \"{EXPORT_FORMAT}\" "
                               "and a \"decisions\" list)")
        payload = payload["decisions"]
    try:
        entries = parse_entries(payload, read_manifest_keys(run_dir), now=utc_now(), from_client_file=True,
                                reviewer=check_reviewer(reviewer or default_reviewer()))
    except CatalogError as error:
        raise CatalogError(f"{path}: {error}") from None
    table, skipped = apply_entries(run_dir, entries)
    return ImportResult(len(entries) - skipped, skipped, table)


def apply_entries(run_dir: Path, entries: Sequence[Entry]):
    """Merge validated entries into the stored decisions under the run's lock; returns (table, skipped older)."""
    with decisions_lock(run_dir):
        # Read what is on disk now (another client may have written since we last looked), merge, write.
        rows, skipped = merge_decisions(load_decisions(run_dir).iter_rows(named=True), entries)
        table = _frame(rows)
        _write(run_dir, table)
    return table, skipped


def _frame(rows: Sequence[Mapping[str, Any]]):
    import polars as pl

    schema = {"sku": pl.String, "candidate": pl.Int64, "decision": pl.String, "reason_code": pl.String,
              "note": pl.String, "reviewer": pl.String, "decided_at": pl.String}
    return pl.DataFrame({name: [row[name] for row in rows] for name in COLUMNS}, schema=schema)


def _write(run_dir: Path, table) -> None:
    from catalog_gen.generate.skus import write_csv_escaped

    with atomic_path(run_dir / DECISIONS_PARQUET) as tmp:
        table.write_parquet(tmp)
        with open(tmp, "rb") as handle:  # on disk before the rename: a power cut loses nothing reported saved
            os.fsync(handle.fileno())
    write_csv_escaped(table, run_dir / DECISIONS_CSV)


def default_reviewer() -> str:
    import getpass

    try:
        return getpass.getuser() or "reviewer"
    except Exception:  # no user name in a bare container
        return "reviewer"
