"""`catalog review`: the local review server. It serves the run's report page and images and takes
the page's decisions (decisions.py stores them), on 127.0.0.1 only.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from catalog_gen import layout
from catalog_gen.errors import CatalogError
from catalog_gen.review.decisions import (MAX_BODY_BYTES, apply_entries, check_reviewer, default_reviewer,
                                          load_decisions, parse_entries, read_manifest_keys, utc_now)
from catalog_gen.storage import is_inside


# ---------------------------------------------------------------- the local review server

REQUEST_TIMEOUT_S = 30

class ReviewServer(ThreadingHTTPServer):
    """Serves the run folder's layout.SERVED_ROOTS and takes decisions on /api/decisions (127.0.0.1 only)."""

    daemon_threads = True
    # A reviewing team's page loads fire dozens of thumbnail requests at once; the default backlog (5)
    # reset most of a 50-request burst.
    request_queue_size = 128

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
    from catalog_gen.review.report import write_report

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
    # Seconds a connection may sit idle or stall mid-request before it is dropped: without it every stalled
    # client (a half-sent body) keeps a thread forever.
    timeout = REQUEST_TIMEOUT_S

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
            apply_entries(self.server.run_dir, parsed)
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
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise CatalogError(f"request body not received within {self.timeout} s") from None
        try:
            payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise CatalogError(f"request body is not valid JSON ({error})") from None
        except RecursionError:
            raise CatalogError("request body is nested too deeply") from None
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
