"""Progress for the `catalog` command: what the library reports through its callbacks, drawn on stderr.

On a terminal each long step gets a tqdm bar. When stderr is not a terminal (a nightly cron job, CI, a
pipe to a log file) bars would fill the log with carriage returns, so each step writes plain lines
instead: when it starts, about every tenth of the way or every LOG_EVERY_S seconds, and when it ends.
--quiet draws nothing. The library never prints; only this module turns its reports into output.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

LOG_EVERY_S = 30.0
"""Non-terminal output: the longest silence between two lines of one step."""


class Bars:
    """Makes one progress display per step: a tqdm bar, log lines, or nothing (quiet)."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.live = not quiet and self.stream.isatty()

    def bar(self, label: str, total: int | None, unit: str) -> "_Bar":
        if self.quiet:
            return _Bar()
        if self.live:
            return _LiveBar(label, total, unit, self.stream)
        return _LogBar(label, total, unit, self.stream)

    # -- the library's callback shapes

    def counter(self, unit: str) -> Callable[[str, int, int], None]:
        """progress(label, done, total): one display per label, closed when done reaches total."""
        open_bars: dict[str, _Bar] = {}

        def report(label: str, done: int, total: int) -> None:
            bar = open_bars.get(label)
            if bar is None:
                bar = open_bars[label] = self.bar(label, total, unit)
            bar.update(done, total)
            if done >= total:
                bar.close()
                del open_bars[label]

        return report

    def fraction(self, label: str, unit: str) -> Callable[[int, int], None]:
        """progress(done, total) for one fixed step (thumbnails)."""
        counter = self.counter(unit)
        return lambda done, total: counter(label, done, total)

    def training(self, total_steps: int | None) -> Callable:
        """train_class's progress factory: per instance a reporter(step, loss, steps/s) with note() and close()."""
        return lambda job: _TrainingReporter(self.bar(job.key, total_steps, "step"))

    def generation(self) -> Callable:
        """generate's progress(summary): a bar over SKUs, opened at the first report (an error before any
        SKU starts prints no empty bar)."""
        state: dict[str, _Bar] = {}
        started = time.perf_counter()

        def report(summary) -> None:
            if "bar" not in state:
                state["bar"] = self.bar("SKUs", None, "sku")
            elapsed = max(time.perf_counter() - started, 1e-9)
            rate = summary.passed / summary.candidates if summary.candidates else 0.0
            state["bar"].update(summary.skus_done + len(summary.errors), summary.skus_total - summary.skus_already_done,
                                images_s=f"{summary.candidates / elapsed:.2f}", pass_rate=f"{rate:.0%}")

        def close() -> None:
            if "bar" in state:
                state.pop("bar").close()

        report.close = close
        return report


class _Bar:
    """Nothing shown (quiet); the interface of every display."""

    def update(self, done: int, total: int | None = None, **info) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class _LiveBar(_Bar):
    def __init__(self, label: str, total: int | None, unit: str, stream: TextIO):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=label, unit=unit, dynamic_ncols=True, leave=True, file=stream)

    def update(self, done: int, total: int | None = None, **info) -> None:
        if total is not None:
            self._bar.total = total
        self._bar.n = done
        if info:
            self._bar.set_postfix(info, refresh=False)
        self._bar.refresh()

    def note(self, text: str) -> None:
        self._bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        self._bar.close()


class _LogBar(_Bar):
    """Plain lines for logs: start, every tenth (or LOG_EVERY_S seconds), end."""

    def __init__(self, label: str, total: int | None, unit: str, stream: TextIO):
        self.label, self.total, self.unit, self.stream = label, total, unit, stream
        self.done, self.info, self.started = 0, {}, time.monotonic()
        self.last_line, self.last_tenth, self.closed = self.started, 0, False
        self._line(f"{label}: started" + (f" ({total} {unit}s)" if total else ""))

    def update(self, done: int, total: int | None = None, **info) -> None:
        self.done, self.total, self.info = done, total if total is not None else self.total, info or self.info
        tenth = int(10 * done / self.total) if self.total else 0
        if self.total and done >= self.total:
            return  # the closing line says it
        if tenth > self.last_tenth or time.monotonic() - self.last_line >= LOG_EVERY_S:
            self.last_tenth = tenth
            self._line(self._status())

    def note(self, text: str) -> None:
        self._line(f"{self.label}: {text}")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(f"{self._status()}, done in {time.monotonic() - self.started:.1f}s")

    def _status(self) -> str:
        of = f"/{self.total}" if self.total else ""
        extra = "".join(f", {key} {value}" for key, value in self.info.items())
        return f"{self.label}: {self.done}{of} {self.unit}s{extra}"

    def _line(self, text: str) -> None:
        self.last_line = time.monotonic()
        print(text, file=self.stream, flush=True)


class _TrainingReporter:
    def __init__(self, bar: _Bar):
        self._bar = bar

    def __call__(self, step: int, loss: float, steps_per_second: float) -> None:
        self._bar.update(step, loss=f"{loss:.4f}", steps_s=f"{steps_per_second:.2f}")

    def note(self, text: str) -> None:
        self._bar.note(text)

    def close(self) -> None:
        self._bar.close()
