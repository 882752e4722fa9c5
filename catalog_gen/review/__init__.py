"""Stage 5, review: the QA report a person approves or rejects in, the decisions, and the export.

    report.py      the self-contained HTML report of a run (catalog report)
    page/          its CSS and JavaScript, as files
    decisions.py   approve / reject per candidate: validated, merged, stored under a lock
    server.py      the local review server (catalog review)
    export.py      approved images for marketplaces (catalog export)
"""
