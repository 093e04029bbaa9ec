"""srdvol.progress: one progress family; a rich bar in a terminal, plain lines in a batch log."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest
from rich.console import Console

from srdvol import progress
from srdvol.errors import ConfigError

TRAIN_LINE = re.compile(
    r"^training step (\d+)/(\d+) loss [0-9.e+-]+ ([0-9.]+) samples/s ETA (\d+:\d\d:\d\d) "
    r"elapsed \d+:\d\d:\d\d$"
)
BLOCK_LINE = re.compile(
    r"^denoising (\d+)/(\d+) blocks (\d+ patches )?([0-9.]+|-) Mvox/s ETA (\d+:\d\d:\d\d|-) "
    r"elapsed \d+:\d\d:\d\d$"
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_format_duration():
    assert progress.format_duration(0) == "0:00:00"
    assert progress.format_duration(361.4) == "0:06:01"
    assert progress.format_duration(26 * 3600 + 62) == "26:01:02"
    assert progress.format_duration(None) == "-"


def test_batch_log_lines_have_rate_and_eta_from_the_first_report():
    clock, out = FakeClock(), io.StringIO()
    bar = progress.TrainingProgress(
        total=2000, done=100, samples_per_step=8, stream=out, interval=3600, clock=clock
    )
    clock.now += 10.0
    bar.update(120, loss=0.0123)  # 20 steps of 8 samples in 10 s: 16 samples/s, 0.5 s per step
    first = out.getvalue().splitlines()
    assert first == [
        # a resumed run says at once where it starts ...
        "training step 100/2000 - samples/s ETA - elapsed 0:00:00",
        # ... and its first report has a rate and an ETA
        "training step 120/2000 loss 0.0123 16.0 samples/s ETA 0:15:40 elapsed 0:00:10",
    ]
    clock.now += 30.0
    bar.update(180, loss=0.01)  # no line between intervals ...
    assert len(out.getvalue().splitlines()) == 2
    bar.milestone()  # ... but one at each checkpoint
    clock.now += 5.0
    bar.close()  # and at the end
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert all(TRAIN_LINE.match(line) for line in lines[1:]), lines
    assert lines[-2].startswith("training step 180/2000 loss 0.01 16.0 samples/s ETA 0:15:10")
    assert lines[-1].startswith("training step 180/2000 loss 0.01 16.0 samples/s ETA 0:15:05")


def test_batch_log_writes_at_a_steady_interval_without_reports():
    out = io.StringIO()
    with progress.denoising(total=48, stream=out, interval=0.05) as bar:
        deadline = time.monotonic() + 10
        while out.getvalue().count("\n") < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        bar.update(12, total=48, voxels=3_400_000, skipped=0)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 4, lines
    assert lines[0].startswith("denoising 0/48 blocks - Mvox/s ETA -")
    assert all(BLOCK_LINE.match(line) for line in lines), lines
    assert re.match(r"denoising 12/48 blocks [0-9.]+ Mvox/s ETA \d+:\d\d:\d\d", lines[-1])


def test_resumed_units_do_not_count_towards_the_rate():
    clock, out = FakeClock(), io.StringIO()
    bar = progress.DenoisingProgress(stream=out, interval=3600, clock=clock)
    bar(_Snapshot(done=40, total=48, computed=0, skipped=40, voxels=0))
    clock.now += 4.0
    bar(_Snapshot(done=42, total=48, computed=2, skipped=40, voxels=2_000_000))
    bar.close()
    assert out.getvalue().splitlines()[0] == (
        "denoising 42/48 blocks 0.5 Mvox/s ETA 0:00:12 elapsed 0:00:04"
    )


class _Snapshot:
    def __init__(self, **fields: int) -> None:
        self.__dict__.update(fields)


def test_terminal_bar_shows_total_rate_and_a_numeric_eta():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=140, color_system=None)
    with progress.training(10, samples_per_step=4, console=console) as bar:
        time.sleep(0.05)
        bar.update(1, loss=0.5)
    text = buffer.getvalue()
    assert "training" in text and "step 1/10" in text
    assert re.search(r"loss 0\.5 · [0-9.]+ samples/s · ETA \d+:\d\d:\d\d", text), text
    assert "-:--:--" not in text and "0/?" not in text


def test_disabled_progress_writes_nothing():
    out = io.StringIO()
    with progress.training(5, enabled=False, stream=out) as bar:
        bar.update(1, loss=1.0)
        bar.milestone()
    assert out.getvalue() == ""


@pytest.mark.parametrize("value", ["soon", "0", "-3", "nan"])
def test_bad_interval_setting_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(progress.INTERVAL_ENV, value)
    with pytest.raises(ConfigError, match=progress.INTERVAL_ENV):
        progress.line_interval()


def test_interval_setting(monkeypatch):
    monkeypatch.delenv(progress.INTERVAL_ENV, raising=False)
    assert progress.line_interval() == progress.DEFAULT_INTERVAL == 30.0
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.5")
    assert progress.line_interval() == 0.5


def test_writer_reports_into_the_progress_family(tmp_path):
    import zarr

    from srdvol.dask.graph import denoise, write
    from srdvol.predict.predictors import AffineModel

    arr = np.random.default_rng(0).normal(100, 5, (32, 8, 16)).astype(np.float32)
    out = zarr.create_array(
        str(tmp_path / "o.zarr"), shape=arr.shape, chunks=(16, 8, 8), dtype="f4"
    )
    lazy = denoise(
        arr, AffineModel(), dims="tyx", patch=(16, 4, 4), chunks=(16, 8, 8), block=(16, 8, 8)
    )
    stream = io.StringIO()
    with progress.denoising(stream=stream, interval=3600) as bar:
        report = write(lazy, out, progress=bar)
    lines = stream.getvalue().splitlines()
    assert report.computed == 4
    assert lines[0].startswith("denoising 1/4 blocks") and lines[-1].startswith("denoising 4/4")
    assert all(BLOCK_LINE.match(line) for line in lines), lines


# Batch jobs: tests/test_interrupt.py runs `srdvol train` and `srdvol predict` with stdout and
# stderr redirected to a file, polls the file while they run, checks these lines there before the
# run ends (the process must still be alive), and only then signals them.
