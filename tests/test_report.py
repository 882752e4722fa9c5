"""The review report and the decisions store, on a small synthetic run folder with hostile data.

The run folder is built by hand (manifest, PNGs, run.json, one adapter's reference photos), so
these tests take seconds; tests/test_generation.py covers real runs.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from html import escape
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import polars as pl
import pytest
from PIL import Image
from typer.testing import CliRunner

from catalog_gen.review import decisions as review
from catalog_gen.review import server as review_server
from catalog_gen.cli.main import EXIT_BAD_INPUT, app
from catalog_gen.errors import CatalogError
from catalog_gen.review.report import href, inline_json, summarise, write_report
from catalog_gen.generate.skus import sku_folder_names

XSS = "<script>alert(1)</script>"
QUOTES = "RG-\"quoted\" & 'single' <img src=x onerror=alert(3)>"
UNICODE = "Ünïcødé 指輪 \u2028✓"
FORMULA = '=HYPERLINK("http://evil.example","x")'
ODD = "odd #?%& name"  # its folder is named raw below, as an older run might have done
SKUS = ["RG-1", XSS, QUOTES, UNICODE, FORMULA, ODD]
PROMPT = 'photo of a zwx band ring, "gold" </script><script>alert(2)</script> & more'


def _png(path: Path, seed: int, size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_run(root: Path) -> Path:
    """WORKDIR/runs/nightly with 6 SKUs x 3 candidates, one error SKU, and ring/band reference photos."""
    workdir = root / "work"
    run_dir = workdir / "runs" / "nightly"
    folders = sku_folder_names(SKUS)
    folders[ODD] = ODD
    rows = []
    for line, sku in enumerate(SKUS, 2):
        instance = "band" if line % 2 else "signet"
        for candidate in range(3):
            path = f"images/{folders[sku]}/{candidate}.png"
            _png(run_dir / path, seed=line * 10 + candidate)
            clip_i = 0.80 + 0.05 * candidate
            failed = ["clip_i"] if clip_i < 0.85 else []
            if sku == XSS and candidate == 2:
                failed.append("dino")
            rows.append(dict(
                sku=sku, line=line, **{"class": "ring"}, instance=instance, candidate=candidate, prompt=PROMPT,
                clip_t_prompt=PROMPT, seed=1000 + candidate, clip_i=clip_i, dino=0.9, clip_t=0.25,
                max_train_dino=0.5, pixel_std=40.0, passed=not failed, kept=not failed and candidate == 2,
                failed_gates=",".join(failed), reason="; ".join(f"{g} <too low> & \"bad\"" for g in failed),
                path=path, threshold_clip_i=0.85, threshold_dino=0.5, threshold_clip_t=-1.0, calibrated=False,
                gen_seconds=0.1, score_seconds=0.01))
    rows.append(dict(sku="ERR-<1>", line=99, **{"class": "ring"}, instance="band", candidate=-1, passed=False,
                     kept=False, failed_gates="error", reason="error: adapter ring/band: <boom>", path=""))
    pl.DataFrame(rows, infer_schema_length=None).write_parquet(run_dir / "manifest.parquet")
    (run_dir / "run.json").write_text(json.dumps({"workdir": str(workdir), "created": "2025-06-01T00:00:00Z"}))
    adapter = workdir / "adapters" / "ring" / "band"
    adapter.mkdir(parents=True)
    (adapter / "pytorch_lora_weights.safetensors").write_bytes(b"")
    photos = [f"datasets/ring/band/64px/photo {n}.png" for n in range(2)]
    for n, photo in enumerate(photos):
        _png(workdir / photo, seed=500 + n)
    (adapter / "adapter.json").write_text(json.dumps({"photos": [{"file": p} for p in photos], "token": "zwx"}))
    return run_dir


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run(tmp_path)


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(html: str) -> _Collect:
    parser = _Collect()
    parser.feed(html)
    return parser


# ---------------------------------------------------------------- the report

def test_hostile_text_is_escaped_everywhere(run_dir):
    html = write_report(run_dir).index.read_text()
    assert "<script>alert" not in html and "<img src=x" not in html and "<boom>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # Exactly our three script elements: the JSON data and the two inline scripts.
    parsed = _parse(html)
    scripts = [attrs for tag, attrs in parsed.tags if tag == "script"]
    assert [a.get("type") for a in scripts] == ["application/json", None, None]
    # The inline JSON cannot end its <script> early and reads back to the exact SKUs.
    blob = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S).group(1)
    assert "</" not in blob and "<" not in blob and "\u2028" not in blob
    data = json.loads(blob)
    assert {sku for sku, _ in data["tiles"]} == set(SKUS)
    # Attributes and text round-trip to the raw values (so they were escaped, not mangled).
    texts = "".join(parsed.text)
    for sku in SKUS:
        assert sku in texts
    assert PROMPT in texts and "error: adapter ring/band: <boom>" in texts
    searches = [attrs["data-search"] for tag, attrs in parsed.tags if tag == "article"]
    assert any(XSS.lower() in s for s in searches) and any(PROMPT.lower() in s for s in searches)
    assert inline_json({"a": "</script><!--\u2029&"}) == '{"a": "\\u003c/script\\u003e\\u003c!--\\u2029\\u0026"}'


def test_links_are_relative_quoted_and_resolve(run_dir):
    index = write_report(run_dir).index
    html = index.read_text()
    links = [attrs.get("src") or attrs.get("href") for tag, attrs in _parse(html).tags if tag in ("img", "a")]
    links = [link for link in links if link and not link.startswith("data:")]
    assert len(links) > 2 * 6 * 3
    for link in links:
        parts = urlsplit(link)
        assert not parts.scheme and not parts.netloc and not link.startswith("/"), link
        assert (index.parent / unquote(parts.path)).resolve().is_file(), link
    assert href(f"images/{ODD}/0.png", "../") == "../images/odd%20%23%3F%25%26%20name/0.png"
    assert 'href="../images/odd%20%23%3F%25%26%20name/0.png"' in html
    # Reference photos are copied into the report, which therefore stands alone.
    assert len(list((run_dir / "report" / "references").iterdir())) == 2


def test_thumbnails_are_made_once_and_reused(run_dir):
    first = write_report(run_dir)
    thumbs = sorted((run_dir / "report" / "thumbs").iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in thumbs}
    assert first.thumbs_made == len(thumbs) == 6 * 3 + 2 and first.thumbs_reused == 0
    second = write_report(run_dir)
    assert second.thumbs_made == 0 and second.thumbs_reused == first.thumbs_made
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "report" / "thumbs").iterdir()} == stamps
    with Image.open(thumbs[0]) as image:
        assert image.format == "JPEG" and max(image.size) <= 320


def test_base_model_images_get_their_own_strip(run_dir):
    """base/<folder>/<n>.png (generate's base_images) shows as a labelled strip before the candidates,
    with the same thumbnails, quoting and relative links; SKUs without base images have no strip."""
    folders = {sku: path.split("/")[1] for sku, path in pl.read_parquet(run_dir / "manifest.parquet")
               .filter(pl.col("candidate") == 0).select("sku", "path").iter_rows()}
    for offset, (sku, count) in enumerate(((ODD, 2), (XSS, 1))):
        for n in range(count):
            _png(run_dir / "base" / folders[sku] / f"{n}.png", seed=900 + 10 * offset + n)
    (run_dir / "base" / folders[ODD] / ".2.png.x1y2.png").write_bytes(b"half-written")  # an interrupted write
    first = write_report(run_dir)
    assert first.thumbs_made == 6 * 3 + 2 + 3
    index = first.index
    html = index.read_text()
    blocks = {sku: next(block for block in html.split('<article class="card"')[1:]
                        if f"<h2>{escape(sku, quote=True)}</h2>" in block) for sku in SKUS}
    strips = {sku: re.search(r'<section class="strip base-strip">(.*?)</section>', block, re.S)
              for sku, block in blocks.items()}
    assert {sku for sku, strip in strips.items() if strip} == {ODD, XSS}
    odd = strips[ODD].group(1)
    assert odd.count('class="base-image"') == 2 and strips[XSS].group(1).count('class="base-image"') == 1
    assert "<h3>Base model (same prompt and seed)</h3>" in odd
    assert 'href="../base/odd%20%23%3F%25%26%20name/0.png"' in odd and odd.index("/0.png") < odd.index("/1.png")
    assert "seed 1000" in odd and "seed 1001" in odd  # candidate n's seed beside base image n
    assert "Approve" not in odd  # for comparison only: nothing to decide
    for block in blocks.values():
        assert "<h3>Fine-tuned</h3>" in block
        assert block.index("Reference photos") < block.index("Fine-tuned")
    links = [attrs.get("src") or attrs.get("href") for tag, attrs in _parse(html).tags if tag in ("img", "a")]
    for link in (link for link in links if link and not link.startswith("data:")):
        assert (index.parent / unquote(urlsplit(link).path)).resolve().is_file(), link
    # A second report reuses the base images' thumbnails too (and does not prune them).
    second = write_report(run_dir)
    assert second.thumbs_made == 0 and second.thumbs_reused == first.thumbs_made
    # `catalog review` serves the full-size base images the page links to.
    server = review_server.serve(run_dir, 0, reviewer="ann")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.port}/base/{folders[XSS]}/0.png"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.headers["Content-Type"] == "image/png"
    finally:
        server.shutdown()
        server.server_close()


def test_summary_counts_and_plots(run_dir):
    rows = pl.read_parquet(run_dir / "manifest.parquet").to_dicts()
    summary = summarise(rows)
    assert summary["skus"] == 7 and summary["candidates"] == 18 and summary["error_skus"] == ["ERR-<1>"]
    assert summary["passed"] == 11 and summary["kept"] == 5
    assert summary["by_gate"] == [("clip_i", 6), ("dino", 1)]
    assert [r["group"] for r in summary["by_instance"]] == ["ring/band", "ring/signet"]
    write_report(run_dir)
    for name in ("score-histograms.png", "score-vs-threshold.png"):
        with Image.open(run_dir / "report" / "plots" / name) as image:
            assert image.size[0] > 800


def test_missing_or_bad_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        write_report(tmp_path / "nope")
    with pytest.raises(CatalogError, match="no manifest.parquet"):
        write_report(tmp_path)


# ---------------------------------------------------------------- decisions

def test_record_undo_and_latest_wins(run_dir):
    review.record_decisions(run_dir, [{"sku": XSS, "candidate": 0, "decision": "approve"}], reviewer="ann")
    table = review.record_decisions(run_dir, [
        {"sku": XSS, "candidate": 0, "decision": "reject", "reason_code": "artefact", "note": None},
        {"sku": "RG-1", "candidate": 1, "decision": "approve"}], reviewer="bob")
    assert table.columns == list(review.COLUMNS)
    assert table.schema["candidate"] == pl.Int64
    row = table.filter(pl.col("sku") == XSS).row(0, named=True)
    assert row["decision"] == "reject" and row["reason_code"] == "artefact" and row["reviewer"] == "bob"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", row["decided_at"])
    table = review.record_decisions(run_dir, [{"sku": XSS, "candidate": 0, "decision": "undo"}])
    assert table.height == 1 and review.load_decisions(run_dir).equals(table)
    assert pl.read_csv(run_dir / "decisions.csv").height == 1


def test_two_clients_never_clobber_each_other(run_dir):
    """Two writers at once (threads here; processes and servers take the same lock) keep every row."""
    errors = []

    def client(sku: str, reviewer: str):
        try:
            for candidate in range(3):
                review.record_decisions(run_dir, [{"sku": sku, "candidate": candidate, "decision": "approve"}],
                                        reviewer=reviewer)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    workers = [threading.Thread(target=client, args=(sku, f"r{n}")) for n, sku in enumerate(SKUS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors
    table = review.load_decisions(run_dir)
    assert table.height == len(SKUS) * 3
    assert set(zip(table["sku"], table["reviewer"])) == {(sku, f"r{n}") for n, sku in enumerate(SKUS)}


def test_two_servers_merge_their_decisions(run_dir):
    servers = [review_server.serve(run_dir, 0, reviewer=name) for name in ("ann", "bob")]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        _post(servers[0], {"entries": [{"sku": "RG-1", "candidate": 0, "decision": "approve"}]})
        state = _post(servers[1], {"entries": [{"sku": UNICODE, "candidate": 2, "decision": "reject",
                                                "reason_code": "other", "note": "  scratched band "}]})
        assert state["reviewed"] == 2 and state["total"] == 18
        rows = {(r["sku"], r["candidate"]): r for r in state["decisions"]}
        assert rows[("RG-1", 0)]["reviewer"] == "ann" and rows[(UNICODE, 2)]["reviewer"] == "bob"
        assert rows[(UNICODE, 2)]["note"] == "scratched band"
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def _post(server, payload, headers=None, raw: bytes | None = None):
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/api/decisions", method="POST",
                                     data=raw if raw is not None else json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _status(call) -> tuple[int, str]:
    with pytest.raises(urllib.error.HTTPError) as caught:
        call()
    return caught.value.code, json.loads(caught.value.read()).get("error", "")


def test_server_validates_requests_strictly(run_dir):
    server = review_server.serve(run_dir, 0, reviewer="ann")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        good = {"sku": "RG-1", "candidate": 0, "decision": "approve"}
        cases = [
            ({"entries": [good], "extra": 1}, {}, "expected"),
            ({"entries": [{**good, "candidate": 7}]}, {}, "unknown candidate"),
            ({"entries": [{**good, "candidate": "0"}]}, {}, "whole number"),
            ({"entries": [{**good, "sku": "nope"}]}, {}, "unknown sku"),
            ({"entries": [{**good, "decision": "maybe"}]}, {}, "decision 'maybe'"),
            ({"entries": [{**good, "decision": "reject", "reason_code": "ugly"}]}, {}, "reason_code"),
            ({"entries": [{**good, "decision": "reject", "reason_code": "other"}]}, {}, "needs a note"),
            ({"entries": [{**good, "decided_at": "2020-01-01T00:00:00Z"}]}, {}, "unexpected field"),
            ({"entries": [good]}, {"Content-Type": "text/plain"}, "application/json"),
        ]
        for payload, headers, message in cases:
            code, error = _status(lambda: _post(server, payload, headers))
            assert code == 400 and message in error, (payload, error)
        code, error = _status(lambda: _post(server, None, raw=b"{not json"))
        assert code == 400 and "not valid JSON" in error
        assert _status(lambda: _post(server, {"entries": [good]}, {"Origin": "http://evil.example"}))[0] == 403
        assert _status(lambda: _post(server, {"entries": [good]}, {"Host": "evil.example"}))[0] == 403
        assert not (run_dir / "decisions.parquet").exists()  # nothing bad was stored
        for path in ("/images/../decisions.parquet", "/report/../run.json", "/decisions.csv", "/images/%2e%2e/run.json"):
            assert _status(lambda: urllib.request.urlopen(base + path, timeout=10))[0] == 404, path
        with urllib.request.urlopen(base + "/", timeout=10) as response:  # redirected to the page
            assert response.url.endswith("/report/index.html") and b"report-data" in response.read()
        folder = sku_folder_names(SKUS)[XSS]
        with urllib.request.urlopen(f"{base}/images/{folder}/0.png", timeout=10) as response:
            assert response.headers["Content-Type"] == "image/png"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def live_server(run_dir):
    server = review_server.serve(run_dir, 0, reviewer="ann")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_deeply_nested_json_gets_a_400_not_a_traceback(live_server):
    code, error = _status(lambda: _post(live_server, None, raw=b"[" * 200_000))
    assert code == 400 and "nested too deeply" in error


def test_a_burst_of_connections_queues_while_the_server_is_busy(run_dir):
    """50 clients connect while the server is still busy (here: not yet accepting). With the default
    backlog of 5 only about 6 get through the handshake; the rest are dropped or reset."""
    import socket

    server = review_server.serve(run_dir, 0, reviewer="ann")
    clients = []
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    try:
        for _ in range(50):
            clients.append(socket.create_connection(("127.0.0.1", server.port), timeout=0.5))
        serving.start()
        request = f"GET /api/decisions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nConnection: close\r\n\r\n"
        for client in clients:
            client.settimeout(30)
            client.sendall(request.encode())
        assert all(client.recv(12) == b"HTTP/1.0 200" for client in clients)
    finally:
        for client in clients:
            client.close()
        if serving.is_alive():
            server.shutdown()
        server.server_close()


def test_a_stalled_request_is_answered_and_dropped_after_the_timeout(live_server, monkeypatch):
    import socket
    import time

    monkeypatch.setattr(review_server._Handler, "timeout", 0.5)
    with socket.create_connection(("127.0.0.1", live_server.port), timeout=10) as client:
        client.sendall(f"POST /api/decisions HTTP/1.1\r\nHost: 127.0.0.1:{live_server.port}\r\n"
                       "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"entries\"".encode())
        started = time.monotonic()
        reply = b""
        while chunk := client.recv(4096):  # the server closes the connection after its answer
            reply += chunk
        assert time.monotonic() - started < 5
    assert reply.startswith(b"HTTP/1.0 400") and b"not received within 0.5 s" in reply


def _export_file(tmp_path: Path, decisions) -> Path:
    path = tmp_path / "decisions-export.json"
    path.write_text(json.dumps({"format": review.EXPORT_FORMAT, "version": 1, "run": "nightly",
                                "decisions": decisions}))
    return path


@pytest.mark.parametrize("entry, message", [
    ({"sku": "ghost", "candidate": 0, "decision": "approve"}, "entry 2 (sku 'ghost', candidate 0): unknown sku"),
    ({"sku": "RG-1", "candidate": 9, "decision": "approve"}, "entry 2 (sku 'RG-1', candidate 9): unknown candidate"),
    ({"sku": "RG-1", "candidate": 1, "decision": "undo"}, "decision 'undo' is not one of approve, reject"),
    ({"sku": "RG-1", "candidate": 1, "decision": "reject", "reason_code": "meh"}, "got 'meh'"),
    ({"sku": "RG-1", "candidate": 1, "decision": "approve", "decided_at": "yesterday"}, "ISO 8601"),
    ({"sku": "RG-1", "candidate": True, "decision": "approve"}, "whole number"),
    ("approve RG-1", "entry 2: expected an object"),
])
def test_import_names_the_bad_entry(run_dir, tmp_path, entry, message):
    first = {"sku": "RG-1", "candidate": 0, "decision": "approve", "reviewer": "ann",
             "decided_at": "2025-06-01T10:00:00.000Z"}
    with pytest.raises(CatalogError) as caught:
        review.import_decisions(run_dir, _export_file(tmp_path, [first, entry]))
    assert message in str(caught.value) and "decisions-export.json" in str(caught.value)
    assert not (run_dir / "decisions.parquet").exists()  # all or nothing


def test_import_applies_and_keeps_newer_decisions(run_dir, tmp_path):
    review.record_decisions(run_dir, [{"sku": "RG-1", "candidate": 0, "decision": "approve"}], reviewer="live")
    exported = [
        {"sku": "RG-1", "candidate": 0, "decision": "reject", "reason_code": "cropped", "note": None,
         "reviewer": "offline", "decided_at": "2020-01-01T00:00:00.000Z"},  # older than the live one: skipped
        {"sku": XSS, "candidate": 1, "decision": "reject", "reason_code": "background", "note": "grey",
         "reviewer": "offline", "decided_at": "2025-06-01T12:00:00+02:00"},
    ]
    result = review.import_decisions(run_dir, _export_file(tmp_path, exported))
    assert (result.applied, result.skipped_older) == (1, 1)
    rows = {(r["sku"], r["candidate"]): r for r in review.load_decisions(run_dir).to_dicts()}
    assert rows[("RG-1", 0)]["reviewer"] == "live"
    assert rows[(XSS, 1)]["decided_at"] == "2025-06-01T10:00:00.000Z" and rows[(XSS, 1)]["note"] == "grey"
    with pytest.raises(CatalogError, match="not an exported decisions file"):
        review.import_decisions(run_dir, _write(tmp_path / "x.json", {"decisions": []}))
    with pytest.raises(CatalogError, match="not a JSON file"):
        review.import_decisions(run_dir, _write(tmp_path / "y.json", None, raw="{oops"))


def _write(path: Path, payload, raw: str | None = None) -> Path:
    path.write_text(raw if raw is not None else json.dumps(payload))
    return path


def test_decisions_csv_is_formula_escaped(run_dir):
    review.record_decisions(run_dir, [{"sku": FORMULA, "candidate": 0, "decision": "reject",
                                       "reason_code": "other", "note": "+SUM(A1:A9)"}], reviewer="@admin")
    text = (run_dir / "decisions.csv").read_text()
    assert text.splitlines()[0] == ",".join(review.COLUMNS)
    row = pl.read_csv(run_dir / "decisions.csv").row(0, named=True)
    assert row["sku"] == "'" + FORMULA and row["note"] == "'+SUM(A1:A9)" and row["reviewer"] == "'@admin"
    assert review.load_decisions(run_dir)["sku"][0] == FORMULA  # parquet keeps the raw value


# ---------------------------------------------------------------- the command line

runner = CliRunner()


def test_cli_report_and_import(run_dir, tmp_path):
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "report/index.html" in result.output and "7 SKUs, 18 candidates" in result.output
    good = _export_file(tmp_path, [{"sku": "RG-1", "candidate": 2, "decision": "approve", "reviewer": "ann",
                                    "decided_at": "2025-06-01T10:00:00Z"}])
    result = runner.invoke(app, ["review", str(run_dir), "--import", str(good)])
    assert result.exit_code == 0 and "imported 1 decision(s)" in result.output
    bad = _export_file(tmp_path, [{"sku": "RG-1", "candidate": 2, "decision": "nope"}])
    result = runner.invoke(app, ["review", str(run_dir), "--import", str(bad)])
    assert result.exit_code == EXIT_BAD_INPUT and "entry 1 (sku 'RG-1', candidate 2)" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == EXIT_BAD_INPUT and "does not exist" in result.output


def test_cli_review_serves_until_ctrl_c(monkeypatch, run_dir):
    calls = []

    class FakeServer:
        url = "http://127.0.0.1:9999/report/index.html"

        def serve_forever(self):
            raise KeyboardInterrupt

        def server_close(self):
            calls.append("closed")

    def fake_serve(folder, port, reviewer, progress=None):
        calls.append((folder, port, reviewer))
        progress(1, 1)
        return FakeServer()

    monkeypatch.setattr("catalog_gen.review.server.serve", fake_serve)
    result = runner.invoke(app, ["review", str(run_dir), "--port", "0", "--reviewer", "ann"])
    assert result.exit_code == 0 and FakeServer.url in result.output
    assert calls == [(run_dir, 0, "ann"), "closed"]
