"""How ``CampaignRun.wait(progress=True)`` shows a campaign's progress: a bar per family
where the terminal can redraw them, a line per change where it cannot (a file, a pipe)."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Mapping

from shared.plan import (
    PENDING,
    QUEUED,
    TERMINAL,
)


def _family_progress(
    family: str, counts: Mapping[str, int], epochs: dict[str, str]
) -> tuple[int, int, list[str]]:
    """A family's units ended, its units, and what to say of the rest (how many in each
    other state, its running folds' epochs)."""
    done = sum(n for state, n in counts.items() if state in TERMINAL)
    notes = [f"{n} {state.lower()}" for state, n in sorted(counts.items()) if state != "SUCCESS"]
    notes += [e for key, e in epochs.items() if key.split("/")[1] == family]
    return done, sum(counts.values()), notes


#: Where stderr is a file or a pipe (a CI job's log), a progress line at most this
#: often: a grid of a thousand short units would write a thousand lines a minute.
PIPED_LINE_SECONDS = 10.0


#: ... and at least this often, the same counts again: a fold that reports no epoch
#: for long must not leave the log silent (CI services kill a job after some minutes
#: without output).
PIPED_KEEPALIVE_SECONDS = 300.0


def progress_display() -> ProgressBars | ProgressLines:
    """Bars on a terminal that can redraw them, and in a notebook; a line per change
    elsewhere (TERM=dumb: an editor's shell, a job log through a pty; a file, a pipe, at
    most one per :data:`PIPED_LINE_SECONDS`), where rich would draw the bars once, at
    the end."""
    from rich.console import Console

    console = Console(stderr=True)
    if console.is_jupyter or (console.is_terminal and not console.is_dumb_terminal):
        return ProgressBars()
    if console.is_terminal:
        return ProgressLines()
    return ProgressLines(every=PIPED_LINE_SECONDS, again=PIPED_KEEPALIVE_SECONDS)


class ProgressLines:
    """The families' done / total units as one line on stderr, printed when it changes,
    ``every`` so many seconds at most (and ``again``, when it has not changed for so
    long); the last change is printed as it closes."""

    def __init__(self, every: float = 0.0, again: float = math.inf) -> None:
        self._every = every
        self._again = again
        self._printed = ""
        self._printed_at = -math.inf
        self._pending: str | None = None

    def update(self, by_family: Mapping[str, Mapping[str, int]], epochs: dict[str, str]) -> None:
        parts = []
        for family, counts in by_family.items():
            done, total, notes = _family_progress(family, counts, epochs)
            parts.append(f"{family} {done}/{total}" + (f" ({', '.join(notes)})" if notes else ""))
        line = "; ".join(parts)
        self._pending = None if line == self._printed else line
        self.refresh()

    def refresh(self) -> None:
        since = time.monotonic() - self._printed_at
        if self._pending is None and self._printed and since >= self._again:
            self._pending = self._printed  # still so: said again, the log not silent
        if self._pending is not None and since >= self._every:
            self._print()

    def _print(self) -> None:
        line, self._pending = self._pending, None
        self._printed, self._printed_at = line, time.monotonic()
        # UTC, as every time orchard prints (README)
        print(f"{time.strftime('%H:%M:%SZ', time.gmtime())} {line}", file=sys.stderr, flush=True)

    def warn(self, line: str) -> None:
        print(f"orchard: warning: {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._pending is not None:
            self._print()  # the campaign's last counts, however soon after the line before


class ProgressBars:
    """A live bar per family (done / total units), drawn with rich."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.table import Column

        # on stderr, whose terminal the callers ask about: stdout holds what a script
        # reads (the campaign's id, the outcome)
        console = Console(stderr=True)
        # what the family (12), a bar (at least 10), its count (up to 11: 1000/1000)
        # and clock (7) and the gaps between them leave; none on a very narrow terminal
        detail_width = max(0, console.width - 44)
        self._progress = Progress(
            # markup=False: a note is printed as it is, never read as rich's markup
            TextColumn("{task.description:<12}", markup=False, table_column=Column(no_wrap=True)),
            BarColumn(),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TimeElapsedColumn(table_column=Column(no_wrap=True)),
            # last, and cut short (with an ellipsis) where the terminal is narrow: the
            # family, its bar and its count stay whole
            TextColumn(
                "{task.fields[detail]}",
                markup=False,
                table_column=Column(no_wrap=True, overflow="ellipsis", max_width=detail_width),
            ),
            transient=False,
            # redrawn at each poll by the waiting thread (update), with no refresh thread
            # of its own: one that a signal (the demo's SIGTERM) caught starting, or whose
            # stop rich does not wait for, could outlive the interpreter's shutdown and
            # die noisily ("Exception ignored in thread started by ... _RefreshThread")
            auto_refresh=False,
            console=console,
        )
        self._tasks: dict[str, int] = {}
        self._started: set[str] = set()  # families whose clock started ...
        self._stopped: set[str] = set()  # ... and stopped: every unit ended
        try:
            self._progress.start()
        except BaseException:
            # a signal turned into an exception (the demo's SIGTERM) as the display
            # started: no one else holds it to restore the terminal (the cursor); a stop
            # of a half-started display must not hide the signal
            with contextlib.suppress(Exception):
                self._progress.stop()
            raise

    def update(self, by_family: Mapping[str, Mapping[str, int]], epochs: dict[str, str]) -> None:
        """Redraw from the units counted per family and state (``Store.family_counts``,
        or ``CampaignStatus.by_family``) and the running folds' epochs."""
        for family, counts in by_family.items():
            done, total, notes = _family_progress(family, counts, epochs)
            if family not in self._tasks:
                # its clock starts when its stage does, not at submit
                self._tasks[family] = self._progress.add_task(
                    family, total=total, detail="", start=False
                )
            task = self._tasks[family]
            if family not in self._started and any(s not in (PENDING, QUEUED) for s in counts):
                self._started.add(family)
                self._progress.start_task(task)
            self._progress.update(task, completed=done, detail=", ".join(notes))
            if family in self._started - self._stopped and done == total:
                self._stopped.add(family)
                self._progress.stop_task(task)  # its time stays that of the stage
        self._progress.refresh()

    def refresh(self) -> None:
        """Redraw (the elapsed times move) without reading the store."""
        self._progress.refresh()

    def warn(self, line: str) -> None:
        """A line above the bars (they are redrawn below it)."""
        self._progress.console.print(
            f"orchard: warning: {line}", markup=False, highlight=False, soft_wrap=True
        )

    def close(self) -> None:
        self._progress.stop()
