"""The report page's front-end files, shipped as package data and inlined into the page (no network):

    report.css   the page's styles
    report.js    filters, sort and the full-image view
    review.js    decisions, keys, the save queue and export (talks to server.py's /api/decisions)
"""

from __future__ import annotations

from importlib.resources import files


def asset(name: str) -> str:
    """The text of one front-end file of this folder."""
    return files(__package__).joinpath(name).read_text(encoding="utf-8")
