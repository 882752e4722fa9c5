"""Progress output: bars on a terminal, plain lines in a log, nothing with --quiet."""

from __future__ import annotations

import io
from types import SimpleNamespace

from catalog_gen.cli.progress import Bars


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_a_tenth_at_a_time_without_carriage_returns():
    log = io.StringIO()
    report = Bars(stream=log).training(100)(SimpleNamespace(key="ring/band"))
    for step in range(1, 101):
        report(step, 0.5, 10.0)
    report.note("drawing 2 validation image(s) at step 100")
    report.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0] == "ring/band: started (100 steps)"
    assert lines[1] == "ring/band: 10/100 steps, loss 0.5000, steps_s 10.00"
    assert len(lines) == 1 + 9 + 1 + 1  # start, each tenth up to 9/10, the note, the end
    assert lines[-1].startswith("ring/band: 100/100 steps") and "done in" in lines[-1]


def test_quiet_writes_nothing_and_a_terminal_gets_a_bar():
    quiet, terminal = Terminal(), Terminal()
    for stream, is_quiet in ((quiet, True), (terminal, False)):
        count = Bars(quiet=is_quiet, stream=stream).counter("image")
        for done in range(0, 9, 4):
            count("ring: class images", done, 8)
    assert quiet.getvalue() == ""
    assert "ring: class images" in terminal.getvalue() and "\r" in terminal.getvalue()


def test_the_generation_bar_opens_at_its_first_report_only():
    log = io.StringIO()
    progress = Bars(stream=log).generation()
    progress.close()  # the run stopped on an error before any SKU: no empty bar
    assert log.getvalue() == ""
    progress(SimpleNamespace(skus_done=1, errors=[], skus_total=4, skus_already_done=0, passed=2, candidates=4))
    progress.close()
    assert log.getvalue().splitlines()[0] == "SKUs: started"
    assert "1/4 skus" in log.getvalue() and "pass_rate 50%" in log.getvalue()
