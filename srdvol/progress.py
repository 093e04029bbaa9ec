"""Progress of long jobs: one family for training, distributed training and prediction.

When stderr is a terminal, a rich bar shows the count, the rate and a numeric ETA from the first
report. Otherwise (a SLURM log, ``cmd > log 2>&1``) plain lines are written and flushed at a
steady interval (every 30 s; the environment variable ``SRDVOL_PROGRESS_INTERVAL`` sets another
number of seconds), at each milestone (a training checkpoint) and at the end::

    training step 120/2000 loss 0.0123 5.2 samples/s ETA 0:06:01 elapsed 0:00:23
    denoising 12/48 blocks 3.4 Mvox/s ETA 0:00:40 elapsed 0:00:13
    denoising 0/1 blocks 1234 patches - Mvox/s ETA - elapsed 0:01:30   (a long first block)

Rates and ETAs are measured on this process's clock over this run (steps or blocks already done
by an earlier, resumed run do not count), so a distributed run shows the real global rate.

Examples
--------
>>> with training(total=2000, samples_per_step=8) as bar:  # doctest: +SKIP
...     bar.update(1, loss=0.5)
>>> with denoising() as bar:  # doctest: +SKIP
...     write(lazy, target, progress=bar)
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from srdvol.errors import ConfigError

__all__ = [
    "DEFAULT_INTERVAL",
    "INTERVAL_ENV",
    "DenoisingProgress",
    "Tracker",
    "TrainingProgress",
    "denoising",
    "format_duration",
    "line_interval",
    "training",
]

#: Seconds between plain progress lines when stderr is not a terminal.
DEFAULT_INTERVAL = 30.0
INTERVAL_ENV = "SRDVOL_PROGRESS_INTERVAL"


def line_interval() -> float:
    """Seconds between plain progress lines (``SRDVOL_PROGRESS_INTERVAL``, default 30).

    Raises
    ------
    ConfigError
        If the variable is set to something that is not a positive number.
    """
    text = os.environ.get(INTERVAL_ENV)
    if text is None or not text.strip():
        return DEFAULT_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(
            INTERVAL_ENV,
            f"{text!r} is not a positive number of seconds",
            f"set it to a number such as 30, or unset it for {DEFAULT_INTERVAL:g} s",
        )
    return value


def format_duration(seconds: float | None) -> str:
    """``H:MM:SS`` (hours may pass 24), or ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _figure(value: float) -> str:
    """A rate with one decimal, or three significant digits below 1 (never a bare 0.0)."""
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"


class Tracker:
    """One progress display; subclasses say what a report holds and how it reads.

    Parameters
    ----------
    label
        First word of every line (``"training"``, ``"denoising"``).
    total
        Units of the whole job (steps, blocks); None until known.
    done
        Units already done before this run (a resume); they do not count towards the rate.
    enabled
        False: show nothing.
    console
        A :class:`rich.console.Console`; default one on stderr. Its ``is_terminal`` decides
        between the bar and plain lines.
    stream
        Where plain lines go (default: ``sys.stderr``).
    interval
        Seconds between plain lines (default :func:`line_interval`).
    """

    label = "progress"

    def __init__(
        self,
        *,
        total: int | None = None,
        done: int = 0,
        enabled: bool = True,
        console: Any = None,
        stream: IO[str] | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = None if total is None else int(total)
        self.done = int(done)
        self.start_done = int(done)
        self.enabled = enabled
        self._clock = clock
        self.started = clock()
        self._reported_at: float | None = None
        self._lock = threading.RLock()
        self._bar: Any = None
        self._task: Any = None
        self._stream = stream
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lines = 0
        self._last_line: tuple[int, float] | None = None
        if not enabled:
            return
        if console is None and stream is None:
            from rich.console import Console

            console = Console(stderr=True)
        if console is not None and console.is_terminal:
            self._start_bar(console)
        else:
            self._stream = stream if stream is not None else sys.stderr
            self._interval = line_interval() if interval is None else float(interval)
            self._thread = threading.Thread(
                target=self._heartbeat, name=f"srdvol {self.label} progress", daemon=True
            )
            self._thread.start()
            if self.done:
                # a resumed run's log says at once where it starts, before its first new report
                self._write_line()

    # -- what subclasses provide --------------------------------------------------------------

    def count_text(self) -> str:
        """``"12/48 blocks"``, ``"step 120/2000"``."""
        return f"{self.done}/{'?' if self.total is None else self.total}"

    def rate_text(self) -> str:
        """The rate part of the line, e.g. ``"5.2 samples/s"``."""
        return ""

    def extra_text(self) -> str:
        """Text before the rate (e.g. the loss)."""
        return ""

    # -- shared ---------------------------------------------------------------------------------

    @property
    def elapsed(self) -> float:
        """Seconds since this display started."""
        return self._clock() - self.started

    @property
    def fresh(self) -> int:
        """Units done in this run."""
        return self.done - self.start_done

    def eta(self) -> float | None:
        """Seconds left at this run's pace (None before the first unit of this run)."""
        if self.total is None or self.fresh <= 0 or self._reported_at is None:
            return None
        per_unit = (self._reported_at - self.started) / self.fresh
        left = (self.total - self.done) * per_unit
        return max(0.0, left - (self._clock() - self._reported_at))

    def text(self) -> str:
        """The whole progress line (what a batch log shows)."""
        parts = [self.label, self.count_text(), self.extra_text(), self.rate_text()]
        parts.append(f"ETA {format_duration(self.eta())}")
        parts.append(f"elapsed {format_duration(self.elapsed)}")
        return " ".join(p for p in parts if p)

    def _advance(self, done: int, total: int | None) -> bool:
        """Record a report; True for the first report of this display."""
        first = self._reported_at is None
        if total is not None:
            self.total = int(total)
        self.done = int(done)
        self._reported_at = self._clock()
        return first

    def _show(self, *, line: bool) -> None:
        """Refresh the bar, or write a line now when ``line``."""
        if not self.enabled:
            return
        if self._bar is not None:
            parts = (self.extra_text(), self.rate_text(), f"ETA {format_duration(self.eta())}")
            self._bar.update(
                self._task,
                completed=self.done,
                total=self.total,
                count=self.count_text(),
                info=" · ".join(p for p in parts if p),
            )
        elif line:
            self._write_line()

    def _write_line(self) -> None:
        with self._lock:
            stream = self._stream
            if stream is None:
                return
            stream.write(self.text() + "\n")
            stream.flush()
            self._lines += 1
            self._last_line = (self.done, self._clock())

    def _heartbeat(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                self._write_line()

    def _start_bar(self, console: Any) -> None:
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self._bar = Bar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[count]}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._bar.start()
        self._task = self._bar.add_task(
            self.label, total=self.total, completed=self.done, count=self.count_text(), info=""
        )

    def milestone(self) -> None:
        """Write a line now (a checkpoint was written) in a batch log; refresh a bar."""
        with self._lock:
            self._show(line=True)

    def close(self) -> None:
        """Write the final line (batch log) or stop the bar."""
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            if self._bar is not None:
                self._show(line=False)
                self._bar.stop()
                self._bar = None
            elif self._stream is not None:
                last = self._last_line
                if last is None or last[0] != self.done or self._clock() - last[1] >= 1.0:
                    self._write_line()  # the final line, unless one for this count just went out
                self._stream = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrainingProgress(Tracker):
    """Training steps: ``training step 120/2000 loss 0.0123 5.2 samples/s ETA 0:06:01``.

    Parameters
    ----------
    samples_per_step
        Patches per optimiser step over all ranks (batch size x ranks); the rate is these
        samples over this display's wall time.
    **kwargs
        See :class:`Tracker`.
    """

    label = "training"

    def __init__(self, *, samples_per_step: int = 1, **kwargs: Any) -> None:
        self.samples_per_step = int(samples_per_step)
        self.loss: float | None = None
        super().__init__(**kwargs)

    def count_text(self) -> str:
        return f"step {super().count_text()}"

    def extra_text(self) -> str:
        return "" if self.loss is None else f"loss {self.loss:.4g}"

    def samples_per_s(self) -> float | None:
        """Global samples per second in this run (None before the first step)."""
        if self._reported_at is None or self.fresh <= 0:
            return None
        seconds = self._reported_at - self.started
        return self.fresh * self.samples_per_step / seconds if seconds > 0 else None

    def rate_text(self) -> str:
        rate = self.samples_per_s()
        return f"{'-' if rate is None else _figure(rate)} samples/s"

    def update(self, step: int, *, total: int | None = None, loss: float | None = None) -> None:
        """Report that ``step`` steps are done (in all, including resumed ones)."""
        with self._lock:
            first = self._advance(step, total)
            if loss is not None:
                self.loss = float(loss)
            self._show(line=first)


class DenoisingProgress(Tracker):
    """Blocks written: ``denoising 12/48 blocks 3.4 Mvox/s ETA 0:00:40``.

    While blocks run, the patches the model has predicted so far show too (``denoising 0/1
    blocks 1234 patches ...``), so a block that takes minutes is seen to advance. Callable with
    the writer's :class:`srdvol.dask.graph.Progress` snapshots, so an instance is
    :func:`srdvol.dask.graph.write`'s ``progress`` argument.
    """

    label = "denoising"

    def __init__(self, **kwargs: Any) -> None:
        self.voxels = 0
        self.patches = 0
        super().__init__(**kwargs)

    def count_text(self) -> str:
        return f"{super().count_text()} blocks"

    def extra_text(self) -> str:
        return f"{self.patches} patches" if self.patches else ""

    def rate_text(self) -> str:
        if self._reported_at is None or self.voxels <= 0:
            return "- Mvox/s"
        seconds = self._reported_at - self.started
        return f"{_figure(self.voxels / max(seconds, 1e-9) / 1e6)} Mvox/s"

    def update(
        self,
        done: int,
        *,
        total: int | None = None,
        voxels: int = 0,
        skipped: int | None = None,
        patches: int | None = None,
    ) -> None:
        """Report ``done`` blocks of ``total`` (``skipped`` of them by an earlier run), the
        voxels written and the patches predicted in this run."""
        with self._lock:
            if skipped is not None and self._reported_at is None:
                self.start_done = int(skipped)  # finished by an earlier run: not part of the rate
            if patches is not None:
                self.patches = int(patches)
            first = self._advance(done, total)
            self.voxels = int(voxels)
            self._show(line=first)

    def __call__(self, snapshot: Any) -> None:
        """Take a :class:`srdvol.dask.graph.Progress` (done, total, skipped, voxels, patches)."""
        if snapshot.computed == 0:  # the totals, or patches of blocks still running
            with self._lock:
                self.total = int(snapshot.total)
                if self._reported_at is None:
                    self.done = self.start_done = int(snapshot.skipped)
                self.patches = int(getattr(snapshot, "patches", 0))
                self._show(line=False)
            return
        self.update(
            snapshot.done,
            total=snapshot.total,
            voxels=snapshot.voxels,
            skipped=snapshot.skipped,
            patches=getattr(snapshot, "patches", None),
        )


@contextlib.contextmanager
def training(
    total: int | None = None,
    *,
    done: int = 0,
    samples_per_step: int = 1,
    enabled: bool = True,
    **kwargs: Any,
) -> Iterator[TrainingProgress]:
    """A :class:`TrainingProgress` for the duration of the block (see :class:`Tracker`)."""
    bar = TrainingProgress(
        total=total, done=done, samples_per_step=samples_per_step, enabled=enabled, **kwargs
    )
    try:
        yield bar
    finally:
        bar.close()


@contextlib.contextmanager
def denoising(
    total: int | None = None, *, enabled: bool = True, **kwargs: Any
) -> Iterator[DenoisingProgress]:
    """A :class:`DenoisingProgress` for the duration of the block (see :class:`Tracker`)."""
    bar = DenoisingProgress(total=total, enabled=enabled, **kwargs)
    try:
        yield bar
    finally:
        bar.close()
