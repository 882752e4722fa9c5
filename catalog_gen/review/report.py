"""`catalog report RUN_DIR`: a self-contained HTML review page for a generation run.

The report folder (layout.report_folder) holds:
    the page            summary, plots and one card per SKU (reference photos, the base model's
                        images when the run drew them, the fine-tuned candidates); inline CSS and
                        JS, no network
    thumbs/<hash>-<px>.jpg   thumbnails keyed by the source file's content hash (made once)
    references/<hash>.<ext>  the instance's reference photos, copied so the report stands alone
    plots/*.png         score histograms and score-against-threshold plots (matplotlib)

Every string from the data is HTML-escaped (attributes included); the inline JSON escapes
"<", ">" and "&"; image links are relative and URL-quoted, so the page works from file://
and from `catalog review`, which serves the same page and stores decisions.
The summary and the cards are pure functions of the manifest rows; reading the run,
thumbnails, plots and the atomic write of the page are the edges.

Over 500 lines on purpose: the page's HTML and the data it shows are built side by side here, so that
every escaped value can be checked in one place; the CSS and JavaScript are files in page/.
"""

from __future__ import annotations

import json
import math
import secrets
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from html import escape
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import quote

from catalog_gen import layout
from catalog_gen.errors import CatalogError
from catalog_gen.quality.gates import score_and_threshold_text
from catalog_gen.storage import atomic_path, atomic_write_bytes, atomic_write_text, sha256_file

THUMB_PX = 320
METRICS = (("clip_i", "CLIP-I"), ("dino", "DINO"), ("clip_t", "CLIP-T"))
METRIC_HELP = {
    "clip_i": "CLIP-I: how much the image looks like the product's reference photos (CLIP image embeddings, "
              "mean cosine similarity)",
    "dino": "DINO: likeness to the reference photos in shape and detail (DINO image embeddings, mean cosine "
            "similarity; tells two products of one kind apart better than CLIP-I)",
    "clip_t": "CLIP-T: how well the image matches its prompt (CLIP text-image cosine similarity)",
}
"""What each score means, shown on the page (tooltips and the summary's legend)."""
SORTS = (("sheet", "Sheet order"), ("sku", "SKU (A-Z)"), ("margin:asc", "Margin to threshold, low to high"),
         *((f"{key.replace('_', '')}:{way}", f"{label} {'low to high' if way == 'asc' else 'high to low'}")
           for key, label in METRICS for way in ("asc", "desc")))


def e(value: Any) -> str:
    """HTML-escape for text and attribute values alike."""
    return escape("" if value is None else str(value), quote=True)


def inline_json(payload: Any) -> str:
    """JSON that is safe inside <script>: no "</script>", "<!--" or line separators can appear."""
    text = json.dumps(payload, ensure_ascii=False, allow_nan=False)
    for raw, safe in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                      ("\u2029", "\\u2029")):
        text = text.replace(raw, safe)
    return text


def href(relative: str, prefix: str = "") -> str:
    """A relative URL with every path segment percent-quoted (SKU folders may hold odd characters)."""
    return prefix + "/".join(quote(part, safe="") for part in PurePosixPath(relative).parts)


def number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class ReportResult:
    index: Path
    skus: int
    candidates: int
    thumbs_made: int
    thumbs_reused: int


@dataclass
class _Assets:
    """What the edges produced for the page: thumbnail / full image links, reference photos, plots."""

    thumbs: dict[str, str | None] = field(default_factory=dict)  # image path -> thumb href (None: unreadable)
    base: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # sku -> (candidate, base/ image path)
    references: dict[tuple[str, str], list[tuple[str, str, str]] | str] = field(default_factory=dict)
    plots: list[tuple[str, str]] = field(default_factory=list)  # (href, alt text)
    made: int = 0
    reused: int = 0


# ---------------------------------------------------------------- pure: the data of the report

def summarise(rows: Sequence[Mapping[str, Any]]) -> dict:
    """Counts, pass rates by class and instance, failures by gate (error rows counted apart)."""
    candidates = [row for row in rows if row["candidate"] >= 0]
    errors = sorted({row["sku"] for row in rows if row["candidate"] < 0})

    def rates(key) -> list[dict]:
        groups: dict[Any, list] = defaultdict(list)
        for row in candidates:
            groups[key(row)].append(row)
        return [{"group": group, "candidates": len(items), "passed": sum(bool(r["passed"]) for r in items),
                 "kept": sum(bool(r["kept"]) for r in items),
                 "rate": sum(bool(r["passed"]) for r in items) / len(items)} for group, items in sorted(groups.items())]

    gates = Counter(gate for row in candidates for gate in (row.get("failed_gates") or "").split(",") if gate)
    passed = sum(bool(row["passed"]) for row in candidates)
    return {
        "skus": len({row["sku"] for row in rows}), "candidates": len(candidates), "passed": passed,
        "kept": sum(bool(row["kept"]) for row in candidates), "failed": len(candidates) - passed,
        "rate": passed / len(candidates) if candidates else None, "error_skus": errors,
        "by_class": rates(lambda r: r["class"]), "by_instance": rates(lambda r: f"{r['class']}/{r['instance']}"),
        "by_gate": sorted(gates.items(), key=lambda item: (-item[1], item[0])),
    }


def sku_cards(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """One card per SKU (sheet order): its instance, prompt, candidates by number, errors."""
    by_sku: dict[str, list] = defaultdict(list)
    for row in rows:
        by_sku[row["sku"]].append(row)
    cards = []
    for sku, items in sorted(by_sku.items(), key=lambda item: (min(_line(r) for r in item[1]), item[0])):
        candidates = sorted((r for r in items if r["candidate"] >= 0), key=lambda r: r["candidate"])
        first = candidates[0] if candidates else items[0]
        cards.append({"sku": sku, "class": first["class"], "instance": first["instance"],
                      "prompt": first.get("prompt"), "candidates": candidates,
                      "errors": [r["reason"] for r in items if r["candidate"] < 0],
                      "kept": sum(bool(r["kept"]) for r in candidates)})
    return cards


def _line(row: Mapping[str, Any]) -> int:
    return row.get("line") if isinstance(row.get("line"), int) else 1 << 62


def margin(row: Mapping[str, Any]) -> float | None:
    """The smallest score-minus-threshold over the three gates (negative: failed by that much)."""
    gaps = [number(row.get(key)) - number(row.get(f"threshold_{key}")) for key, _ in METRICS
            if number(row.get(key)) is not None and number(row.get(f"threshold_{key}")) is not None]
    return min(gaps) if gaps else None


def base_folder(card: Mapping[str, Any], folder_of: Mapping[str, str]) -> str:
    """The SKU's folder under base/: the one its candidates' images are in (older runs may have named it
    otherwise), else the name generate gives it (a SKU that ended in an error has no candidates)."""
    paths = [row["path"] for row in card["candidates"] if image_path_ok(row.get("path"))]
    return PurePosixPath(paths[0]).parts[1] if paths else folder_of[card["sku"]]


def image_path_ok(path: Any) -> bool:
    """A manifest image path we are willing to link: relative, inside images/, no '..'."""
    if not isinstance(path, str) or not path:
        return False
    parts = PurePosixPath(path).parts
    return len(parts) >= 2 and parts[0] == layout.IMAGES_DIR and ".." not in parts and "\\" not in path


# ---------------------------------------------------------------- pure: HTML

def render_html(run: Mapping[str, Any], summary: Mapping[str, Any], cards: Sequence[Mapping[str, Any]],
                assets: _Assets, nonce: str) -> str:
    from catalog_gen.review.decisions import EXPORT_FORMAT, REASON_CODES
    from catalog_gen.review.page import asset

    tiles = [[card["sku"], row["candidate"]] for card in cards for row in card["candidates"]
             if image_path_ok(row.get("path"))]
    data = {"run": run["name"], "run_key": run["key"], "export_format": EXPORT_FORMAT, "tiles": tiles,
            "reasons": [[code, label] for code, label in REASON_CODES.items()], "run_dir": run["dir"]}
    counter = iter(range(len(tiles)))
    body = "\n".join(_card_html(n, card, assets, counter) for n, card in enumerate(cards))
    csp = (f"default-src 'none'; img-src 'self' file: data:; style-src 'nonce-{nonce}'; "
           f"script-src 'nonce-{nonce}'; connect-src 'self'; base-uri 'none'; form-action 'none'")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{e(csp)}">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>Review: {e(run['name'])}</title>
<style nonce="{nonce}">{asset("report.css")}</style>
</head>
<body>
<header class="top">
 <div class="bar-row">
  <div class="title"><h1>{e(run['name'])}</h1>
    <span class="sub">{summary['skus']} SKUs &middot; {summary['candidates']} candidates{e(run['created_text'])}</span></div>
  <div class="progress" title="Reviewed candidates"><div class="bar"><span id="progress-bar"></span></div>
    <span id="progress-text">0 / {len(tiles)} reviewed</span></div>
  <div class="actions">
    <label class="reviewer">Reviewer <input id="reviewer" type="text" maxlength="100" placeholder="your name" autocomplete="off"></label>
    <button type="button" id="export" title="Download the decisions made in this page as JSON">Export decisions</button>
    <button type="button" id="help-button" title="Keyboard shortcuts">Keys ?</button>
  </div>
 </div>
 <nav class="toolbar" aria-label="Filters">
{_filters_html(summary, cards)}
  <span class="toolbar-end"><span id="shown" class="shown"></span><span id="mode" class="mode">Opened from disk</span></span>
 </nav>
</header>
<main>
{_summary_html(summary, assets.plots)}
<section id="cards">
{body}
</section>
</main>
{_overlays_html()}
<script type="application/json" id="report-data">{inline_json(data)}</script>
<script nonce="{nonce}">{asset("report.js")}</script>
<script nonce="{nonce}">{asset("review.js")}</script>
</body>
</html>
"""


def _pct(value: float | None) -> str:
    return "&ndash;" if value is None else f"{100 * value:.0f}%"


def _summary_html(summary: Mapping[str, Any], plots: Sequence[tuple[str, str]]) -> str:
    tiles = [("SKUs", summary["skus"]), ("candidates", summary["candidates"]), ("passed the gates", summary["passed"]),
             ("kept", summary["kept"]), ("pass rate", _pct(summary["rate"])),
             ("SKUs with errors", len(summary["error_skus"]))]
    stat = "".join(f'<div class="stat{" bad" if label == "SKUs with errors" and value else ""}">'
                   f'<b>{value}</b><span>{label}</span></div>' for label, value in tiles)

    def rate_table(title: str, rows: Sequence[Mapping[str, Any]]) -> str:
        lines = "".join(f'<tr><td>{e(r["group"])}</td><td class="n">{r["candidates"]}</td><td class="n">{r["passed"]}</td>'
                        f'<td class="n">{r["kept"]}</td><td class="rate"><progress class="meter" max="100" value="{100 * r["rate"]:.0f}"></progress>'
                        f'{_pct(r["rate"])}</td></tr>' for r in rows)
        return (f'<table class="rates"><caption>{title}</caption><thead><tr><th></th><th>cand.</th><th>passed</th>'
                f'<th>kept</th><th>pass rate</th></tr></thead><tbody>{lines}</tbody></table>')

    gates = "".join(f'<tr><td>{e(gate)}</td><td class="n">{count}</td></tr>' for gate, count in summary["by_gate"])
    gate_table = (f'<table class="rates"><caption>Failures by gate</caption><thead><tr><th>gate</th><th>candidates</th>'
                  f'</tr></thead><tbody>{gates or "<tr><td colspan=2>no failures</td></tr>"}</tbody></table>')
    errors = ""
    if summary["error_skus"]:
        errors = ('<p class="errors">Errors (no images): '
                  + ", ".join(f"<code>{e(sku)}</code>" for sku in summary["error_skus"]) + "</p>")
    images = "".join(f'<figure><img src="{e(src)}" alt="{e(alt)}"><figcaption>{e(alt)}</figcaption></figure>'
                     for src, alt in plots)
    legend = "".join(f"<dt>{label}</dt><dd>{e(METRIC_HELP[key].split(': ', 1)[1])}</dd>" for key, label in METRICS)
    legend += ("<dt>&ge; value</dt><dd>the gate's threshold for that score; a candidate passes when it clears "
               "every one (CLIP-I and DINO are calibrated per product from its own photos)</dd>")
    return f"""<section class="summary"><details open><summary>Summary</summary>
<div class="stats">{stat}</div>{errors}
<dl class="legend">{legend}</dl>
<div class="tables">{rate_table("Pass rate by class", summary["by_class"])}
{rate_table("Pass rate by instance", summary["by_instance"])}{gate_table}</div>
<div class="plots">{images}</div>
</details></section>"""


def _filters_html(summary: Mapping[str, Any], cards: Sequence[Mapping[str, Any]]) -> str:
    def select(name: str, label: str, options: Iterable[tuple[str, str]]) -> str:
        items = "".join(f'<option value="{e(v)}">{e(t)}</option>' for v, t in options)
        return f'  <label>{label} <select id="f-{name}">{items}</select></label>\n'

    classes = sorted({card["class"] for card in cards})
    instances = sorted({(card["class"], card["instance"]) for card in cards})
    gates = [("", "any"), ("none", "none (passed)")] + [(g, f"{g} ({n})") for g, n in summary["by_gate"]]
    if summary["error_skus"]:
        gates.append(("error", f"error ({len(summary['error_skus'])} SKUs)"))
    return (select("class", "Class", [("", "all")] + [(c, c) for c in classes])
            + select("instance", "Instance", [("", "all")] + [(f"{c}/{i}", f"{c}/{i}") for c, i in instances])
            + select("gate", "Failed gate", gates)
            + select("status", "Gates", [("", "all"), ("passed", "passed"), ("kept", "kept"), ("failed", "failed")])
            + select("review", "Review", [("", "all"), ("undecided", "not reviewed"), ("approved", "approved"),
                                          ("rejected", "rejected")])
            + select("sort", "Sort", SORTS)
            + '  <label>Find <input id="f-search" type="search" placeholder="SKU or prompt" autocomplete="off"></label>\n')


def _card_html(n: int, card: Mapping[str, Any], assets: _Assets, counter) -> str:
    refs = assets.references.get((card["class"], card["instance"]), [])
    if isinstance(refs, str):
        ref_html = f'<p class="muted">{e(refs)}</p>'
    else:
        ref_html = "".join(f'<a class="ref" href="{e(full)}" data-caption="{e("reference photo " + name)}">'
                           f'<img src="{e(thumb)}" alt="{e("reference photo " + name)}" loading="lazy"></a>'
                           for thumb, full, name in refs) or '<p class="muted">no reference photos</p>'
    tiles = "".join(_candidate_html(card, row, assets, counter) for row in card["candidates"])
    bases = assets.base.get(card["sku"], [])
    seeds = {row["candidate"]: row.get("seed") for row in card["candidates"]}
    base_html = ('<section class="strip base-strip"><h3>Base model (same prompt and seed)</h3><div class="bases">'
                 + "".join(_base_html(card, n, path, seeds.get(n), assets) for n, path in bases)
                 + "</div></section>") if bases else ""
    errors = "".join(f'<p class="error">{e(reason)}</p>' for reason in card["errors"])
    search = f'{card["sku"]} {card.get("prompt") or ""}'.lower()
    n_cand = len(card["candidates"])
    return f"""<article class="card" id="sku-{n}" data-order="{n}" data-sku="{e(card['sku'])}" data-class="{e(card['class'])}" data-instance="{e(card['class'] + '/' + card['instance'])}" data-search="{e(search)}" data-error="{1 if card['errors'] else 0}">
<header class="card-head"><h2>{e(card['sku'])}</h2><span class="tag">{e(card['class'])} / {e(card['instance'])}</span>
<span class="kept-count">kept {card['kept']} of {n_cand} candidate{'' if n_cand == 1 else 's'}</span></header>
{f'<p class="prompt"><span class="label">Prompt</span> {e(card["prompt"])}</p>' if card.get("prompt") else ""}{errors}
<div class="card-body"><aside class="refs"><h3>Reference photos</h3><div class="ref-strip">{ref_html}</div></aside>
<div class="gens">{base_html}<section class="strip"><h3>Fine-tuned</h3><div class="cands">{tiles}</div></section></div></div>
</article>"""


def _base_html(card: Mapping[str, Any], n: int, path: str, seed: Any, assets: _Assets) -> str:
    """The base model's image for candidate n's prompt and seed: for comparison only, so no scores or decision."""
    thumb = assets.thumbs.get(path)
    label = f"{card['sku']} base model, prompt and seed of candidate {n}"
    if thumb:
        image = (f'<a class="thumb" href="{e(href(path, "../"))}" data-caption="{e(label)}">'
                 f'<img src="{e(thumb)}" alt="{e(label)}" loading="lazy"></a>')
    else:
        image = '<div class="thumb missing">image unreadable</div>'
    seed_html = f'<div class="seed">seed {e(seed)}</div>' if seed is not None else ""
    return (f'<figure class="base-image" data-candidate="{n}">{image}<figcaption><div class="line1">'
            f'<span class="num">#{n}</span><span class="badge base">base model</span></div>{seed_html}'
            f'</figcaption></figure>')


def _candidate_html(card: Mapping[str, Any], row: Mapping[str, Any], assets: _Assets, counter) -> str:
    path = row.get("path")
    linkable = image_path_ok(path)
    index = next(counter) if linkable else -1
    thumb = assets.thumbs.get(path) if linkable else None
    label = f"{card['sku']} candidate {row['candidate']}"
    if thumb:
        image = (f'<a class="thumb" href="{e(href(path, "../"))}" data-caption="{e(label)}">'
                 f'<img src="{e(thumb)}" alt="{e(label)}" loading="lazy"></a>')
    else:
        image = f'<div class="thumb missing">{"image unreadable" if linkable else "no image"}</div>'
    passed, kept = bool(row.get("passed")), bool(row.get("kept"))
    badges = (f'<span class="badge {"pass" if passed else "fail"}">{"passed" if passed else "failed"}</span>'
              + ('<span class="badge kept">kept</span>' if kept else ""))
    scores = ""
    data = ""
    for key, title in METRICS:
        value, minimum = number(row.get(key)), number(row.get(f"threshold_{key}"))
        low = value is None or (minimum is not None and value < minimum)
        shown, limit = (score_and_threshold_text(value, minimum) if value is not None and minimum is not None
                        else ("" if value is None else f"{value:.3f}", "" if minimum is None else f"{minimum:.3f}"))
        shown = shown or "&ndash;"
        limit = f"&ge; {limit}" if limit else ""
        scores += (f'<tr class="{"low" if low else "ok"}"><th title="{e(METRIC_HELP[key])}">{title}</th>'
                   f'<td>{shown}</td><td class="thr">{limit}</td></tr>')
        data += f' data-{key.replace("_", "")}="{"" if value is None else f"{value:.6g}"}"'
    gap = margin(row)
    reason = f'<p class="reason">{e(row.get("reason"))}</p>' if row.get("reason") else ""
    actions = ('<div class="decision"><span class="state"></span>'
               '<button type="button" class="approve" data-act="approve" title="Approve (a)">Approve</button>'
               '<button type="button" class="reject" data-act="reject" title="Reject (r)">Reject</button></div>'
               if linkable else "")
    return (f'<figure class="cand{" is-kept" if kept else ""}" tabindex="-1" data-index="{index}" '
            f'data-candidate="{row["candidate"]}" data-gates="{e(row.get("failed_gates") or "")}" '
            f'data-passed="{int(passed)}" data-kept="{int(kept)}"{data} data-margin="{"" if gap is None else f"{gap:.6g}"}">'
            f'{image}<figcaption><div class="line1"><span class="num">#{row["candidate"]}</span>{badges}</div>'
            f'<table class="scores">{scores}</table><div class="seed">seed {e(row.get("seed"))}</div>'
            f'{reason}{actions}</figcaption></figure>')


def _overlays_html() -> str:
    from catalog_gen.review.decisions import REASON_CODES

    reasons = "".join(f'<button type="button" data-reason="{e(code)}"><kbd>{n}</kbd> {e(label)}</button>'
                      for n, (code, label) in enumerate(REASON_CODES.items(), 1))
    keys = [("j / &darr; / &rarr;", "next candidate"), ("k / &uarr; / &larr;", "previous candidate"),
            ("a", "approve (stays on the candidate; j moves on)"),
            ("r, then 1-6", "reject with a reason (6: other, type a note, Enter; stays on it too)"),
            ("u", "undo the last decision"), ("Enter / o", "full image"), ("Esc", "close"), ("?", "this help")]
    rows = "".join(f"<tr><td><kbd>{k}</kbd></td><td>{what}</td></tr>" for k, what in keys)
    return f"""<div id="lightbox" class="overlay" hidden><figure><img id="lightbox-img" alt=""><figcaption id="lightbox-caption"></figcaption></figure></div>
<div id="picker" class="overlay" hidden><div class="dialog" role="dialog" aria-label="Reject reason">
<h3>Reject: why?</h3><div class="reasons">{reasons}</div>
<label class="note">Note <input id="picker-note" type="text" maxlength="2000" placeholder="what is wrong (needed for other)"></label>
<p class="muted">Press 1-6, or type a note and press Enter. Esc cancels.</p></div></div>
<div id="help" class="overlay" hidden><div class="dialog"><h3>Keyboard shortcuts</h3><table>{rows}</table>
<p class="muted">Decisions are saved as you make them: to the run folder under <code>catalog review</code>,
or in this browser when the page is opened from disk (use Export decisions, then
<code>catalog review RUN_DIR --import FILE</code>).</p></div></div>
<div id="toast" role="status" aria-live="polite"></div>"""


# ---------------------------------------------------------------- edges: read the run, images, plots, write

def write_report(run_dir: Path, progress: Callable[[int, int], None] | None = None) -> ReportResult:
    """Render the run's report page (thumbnails made once and reused); returns what was written.

    `progress(done, total)` is called as each image's thumbnail (candidates, then base model images) is
    made or found.
    """
    # 1. Check inputs and read the run.
    run_dir = Path(run_dir)
    rows, run = _read_run(run_dir)
    out = layout.report_folder(run_dir)
    # 2. The report's data (pure).
    summary, cards = summarise(rows), sku_cards(rows)
    # 3. Thumbnails, reference photos and plots (files in the report folder).
    assets = _Assets()
    assets.base = _find_base_images(run_dir, cards)
    candidates = sorted({row["path"] for row in rows if row["candidate"] >= 0 and image_path_ok(row.get("path"))})
    _make_thumbnails(run_dir, candidates + [path for found in assets.base.values() for _, path in found], out,
                     assets, progress)
    _collect_references(run_dir, run["workdir"], cards, out, assets)
    _prune_thumbnails(out / "thumbs", assets)
    assets.plots = plot_scores(rows, out / "plots")
    # 4. The page, written atomically.
    index = atomic_write_text(layout.report_index(run_dir), render_html(run, summary, cards, assets, secrets.token_hex(16)))
    return ReportResult(index, summary["skus"], summary["candidates"], assets.made, assets.reused)


def _read_run(run_dir: Path) -> tuple[list[dict], dict]:
    from catalog_gen.generate.manifest import read_manifest

    manifest = run_dir / layout.MANIFEST_PARQUET
    frame = read_manifest(run_dir)
    missing = {"sku", "class", "instance", "candidate", "passed", "kept", "path"} - set(frame.columns)
    if missing:
        raise CatalogError(f"{manifest}: missing column(s) {', '.join(sorted(missing))}")
    info: dict = {}
    settings_file = run_dir / layout.RUN_JSON
    if settings_file.is_file():
        try:
            info = json.loads(settings_file.read_text())
        except ValueError as error:
            raise CatalogError(f"{settings_file}: not valid JSON ({error})") from error
    resolved = run_dir.resolve()
    created = info.get("created")
    run = {"name": resolved.name, "dir": str(resolved), "workdir": info.get("workdir"),
           "key": sha256_text(f"{resolved}|{created}")[:16],
           "created_text": f" \u00b7 generated {created}" if created else ""}
    return frame.to_dicts(), run


def sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def thumbnail(source: Path, thumbs_dir: Path) -> tuple[str, bool]:
    """(file name under thumbs_dir, made now?): keyed by content hash, so a rerun reuses it."""
    name = f"{sha256_file(source)[:24]}-{THUMB_PX}.jpg"
    target = thumbs_dir / name
    if target.is_file():
        return name, False
    from PIL import Image, ImageOps

    with Image.open(source) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            flat = Image.new("RGBA", image.size, "white")
            flat.alpha_composite(image)
            image = flat
        image = image.convert("RGB")
        image.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
        with atomic_path(target) as tmp:
            image.save(tmp, format="JPEG", quality=85, optimize=True)
    return name, True


def _thumb_or_none(source: Path, thumbs_dir: Path, assets: _Assets) -> str | None:
    try:
        name, made = thumbnail(source, thumbs_dir)
    except (OSError, ValueError):  # unreadable or truncated image: the card says so
        return None
    assets.made += made
    assets.reused += not made
    return name


def _make_thumbnails(run_dir: Path, paths: Sequence[str], out: Path, assets: _Assets,
                     progress: Callable[[int, int], None] | None) -> None:
    for done, path in enumerate(paths, 1):
        source = run_dir / path
        name = _thumb_or_none(source, out / "thumbs", assets) if source.is_file() else None
        assets.thumbs[path] = href(f"thumbs/{name}") if name else None
        if progress is not None:
            progress(done, len(paths))


def _find_base_images(run_dir: Path, cards: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, str]]]:
    """Per SKU, the base model's images generate drew (layout.base_image), in candidate order; none for
    runs made without base_images."""
    from catalog_gen.generate.skus import sku_folder_names

    if not (run_dir / layout.BASE_DIR).is_dir():
        return {}
    folder_of = sku_folder_names([card["sku"] for card in cards])
    found = {}
    for card in cards:
        folder = layout.base_images_folder(run_dir, base_folder(card, folder_of))
        # Only <n>.png: an interrupted atomic write leaves a hidden temporary file beside them.
        images = sorted((int(file.stem), file.name) for file in folder.glob("*.png")
                        if file.stem.isdigit() and file.stem.isascii() and file.is_file()) if folder.is_dir() else []
        if images:
            found[card["sku"]] = [(n, f"{layout.BASE_DIR}/{folder.name}/{name}") for n, name in images]
    return found


def _collect_references(run_dir: Path, workdir: str | None, cards, out: Path, assets: _Assets) -> None:
    from catalog_gen.train.adapters import read_adapter
    from catalog_gen.layout import adapter_folder

    for key in sorted({(card["class"], card["instance"]) for card in cards}):
        folder = _find_workdir(run_dir, workdir)
        if folder is None:
            assets.references[key] = "reference photos unavailable: the run's workdir was not found"
            continue
        try:
            photos = read_adapter(adapter_folder(folder, *key)).photo_paths
        except (CatalogError, KeyError, TypeError) as error:
            assets.references[key] = f"reference photos unavailable: {error}"
            continue
        found = []
        for photo in photos:
            if not photo.is_file():
                continue
            digest = sha256_file(photo)[:24]
            copy = out / "references" / f"{digest}{photo.suffix.lower()}"
            if not copy.is_file():
                atomic_write_bytes(copy, photo.read_bytes())
            name = _thumb_or_none(copy, out / "thumbs", assets)
            if name:
                found.append((href(f"thumbs/{name}"), href(f"references/{copy.name}"), photo.name))
        assets.references[key] = found


def _find_workdir(run_dir: Path, workdir: str | None) -> Path | None:
    """The run's recorded workdir (relative to where generate ran), else the workdir of a run folder in
    its default place."""
    choices = [Path(workdir)] if workdir else []
    if (default := layout.workdir_of_run(run_dir)) is not None:
        choices.append(default)
    return next((c for c in choices if layout.is_workdir(c)), None)


def _prune_thumbnails(thumbs_dir: Path, assets: _Assets) -> None:
    """Drop thumbnails no image of the run uses any more (a --force rerun drew new images)."""
    used = {link.split("/")[-1] for link in assets.thumbs.values() if link}
    used |= {thumb.split("/")[-1] for refs in assets.references.values() if not isinstance(refs, str)
             for thumb, _, _ in refs}
    for old in thumbs_dir.glob(f"*-{THUMB_PX}.jpg") if thumbs_dir.is_dir() else []:
        if old.name not in used:
            old.unlink(missing_ok=True)


def plot_scores(rows: Sequence[Mapping[str, Any]], plots_dir: Path) -> list[tuple[str, str]]:
    """Score histograms, and scores against their thresholds per instance; one PNG each, returns (href, alt)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    candidates = [r for r in rows if r["candidate"] >= 0 and any(number(r.get(k)) is not None for k, _ in METRICS)]
    if not candidates:
        return []
    plots = []
    for name, title, draw in (
            ("score-histograms", "Score distributions: green passed every gate, red failed one or more; dashed: threshold",
             _histogram),
            ("score-vs-threshold", "Each instance's scores against its threshold (dashed); red failed one or more gates",
             _strip)):
        figure = Figure(figsize=(12, 2.4), dpi=100, layout="constrained")
        FigureCanvasAgg(figure)
        for axis, (key, label) in zip(figure.subplots(1, len(METRICS)), METRICS):
            points = [(f"{r['class']}/{r['instance']}", number(r.get(key)), number(r.get(f"threshold_{key}")),
                       bool(r["passed"])) for r in candidates]
            draw(axis, [p for p in points if p[1] is not None], label)
            _tidy(axis)
        with atomic_path(plots_dir / f"{name}.png") as tmp:
            figure.savefig(tmp, format="png", metadata={"Software": None})
        plots.append((href(f"plots/{name}.png"), title))
    return plots


_GREEN, _RED, _GREY = "#2da44e", "#cf222e", "#57606a"


def visible_thresholds(values: Sequence[float], thresholds: Iterable[float]) -> tuple[list[float], list[float]]:
    """Thresholds near the scores (drawn) and far from them (named only: -1 means "gate off")."""
    low, high = min(values), max(values)
    reach = max(high - low, 0.1)
    near, far = [], []
    for threshold in sorted(set(thresholds)):
        (near if low - reach <= threshold <= high + reach else far).append(threshold)
    return near, far


def _histogram(axis, points, label: str) -> None:
    values = [v for _, v, _, _ in points]
    axis.set_title(label, fontsize=11)
    axis.set_ylabel("candidates")
    if not values:
        return
    bins = 20 if max(values) > min(values) else 1
    axis.hist([[v for _, v, _, ok in points if ok], [v for _, v, _, ok in points if not ok]], bins=bins,
              stacked=True, color=[_GREEN, _RED])
    near, far = visible_thresholds(values, [t for _, _, t, _ in points if t is not None])
    for threshold in near[:12]:
        axis.axvline(threshold, color=_GREY, linestyle="--", linewidth=1)
    _name_far(axis, far)


def _strip(axis, points, label: str) -> None:
    """One column of dots per instance, its threshold as a dashed bar across the column."""
    groups = sorted({group for group, _, _, _ in points})
    axis.set_title(label, fontsize=11)
    axis.set_ylabel("score")
    if not points:
        return
    for x, group in enumerate(groups):
        mine = [(v, t, ok) for g, v, t, ok in points if g == group]
        offsets = [((n * 0.618) % 1 - 0.5) * 0.5 for n in range(len(mine))]  # fixed jitter: same plot every run
        axis.scatter([x + o for o in offsets], [v for v, _, _ in mine], s=12, alpha=0.8,
                     color=[_GREEN if ok else _RED for _, _, ok in mine])
        near, _ = visible_thresholds([v for v, _, _ in mine], [t for _, t, _ in mine if t is not None])
        for threshold in near:
            axis.plot([x - 0.4, x + 0.4], [threshold, threshold], color=_GREY, linestyle="--", linewidth=1.2)
    _, far = visible_thresholds([v for _, v, _, _ in points], [t for _, _, t, _ in points if t is not None])
    _name_far(axis, far)
    axis.set_xticks(range(len(groups)))
    axis.set_xticklabels([g.split("/", 1)[-1] for g in groups], rotation=30 if len(groups) > 4 else 0,
                         ha="right" if len(groups) > 4 else "center", fontsize=8)
    axis.set_xlim(-0.6, len(groups) - 0.4)


def _name_far(axis, far: Sequence[float]) -> None:
    if far:
        text = f"{min(far):.3f}" if max(far) - min(far) < 5e-4 else f"{min(far):.3f} to {max(far):.3f}"
        axis.set_title(f"{axis.get_title()}  (threshold {text}: off the scale)", fontsize=11)


def _tidy(axis) -> None:
    for side in ("top", "right"):
        axis.spines[side].set_visible(False)
    axis.grid(alpha=0.25)
    axis.tick_params(labelsize=8)
