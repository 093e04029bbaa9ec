"""Ctrl-C and SIGTERM: real signals to a running ``srdvol`` (its pid, or its whole process group
as a terminal's Ctrl-C does), exit 130/143, one line saying what was kept and how to resume, and
a rerun that ends exactly like an uninterrupted run. Also a worker process killed mid-predict,
and SIGKILL of ``srdvol predict`` with all its workers mid-write (nothing runs on the way out)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import zarr

from srdvol import interrupt
from srdvol.dask.graph import Ledger
from srdvol.training.state import state_path

PROGRESS = re.compile(r"^(training step|denoising) (\d+)/(\d+)")
# The plain progress lines of a batch job (stderr is a file here), as tests/test_progress.py
# checks them in detail.
TRAIN_LINE = re.compile(
    r"^training step \d+/16 loss [0-9.e+-]+ [0-9.e+-]+ samples/s ETA \d+:\d\d:\d\d elapsed "
)
BLOCK_LINE = re.compile(
    r"^denoising \d+/10 blocks (\d+ patches )?[0-9.e+-]+ Mvox/s ETA \d+:\d\d:\d\d elapsed "
)
# 16 steps: a loaded machine can run a few between the first progress line and the signal
TRAIN = ["--patch", "16,16,16", "--steps", "16", "--batch-size", "1"]


def _srdvol(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "srdvol"), *args]


def _env() -> dict[str, str]:
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", SRDVOL_PROGRESS_INTERVAL="0.2")


def _done(text: str) -> int:
    """The most units (steps, blocks) a progress line in ``text`` reports done."""
    counts = [int(m.group(2)) for line in text.splitlines() if (m := PROGRESS.match(line))]
    return max(counts, default=0)


def _signal_when(
    argv: list[str],
    log: Path,
    ready: Callable[[str], bool],
    act: Callable[[subprocess.Popen[bytes]], None],
) -> int:
    """Run ``argv`` as a batch job in its own session; once ``ready(log text)``, ``act`` on it
    (send a signal); return the exit code."""
    with log.open("w") as handle:
        proc = subprocess.Popen(
            argv, stdout=handle, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while not ready(log.read_text()):
            assert proc.poll() is None, f"the run ended before the signal:\n{log.read_text()}"
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert proc.poll() is None, f"the line came only at the end:\n{log.read_text()}"
        act(proc)
        return proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _line_seen(pattern: re.Pattern[str]) -> Callable[[str], bool]:
    """Ready once a batch-job progress line reporting at least one unit done is in the log
    (found while the run is still going: :func:`_signal_when` checks it is alive)."""

    def ready(text: str) -> bool:
        return any(pattern.match(line) for line in text.splitlines()) and _done(text) >= 1

    return ready


def _send(sig: int, group: bool) -> Callable[[subprocess.Popen[bytes]], None]:
    def act(proc: subprocess.Popen[bytes]) -> None:
        if group:
            os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C (or SLURM's scancel) does
        else:
            proc.send_signal(sig)

    return act


def _last_line(text: str) -> str:
    """srdvol's last line. After SIGTERM to the whole group, multiprocessing's resource tracker
    (a process of its own) may still warn about the semaphores of the killed workers."""
    lines = [line for line in text.splitlines() if line.strip()]
    while len(lines) > 1 and (
        "resource_tracker" in lines[-1] or lines[-1].startswith("  warnings.warn(")
    ):
        lines.pop()
    return lines[-1]


SIGNALS = [
    pytest.param(signal.SIGINT, False, 130, id="SIGINT-to-pid"),
    pytest.param(signal.SIGTERM, True, 143, id="SIGTERM-to-group"),
]


# ------------------------------------------------------------------------------ the mechanism


@pytest.fixture
def python_defaults():
    """Python's own handlers, as in a fresh interpreter (a shell's ``cmd &`` starts pytest
    with SIGINT ignored; conftest puts the previous handlers back afterwards)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _raise_signal(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.5)  # Python runs the handler between bytecodes, here at the latest


def test_the_first_signal_in_a_loop_is_a_request_and_a_second_one_raises(python_defaults):
    with interrupt.handling():
        with interrupt.deferred():
            _raise_signal(signal.SIGTERM)  # recorded, not raised: the loop ends its step first
            assert interrupt.requested() == signal.SIGTERM
            with pytest.raises(interrupt.Interrupted) as info:
                _raise_signal(signal.SIGINT)  # a second one stops at once
            assert interrupt.exit_code(info.value) == 130
            stop = interrupt.interruption("training state at step 3 of 8 saved to m.state")
        assert interrupt.exit_code(stop) == 143  # the signal that asked first
        assert interrupt.kept(stop) == ["training state at step 3 of 8 saved to m.state"]
        assert interrupt.requested() is None  # consumed: the next run starts clean
        with pytest.raises(interrupt.Interrupted):
            _raise_signal(signal.SIGINT)  # outside a loop: at once


def test_a_request_left_when_a_loop_ends_is_raised_on_leaving_it(python_defaults):
    with interrupt.handling(), pytest.raises(interrupt.Interrupted) as info:
        with interrupt.deferred():
            _raise_signal(signal.SIGINT)  # arrives during the last step
    assert isinstance(info.value, KeyboardInterrupt)
    assert interrupt.requested() is None


def test_a_plain_python_session_gets_a_graceful_ctrl_c_in_training_loops(python_defaults):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with interrupt.deferred():
        _raise_signal(signal.SIGINT)
        assert interrupt.requested() == signal.SIGINT
        interrupt.interruption()  # what the loop raises; consumes the request
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_single_process_training_stops_at_a_step_boundary_and_says_where(tmp_path, python_defaults):
    """A real SIGINT during in-process training: the step in progress ends, the state is
    saved, and the exception notes it; resuming gives the uninterrupted weights."""
    from srdvol.model.config import NetworkConfig
    from srdvol.simulate import simulate
    from srdvol.training.loop import train
    from srdvol.training.patches import PatchSampler

    simulate(tmp_path / "in.zarr", truth=tmp_path / "t.zarr", frames=32, size=(32, 32), seed=0)
    options = {
        "patch": (16, 16, 16),
        "steps": 6,
        "batch_size": 1,
        "network": NetworkConfig.tiny(16),
        "progress": False,
    }
    train(tmp_path / "in.zarr", tmp_path / "full", **options)
    calls = {"n": 0}
    sample = PatchSampler.sample

    def signal_during_step_3(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while step 3 draws its batch
        return sample(self, *args, **kwargs)

    PatchSampler.sample = signal_during_step_3  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            train(tmp_path / "in.zarr", tmp_path / "part", **options)
    finally:
        PatchSampler.sample = sample  # type: ignore[method-assign]
    assert torch.load(state_path(tmp_path / "part"), weights_only=True)["trainer"]["step"] == 3
    assert interrupt.kept(info.value) == [
        f"training state at step 3 of 6 saved to {state_path((tmp_path / 'part').absolute())}"
    ]
    train(tmp_path / "in.zarr", tmp_path / "part", resume=True, **options)
    full, part = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    for name in full:
        assert torch.equal(full[name], part[name]), name


# ------------------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small recording, a longer one for prediction, a tiny model, and reference results."""
    from srdvol.model.config import NetworkConfig
    from srdvol.simulate import simulate
    from srdvol.training.loop import train

    root = tmp_path_factory.mktemp("interrupt")
    simulate(root / "in.zarr", truth=root / "truth.zarr", frames=32, size=(32, 32), seed=0)
    simulate(root / "long.zarr", truth=root / "ltruth.zarr", frames=160, size=(32, 32), seed=1)
    train(
        root / "long.zarr",
        root / "tiny.safetensors",
        patch=(16, 16, 16),
        steps=1,
        batch_size=1,
        network=NetworkConfig.tiny(16),
        progress=False,
    )
    # what `srdvol train in.zarr M --patch 16,16,16 --steps 16 --batch-size 1` writes
    train(
        root / "in.zarr",
        root / "reference.safetensors",
        patch=(16, 16, 16),
        steps=16,
        batch_size=1,
        progress=False,
    )
    _predict_reference(root, "long.zarr", "reference.zarr")
    return root


def _predict_reference(root: Path, source: str, out: str) -> None:
    """An uninterrupted ``srdvol predict`` of ``source`` in ``root`` with the tiny model."""
    reference = subprocess.run(
        _srdvol("predict", source, out, *_predict_options()),
        cwd=root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert reference.returncode == 0, reference.stderr


def _predict_options() -> list[str]:
    return ["--model", "tiny.safetensors", "--block", "16,32,32", "--workers", "1"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from srdvol.model.checkpoint import load_model

    return load_model(path)[0].state_dict()


def _chunk_bytes(store: Path) -> dict[str, bytes]:
    """Every chunk file of every level, by relative path (metadata left out)."""
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and "/c/" in f"/{p.relative_to(store)}"
    }


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "group", "code"), SIGNALS)
def test_interrupted_training_saves_its_state_and_resumes_to_the_same_weights(
    data, tmp_path, sig, group, code
):
    model = tmp_path / "m.safetensors"
    argv = _srdvol("train", str(data / "in.zarr"), str(model), *TRAIN)
    log = tmp_path / "train.log"
    rc = _signal_when(argv, log, _line_seen(TRAIN_LINE), _send(sig, group))
    text = log.read_text()
    assert rc == code, text
    assert "Traceback" not in text
    step = torch.load(state_path(model), weights_only=True)["trainer"]["step"]
    assert 1 <= step < 16
    assert not model.exists()  # the model is written at the end only
    resume = shlex.join(["srdvol", *argv[1:], "--resume"])
    assert _last_line(text) == (
        f"srdvol: interrupted by {interrupt.signal_name(sig)}: training state at step {step} of "
        f"16 saved to {state_path(model)}; to resume, run: {resume}"
    )

    again = subprocess.run(
        [*argv, "--resume"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    # it continued, it did not start again: its first line reports the saved step as done, and
    # none reports fewer (lines come at an interval, so not every step has one)
    resumed = [int(m.group(2)) for line in again.stderr.splitlines() if (m := PROGRESS.match(line))]
    assert resumed and min(resumed) == step and max(resumed) == 16, again.stderr
    expected, got = _weights(data / "reference.safetensors"), _weights(model)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.slow
def test_interrupted_distributed_training_saves_the_state_of_every_rank(data, tmp_path):
    model = tmp_path / "m.safetensors"
    # More steps than the other runs: two ranks of a tiny network can finish 16 steps between
    # the first progress line and the signal on a fast machine.
    steps = 60
    options = [*TRAIN[:2], "--steps", str(steps), *TRAIN[4:]]
    argv = _srdvol("train", str(data / "in.zarr"), str(model), *options, "--workers", "2")
    argv += ["--dashboard-address", "127.0.0.1:0"]
    log = tmp_path / "ddp.log"
    line = re.compile(TRAIN_LINE.pattern.replace("/16 ", f"/{steps} "))
    rc = _signal_when(argv, log, _line_seen(line), _send(signal.SIGINT, True))
    text = log.read_text()
    assert rc == 130, text
    assert "Traceback" not in text
    saved = torch.load(state_path(model), weights_only=True)
    step = saved["trainer"]["step"]
    assert 1 <= step < steps and len(saved["ranks"]) == 2
    assert f"training state at step {step} of {steps} saved to {state_path(model)}" in (
        _last_line(text)
    )
    assert _last_line(text).endswith("--workers 2 --dashboard-address 127.0.0.1:0 --resume")
    # Resuming a distributed run to the uninterrupted weights: tests/test_ddp.py (same code path).


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "group", "code"), SIGNALS)
def test_interrupted_prediction_keeps_its_blocks_and_a_rerun_writes_the_same_bytes(
    data, tmp_path, sig, group, code
):
    out = tmp_path / "out.zarr"
    argv = _srdvol("predict", str(data / "long.zarr"), str(out), *_predict_options())
    argv[argv.index("tiny.safetensors")] = str(data / "tiny.safetensors")
    log = tmp_path / "predict.log"
    rc = _signal_when(argv, log, _line_seen(BLOCK_LINE), _send(sig, group))
    text = log.read_text()
    assert rc == code, text
    assert "Traceback" not in text and "CancelledError" not in text
    assert "terminate called" not in text  # no worker left torch mid-batch (stop_blocks)
    message = _last_line(text)
    found = re.match(
        rf"srdvol: interrupted by {interrupt.signal_name(sig)}: (\d+) of 10 blocks written and "
        rf"recorded in {re.escape(str(out))}/s0/\.srdvol-ledger\.json; to resume, run: srdvol "
        "predict ",
        message,
    )
    assert found, message
    assert 1 <= int(found.group(1)) < 10

    again = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{found.group(1)} already done" in again.stderr
    assert _chunk_bytes(out) == _chunk_bytes(data / "reference.zarr")


def _worker_processes(pid: int) -> list[psutil.Process]:
    """Dask worker processes started by the srdvol process ``pid`` (not the resource tracker)."""
    return [
        p
        for p in psutil.Process(pid).children(recursive=True)
        if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())
    ]


@pytest.mark.slow
def test_a_worker_killed_mid_prediction_is_recovered_or_named_and_a_rerun_completes(data, tmp_path):
    out = tmp_path / "out.zarr"
    argv = _srdvol("predict", str(data / "long.zarr"), str(out), *_predict_options())
    argv[argv.index("tiny.safetensors")] = str(data / "tiny.safetensors")
    log = tmp_path / "predict.log"

    def kill_a_worker(proc: subprocess.Popen[bytes]) -> None:
        workers = _worker_processes(proc.pid)
        assert workers, "no worker process found"
        workers[0].send_signal(signal.SIGKILL)

    rc = _signal_when(argv, log, lambda text: _done(text) >= 1, kill_a_worker)
    text = log.read_text()
    # the user is told why the run takes longer (distributed reruns the lost worker's tasks)
    assert re.search(r"srdvol: warning: lost worker tcp://\S+ \(it died", text), text
    if rc != 0:  # distributed could not retry the block: one clear sentence, then a rerun
        assert rc == 2 and _last_line(text).startswith("srdvol: error: "), text
        again = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
    assert _chunk_bytes(out) == _chunk_bytes(data / "reference.zarr")
    np.testing.assert_array_equal(
        zarr.open_group(out, mode="r")["s0"][...],
        zarr.open_group(data / "reference.zarr", mode="r")["s0"][...],
    )


def _recorded(ledger: Path) -> int:
    """Blocks a ledger file records as finished (read through Ledger with its own fingerprint)."""
    stored = json.loads(ledger.read_text())
    return Ledger(ledger, nblocks=stored["grid"], fingerprint=stored["fingerprint"]).count


@pytest.fixture(scope="module")
def longer(data):
    """A recording of 40 blocks (the tiny model runs 10 in about a second, less than the
    ledger's interval) and its uninterrupted output."""
    from srdvol.simulate import simulate

    simulate(
        data / "longer.zarr", truth=data / "longer-truth.zarr", frames=640, size=(32, 32), seed=2
    )
    _predict_reference(data, "longer.zarr", "longer-reference.zarr")
    return data / "longer.zarr", data / "longer-reference.zarr", 40


@pytest.mark.slow
def test_a_predict_killed_mid_write_resumes_to_the_same_bytes(data, longer, tmp_path):
    """SIGKILL of ``srdvol predict`` and its LocalCluster workers while blocks are being written:
    no handler runs, so what is on disk is what the writer had stored and what its ledger (written
    every 2 s, the default) had recorded. The model is a real network (a patch's prediction
    depends on the whole patch). The same command then takes the stale lock over, computes only
    the blocks the ledger lacks, and leaves the bytes of an uninterrupted run."""
    out = tmp_path / "out.zarr"
    source, reference, total = longer
    argv = _srdvol("predict", str(source), str(out), *_predict_options())
    argv[argv.index("tiny.safetensors")] = str(data / "tiny.safetensors")
    ledger = out / "s0" / ".srdvol-ledger.json"
    log = tmp_path / "predict.log"
    with log.open("w") as handle:
        proc = subprocess.Popen(
            argv, stdout=handle, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while not (ledger.exists() and _recorded(ledger) >= 1):
            assert proc.poll() is None, f"the run ended before the kill:\n{log.read_text()}"
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # srdvol, its nanny and worker processes
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    recorded = _recorded(ledger)
    assert 1 <= recorded < total, log.read_text()
    assert "wrote " not in log.read_text()  # it was killed mid-write, not after

    again = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "took over the lock of a run that is no longer running" in again.stderr
    # resumed where the ledger says, not from block 0 and not past a block it lacks
    assert f"{total - recorded} block(s) computed, {recorded} already done" in again.stderr
    assert _recorded(ledger) == total
    assert _chunk_bytes(out) == _chunk_bytes(reference)
