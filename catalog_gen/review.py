"""Human review of a run: approve / reject decisions per candidate, stored safely, served locally.

RUN_DIR/decisions.parquet and RUN_DIR/decisions.csv (formula-escaped), one row per
(sku, candidate), the latest decision winning:

    sku (str), candidate (int), decision ("approve" | "reject"),
    reason_code (str or null; set for rejects), note (str or null),
    reviewer (str), decided_at (ISO 8601 UTC str, e.g. 2025-06-01T21:04:05.123Z)

An entry with decision "undo" removes its row. Every change is a read-merge-write of the
table under an exclusive lock on RUN_DIR/.decisions.lock (fcntl.flock), so two servers,
two tabs or an import running at the same time never overwrite each other's rows; both
files are written atomically. Validation and merging are pure functions; the lock, the
files and the HTTP server sit at the edges.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import unquote, urlsplit

from catalog_gen import layout
from catalog_gen.errors import CatalogError
from catalog_gen.layout import DECISIONS_CSV, DECISIONS_LOCK, DECISIONS_PARQUET
from catalog_gen.storage import atomic_path, exclusive_lock, is_inside

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
    import polars as pl

    run_dir = Path(run_dir)
    manifest = run_dir / layout.MANIFEST_PARQUET
    if not run_dir.is_dir():
        raise CatalogError(f"run folder {run_dir} does not exist")
    if not manifest.is_file():
        raise CatalogError(f"{run_dir} has no {manifest.name}: is it a finished run folder (catalog generate)?")
    return known_candidates(pl.read_parquet(manifest, columns=["sku", "candidate", "path"]).iter_rows(named=True))


def record_decisions(run_dir: Path, entries: Any, reviewer: str | None = None):
    """Validate entries (a list of dicts) and merge them into the run's decisions; returns the new table."""
    run_dir = Path(run_dir)
    parsed = parse_entries(entries, read_manifest_keys(run_dir), reviewer=check_reviewer(reviewer or default_reviewer()),
                           now=utc_now())
    return _apply(run_dir, parsed)[0]


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
    table, skipped = _apply(run_dir, entries)
    return ImportResult(len(entries) - skipped, skipped, table)


def _apply(run_dir: Path, entries: Sequence[Entry]):
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
    from catalog_gen.skus import write_csv_escaped

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


# ---------------------------------------------------------------- the local review server

class ReviewServer(ThreadingHTTPServer):
    """Serves the run folder's layout.SERVED_ROOTS and takes decisions on /api/decisions (127.0.0.1 only)."""

    daemon_threads = True

    def __init__(self, run_dir: Path, port: int, reviewer: str):
        self.run_dir = Path(run_dir).resolve()
        self.reviewer = reviewer
        super().__init__(("127.0.0.1", port), _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{layout.report_url_path()}"


def serve(run_dir: Path, port: int = 0, reviewer: str | None = None, progress=None) -> ReviewServer:
    """Write the report and bind the review server (not yet serving: call serve_forever()).

    `progress(done, total)` is called while thumbnails are made (see report.write_report).
    """
    from catalog_gen.report import write_report

    run_dir = Path(run_dir)
    if not 0 <= port <= 65535:
        raise CatalogError(f"--port must be 0 (any free port) to 65535, got {port}")
    reviewer = check_reviewer(reviewer or default_reviewer(), "--reviewer")
    write_report(run_dir, progress=progress)
    try:
        return ReviewServer(run_dir, port, reviewer)
    except OSError as error:
        raise CatalogError(f"cannot listen on 127.0.0.1:{port} ({error.strerror}); "
                           "try another --port, or --port 0 for any free one") from None


class _Handler(BaseHTTPRequestHandler):
    server: ReviewServer
    server_version = "catalog-gen-review"
    STATIC_ROOTS = layout.SERVED_ROOTS

    def log_message(self, format, *args):  # the library never prints
        pass

    def do_GET(self):
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        if path in ("/", f"/{layout.REPORT_DIR}", f"/{layout.REPORT_DIR}/"):
            self.send_response(302)
            self.send_header("Location", layout.report_url_path())
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/api/decisions":
            self._send_json(200, self._state())
        else:
            self._send_file(path)

    def do_POST(self):
        if not self._host_ok():
            return
        if urlsplit(self.path).path != "/api/decisions":
            return self._send_json(404, {"error": "not found"})
        try:
            payload = self._read_json()
            reviewer = self.server.reviewer
            if "reviewer" in payload and payload["reviewer"] not in (None, ""):
                reviewer = check_reviewer(payload["reviewer"])
            parsed = parse_entries(payload["entries"], read_manifest_keys(self.server.run_dir),
                                   reviewer=reviewer, now=utc_now())
            _apply(self.server.run_dir, parsed)
        except CatalogError as error:
            return self._send_json(400, {"error": str(error)})
        except OSError as error:  # disk full, permissions: the page keeps the entries and retries
            return self._send_json(503, {"error": f"could not save the decisions: {error}"})
        self._send_json(200, self._state())

    # -- helpers

    def _host_ok(self) -> bool:
        # Only pages of this server may talk to it: a wrong Host is DNS rebinding, a foreign Origin is CSRF.
        port = self.server.port
        hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}
        origin = self.headers.get("Origin")
        if self.headers.get("Host") not in hosts or (origin is not None and origin not in {f"http://{h}" for h in hosts}):
            self._send_json(403, {"error": "forbidden: open the review page at " + self.server.url})
            return False
        return True

    def _read_json(self) -> dict:
        if self.headers.get_content_type() != "application/json":
            raise CatalogError("send the decisions as Content-Type: application/json")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise CatalogError("Content-Length is missing") from None
        if not 0 < length <= MAX_BODY_BYTES:
            raise CatalogError(f"request body of {length} bytes; expected 1 to {MAX_BODY_BYTES}")
        try:
            payload = json.loads(self.rfile.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise CatalogError(f"request body is not valid JSON ({error})") from None
        if not isinstance(payload, dict) or "entries" not in payload or set(payload) - {"entries", "reviewer"}:
            raise CatalogError('expected {"entries": [...], "reviewer": "name" (optional)}')
        return payload

    def _state(self) -> dict:
        rows = load_decisions(self.server.run_dir).to_dicts()
        known = read_manifest_keys(self.server.run_dir)
        return {"decisions": rows, "total": sum(len(c) for c in known.values()),
                "reviewed": sum(1 for row in rows if row["candidate"] in known.get(row["sku"], ())),
                "reviewer": self.server.reviewer}

    def _send_json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self._common_headers(len(body))
        self.wfile.write(body)

    def _send_file(self, url_path: str) -> None:
        import mimetypes

        parts = [unquote(part) for part in url_path.split("/") if part]
        root = self.server.run_dir
        file = root.joinpath(*parts) if parts else root
        allowed = bool(parts) and parts[0] in self.STATIC_ROOTS and not any(p in (".", "..") or "/" in p for p in parts)
        if not allowed or not file.is_file() or not is_inside(file, root / parts[0]):
            return self._send_json(404, {"error": "not found"})
        body = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", mimetypes.guess_type(file.name)[0] or "application/octet-stream")
        self.send_header("Cache-Control", "no-cache")
        self._common_headers(len(body))
        self.wfile.write(body)

    def _common_headers(self, length: int) -> None:
        self.send_header("Content-Length", str(length))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()


# ---------------------------------------------------------------- the page's review script

# Runs in the report page. Served by `catalog review` it saves every decision with a POST
# (queued in localStorage until the server has it); opened from disk it keeps decisions in
# localStorage and exports them as JSON for `catalog review RUN_DIR --import FILE`.
REVIEW_SCRIPT = r"""
(function () {
  'use strict';
  const $ = (s, r) => (r || document).querySelector(s);
  const $$ = (s, r) => Array.from((r || document).querySelectorAll(s));
  const DATA = JSON.parse($('#report-data').textContent);
  const report = window.catalogReport;
  const REASONS = new Map(DATA.reasons);
  const STORE = 'catalog-gen:' + DATA.run_key + ':';
  const keyOf = (sku, candidate) => JSON.stringify([sku, candidate]);

  const tiles = new Map();          // key -> candidate element
  const entryOf = new Map();        // element -> {sku, candidate}
  for (const el of $$('.cand')) {
    const tile = DATA.tiles[+el.dataset.index];
    if (!tile) continue;
    const item = {sku: tile[0], candidate: tile[1]};
    tiles.set(keyOf(item.sku, item.candidate), el);
    entryOf.set(el, item);
  }
  let decisions = new Map();        // key -> stored row
  let mode = location.protocol === 'file:' ? 'static' : 'connecting';
  let current = null;
  const history = [];               // [{key, previous row or null}] for undo
  let queue = load('pending', []);  // server mode: entries not yet confirmed by the server
  let sending = false, retryTimer = null, lastError = '';

  // ---- storage and status
  function load(name, fallback) {
    try { const v = localStorage.getItem(STORE + name); return v === null ? fallback : JSON.parse(v); }
    catch (err) { return fallback; }
  }
  function save(name, value) {
    try { localStorage.setItem(STORE + name, JSON.stringify(value)); return true; }
    catch (err) { toast('This browser cannot store decisions: ' + err.message, true); return false; }
  }
  let toastTimer = null;
  function toast(text, bad) {
    const el = $('#toast');
    el.textContent = text;
    el.className = 'show' + (bad ? ' bad' : '');
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { el.className = ''; }, bad ? 6000 : 1600);
  }
  function setMode(text, cls) {
    const el = $('#mode');
    el.textContent = text;
    el.className = 'mode ' + (cls || '');
  }
  function showMode() {
    if (mode === 'static') {
      setMode('Opened from disk: decisions are kept in this browser; use Export decisions to hand them in', '');
    } else if (mode === 'server') {
      setMode(queue.length ? `Saving ${queue.length}\u2026` : 'Saved to the run folder', 'server');
    } else if (mode === 'offline') {
      setMode(`Not saved yet (${queue.length}), retrying: ${lastError || 'server unreachable'}`, 'warn');
    }
  }
  const reviewerInput = $('#reviewer');
  reviewerInput.value = (() => { try { return localStorage.getItem('catalog-gen:reviewer') || ''; } catch (e) { return ''; } })();
  reviewerInput.addEventListener('change', () => {
    try { localStorage.setItem('catalog-gen:reviewer', reviewerInput.value.trim()); } catch (e) { /* private mode */ }
  });
  const reviewer = () => reviewerInput.value.trim();

  // ---- showing decisions
  function render(el) {
    const item = entryOf.get(el);
    const row = decisions.get(keyOf(item.sku, item.candidate));
    const state = $('.state', el);
    el.classList.toggle('approved', !!row && row.decision === 'approve');
    el.classList.toggle('rejected', !!row && row.decision === 'reject');
    el.dataset.review = row ? (row.decision === 'approve' ? 'approved' : 'rejected') : 'undecided';
    if (!state) return;
    if (!row) { state.textContent = ''; el.removeAttribute('title'); return; }
    state.textContent = row.decision === 'approve' ? '\u2713 Approved'
      : '\u2717 Rejected: ' + (REASONS.get(row.reason_code) || row.reason_code) + (row.note ? ' \u2013 ' + row.note : '');
    el.title = `${row.decision} by ${row.reviewer || '?'} at ${row.decided_at || '?'}`;
  }
  function progress() {
    let approved = 0, rejected = 0;
    for (const [key, row] of decisions) {
      if (!tiles.has(key)) continue;
      if (row.decision === 'approve') approved += 1; else rejected += 1;
    }
    const done = approved + rejected, total = tiles.size;
    $('#progress-text').textContent = `${done} / ${total} reviewed \u00b7 ${approved} approved \u00b7 ${rejected} rejected`;
    $('#progress-bar').style.width = (total ? 100 * done / total : 0) + '%';
  }
  function renderAll() { tiles.forEach(render); progress(); report.applyFilters(); }

  function setAll(rows) {
    decisions = new Map();
    for (const row of rows) decisions.set(keyOf(row.sku, row.candidate), row);
    for (const entry of queue) applyLocal(entry);  // not yet confirmed: still shown as made
    renderAll();
  }
  function applyLocal(entry) {
    const key = keyOf(entry.sku, entry.candidate);
    if (entry.decision === 'undo') decisions.delete(key);
    else decisions.set(key, Object.assign({}, entry, {reviewer: entry.reviewer || reviewer() || 'browser',
                                                      decided_at: entry.decided_at || new Date().toISOString()}));
  }

  // ---- the server (catalog review)
  async function api(method, body) {
    const response = await fetch('/api/decisions', {method, cache: 'no-store',
      headers: body ? {'Content-Type': 'application/json'} : {}, body: body ? JSON.stringify(body) : undefined});
    const payload = await response.json();
    if (!response.ok) {  // 400 / 403: refused for good; 5xx: kept and sent again
      const err = new Error(payload.error || response.statusText);
      err.rejected = response.status === 400 || response.status === 403;
      throw err;
    }
    return payload;
  }
  async function flush() {
    if (sending || !queue.length || mode === 'static') return;
    sending = true;
    const batch = queue.slice(0, 500);
    try {
      const state = await api('POST', {entries: batch.map(e => ({sku: e.sku, candidate: e.candidate,
        decision: e.decision, reason_code: e.reason_code, note: e.note})), reviewer: reviewer() || null});
      queue = queue.slice(batch.length);
      save('pending', queue);
      mode = 'server';
      setAll(state.decisions);
    } catch (err) {
      if (err.rejected) {            // the server refused it: drop it, say why, show the server's truth
        queue = queue.slice(batch.length);
        save('pending', queue);
        toast('Not saved: ' + err.message, true);
        refresh();
      } else {
        mode = 'offline';
        lastError = err.message;
        clearTimeout(retryTimer);
        retryTimer = setTimeout(flush, 3000);
      }
    } finally {
      sending = false;
      showMode();
      if (queue.length && mode === 'server') flush();
    }
  }
  async function refresh() {
    if (mode === 'static' || sending || queue.length) return;
    try { const state = await api('GET'); mode = 'server'; setAll(state.decisions); }
    catch (err) { mode = 'offline'; }
    showMode();
  }

  // ---- making decisions
  function record(entry) {
    const key = keyOf(entry.sku, entry.candidate);
    history.push({key, previous: decisions.has(key) ? Object.assign({}, decisions.get(key)) : null});
    commit(entry);
  }
  function commit(entry) {
    applyLocal(entry);
    if (mode === 'static') {
      save('decisions', Array.from(decisions.values()));
    } else {
      queue.push(entry);
      save('pending', queue);
      flush();
    }
    const el = tiles.get(keyOf(entry.sku, entry.candidate));
    if (el) render(el);
    progress();
    showMode();
  }
  function decide(el, decision, reasonCode, note) {
    const item = el && entryOf.get(el);
    if (!item) return;
    setCurrent(el);
    record({sku: item.sku, candidate: item.candidate, decision, reason_code: reasonCode || null, note: note || null});
    move(1);
    report.applyFilters();  // under a "not reviewed" filter the decided one leaves the list
    toast(decision === 'approve' ? 'Approved' : 'Rejected: ' + REASONS.get(reasonCode));
  }
  function undo() {
    const last = history.pop();
    if (!last) { toast('Nothing to undo'); return; }
    const [sku, candidate] = JSON.parse(last.key);
    const p = last.previous;
    commit(p ? {sku, candidate, decision: p.decision, reason_code: p.reason_code, note: p.note}
             : {sku, candidate, decision: 'undo', reason_code: null, note: null});
    report.applyFilters();
    const el = tiles.get(last.key);
    if (el && !el.hidden) setCurrent(el);
    toast('Undone');
  }

  // ---- focus and keys
  function setCurrent(el) {
    if (current) current.classList.remove('current');
    current = el || null;
    if (!current) return;
    current.classList.add('current');
    current.focus({preventScroll: true});
    current.scrollIntoView({block: 'nearest'});
    if (report.imageOpen()) report.openImage($('a.thumb', current));
  }
  function move(delta) {
    const list = report.visibleCandidates();
    if (!list.length) return;
    const at = list.indexOf(current);
    setCurrent(at < 0 ? list[0] : list[Math.max(0, Math.min(list.length - 1, at + delta))]);
  }
  function ensureCurrent() {
    if (!current || current.hidden || current.closest('.card').hidden) move(0);
    return current;
  }

  const picker = $('#picker'), note = $('#picker-note');
  let pickerFor = null;
  function openPicker(el) {
    if (!el || !entryOf.has(el)) return;
    pickerFor = el;
    note.value = '';
    picker.hidden = false;
    $('.dialog', picker).focus();
  }
  function closePicker() { picker.hidden = true; pickerFor = null; }
  function pick(code) {
    const text = note.value.trim();
    if (code === 'other' && !text) { note.focus(); toast('Type what is wrong, then press Enter'); return; }
    const el = pickerFor;
    closePicker();
    decide(el, 'reject', code, text);
  }
  $('.dialog', picker).tabIndex = -1;
  picker.addEventListener('click', (event) => {
    const button = event.target.closest('button[data-reason]');
    if (button) pick(button.dataset.reason);
    else if (event.target === picker) closePicker();
  });
  note.addEventListener('keydown', (event) => {
    if (event.key !== 'Enter') return;
    event.preventDefault();
    event.stopPropagation();
    if (note.value.trim()) pick('other'); else toast('Pick a reason (1-6), or type a note first');
  });

  const help = $('#help');
  $('#help-button').addEventListener('click', () => { help.hidden = !help.hidden; });
  help.addEventListener('click', () => { help.hidden = true; });

  document.addEventListener('keydown', (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const key = event.key;
    if (!picker.hidden) {
      if (key === 'Escape') { event.preventDefault(); closePicker(); return; }
      if (event.target === note) return;
      const n = parseInt(key, 10);
      if (n >= 1 && n <= DATA.reasons.length) {
        event.preventDefault();
        const code = DATA.reasons[n - 1][0];
        if (code === 'other' && !note.value.trim()) note.focus(); else pick(code);
      }
      return;
    }
    if (key === 'Escape') { help.hidden = true; report.closeImage(); if (document.activeElement) document.activeElement.blur(); return; }
    const tag = event.target.tagName;
    if (tag === 'INPUT' || tag === 'SELECT' || tag === 'TEXTAREA') return;
    const actions = {
      j: () => move(1), ArrowDown: () => move(1), ArrowRight: () => move(1),
      k: () => move(-1), ArrowUp: () => move(-1), ArrowLeft: () => move(-1),
      a: () => { if (ensureCurrent()) decide(current, 'approve'); },
      r: () => { if (ensureCurrent()) openPicker(current); },
      u: undo,
      o: () => { if (ensureCurrent()) report.openImage($('a.thumb', current)); },
      Enter: () => { if (ensureCurrent()) report.openImage($('a.thumb', current)); },
      '?': () => { help.hidden = !help.hidden; },
    };
    const action = actions[key];
    if (!action) return;
    event.preventDefault();
    if (['j', 'k', 'ArrowDown', 'ArrowRight', 'ArrowUp', 'ArrowLeft'].includes(key) && !current) { move(0); return; }
    action();
  });

  $('#cards').addEventListener('click', (event) => {
    const el = event.target.closest('.cand');
    if (!el || !entryOf.has(el)) return;
    const button = event.target.closest('button[data-act]');
    if (button && button.dataset.act === 'approve') decide(el, 'approve');
    else if (button && button.dataset.act === 'reject') { setCurrent(el); openPicker(el); }
    else setCurrent(el);
  });

  $('#export').addEventListener('click', () => {
    const rows = Array.from(decisions.entries()).filter(([key]) => tiles.has(key)).map(([, row]) => ({
      sku: row.sku, candidate: row.candidate, decision: row.decision, reason_code: row.reason_code || null,
      note: row.note || null, reviewer: row.reviewer || reviewer() || 'browser', decided_at: row.decided_at}));
    const payload = {format: DATA.export_format, version: 1, run: DATA.run, decisions: rows};
    const url = URL.createObjectURL(new Blob([JSON.stringify(payload, null, 1)], {type: 'application/json'}));
    const link = document.createElement('a');
    link.href = url;
    link.download = `decisions-${DATA.run.replace(/[^A-Za-z0-9._-]+/g, '_')}.json`;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
    toast(`Exported ${rows.length} decision(s); apply them with: catalog review ${DATA.run_dir} --import ${link.download}`);
  });

  // ---- start
  if (mode === 'static') {
    setAll(load('decisions', []));
  } else {
    refresh().then(flush);
    setInterval(() => { if (document.visibilityState === 'visible') { if (queue.length) flush(); else refresh(); } }, 10000);
    document.addEventListener('visibilitychange', () => { if (document.visibilityState === 'visible') refresh(); });
  }
  showMode();
  window.catalogReview = {decisions: () => Array.from(decisions.values()), pending: () => queue.length,
                          mode: () => mode};
})();
"""
