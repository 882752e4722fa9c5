"""Plain-text views of results for the command line (pure: data in, lines out)."""

from __future__ import annotations

from typing import Iterable

from catalog_gen import layout
from catalog_gen.catalog import taxonomy


def taxonomy_lines(result: taxonomy.Taxonomy) -> list[str]:
    table = result.table()
    lines = [f"class map '{result.class_map.name}' ({result.class_map.source}), "
             f"minimum {result.class_map.min_photos} photos per instance"]
    lines.append(f"{'class':<10} {'instance':<12} {'photos':>6}  status")
    for row in table.iter_rows(named=True):
        lines.append(f"{row['class']:<10} {row['instance']:<12} {row['photos']:>6}  {row['status']}")
    if result.skipped:
        lines.append(f"{len(result.skipped)} item(s) not used:")
        lines.extend(f"  [{s.kind}] {s.item}: {s.reason}" for s in result.skipped)
    return lines


def train_summary_lines(summary) -> list[str]:
    lines = []
    for outcome in summary.outcomes:
        where = f" -> {outcome.adapter_dir}" if outcome.adapter_dir else ""
        # No time for an adapter copied from one trained for several (lora-captions): its LoRA's line has it.
        seconds = f", {outcome.seconds:.1f}s" if outcome.seconds else ""
        timing = f" ({outcome.steps} steps{seconds})" if outcome.status == "trained" else ""
        detail = f": {outcome.detail}" if outcome.detail else ""
        lines.append(f"{outcome.status:<16} {outcome.key}{timing}{detail}{where}")
    for skipped in summary.skipped:
        lines.append(f"{'not trained':<16} {skipped.item}: {skipped.reason}")
    lines.extend(f"{'note':<16} {note}" for note in summary.notes)
    trained = sum(o.status == "trained" for o in summary.outcomes)
    lines.append(f"{trained} trained, {len(summary.outcomes) - trained - len(summary.failed)} already trained, "
                 f"{len(summary.failed)} failed")
    return lines


def generation_summary_lines(summary) -> list[str]:
    lines = [f"run folder: {summary.run_dir}",
             f"SKUs: {summary.skus_done} generated, {summary.skus_already_done} already done, "
             f"{len(summary.errors)} with errors, {summary.rejected_rows} sheet rows rejected ({layout.REJECTS_CSV})",
             f"candidates: {summary.candidates}, passed the gates: {summary.passed}, kept: {summary.kept} "
             f"({summary.seconds:.1f}s)"]
    if summary.failed_by_gate:
        lines.append("failed gates: " + ", ".join(f"{gate} {count}" for gate, count in sorted(summary.failed_by_gate.items())))
    lines.extend(f"error {sku}: {message}" for sku, message in summary.errors)
    written = [name for name in (layout.MANIFEST_PARQUET, layout.MANIFEST_CSV) if (summary.run_dir / name).is_file()]
    if written:  # name only the files that are there (a run with no SKU to do writes none)
        lines.append(f"manifest: {summary.run_dir / written[0]}" + (f" and {written[1]}" if len(written) > 1 else ""))
    return lines


def indent(lines: Iterable[str], prefix: str = "  ") -> list[str]:
    return [prefix + line for line in lines]
