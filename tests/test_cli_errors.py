"""Faults found by trying (issue 8): each is one sentence, exit 2, nothing written, input kept.

The table runs the command line in-process on small real stores that were damaged the way the
issue's author damaged them (a chunk file removed or truncated, ``zarr.json`` edited, model bytes
overwritten). Cases that need a read-only or full file system mount a real tmpfs in a private
mount namespace (``unshare``), so they run as any user where user namespaces are allowed, and are
skipped elsewhere. Cases that need a second process (a live lock holder, two concurrent runs)
start real processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from cli_run import assert_one_clear_sentence, run_cli

from srdvol.ngff.lock import lock_path
from srdvol.values import DEFAULT_ANCHOR

pytestmark = pytest.mark.slow


def _edit_json(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document, indent=2))


def corrupt_model(path: Path, *, seed: int = 0) -> None:
    """Overwrite 4 KiB (or the whole tensor, if smaller) inside the largest float32 tensor."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    begin, end = max(
        (
            e["data_offsets"]
            for k, e in header.items()
            if k != "__metadata__" and e["dtype"] == "F32"
        ),
        key=lambda span: span[1] - span[0],
    )
    with path.open("r+b") as stream:
        stream.seek(8 + length + begin)
        stream.write(np.random.default_rng(seed).bytes(min(4096, end - begin)))


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """A simulated recording, a tiny model, and one damaged copy per fault of the issue."""
    from srdvol.model.config import NetworkConfig
    from srdvol.simulate import simulate
    from srdvol.training.loop import train

    root = tmp_path_factory.mktemp("faults")
    simulate(root / "in.zarr", truth=root / "truth.zarr", frames=32, size=(32, 32), seed=0)
    train(
        root / "in.zarr",
        root / "m16.safetensors",
        patch=(16, 16, 16),
        steps=1,
        batch_size=1,
        network=NetworkConfig.tiny(patch_t=16),
        progress=False,
    )
    (root / "m16.safetensors.state").unlink()

    def copy(name: str) -> Path:
        shutil.copytree(root / "in.zarr", root / name)
        return root / name

    (copy("missing.zarr") / "s0/c/1/0/0").unlink()
    _edit_json(copy("enlarged.zarr") / "s0/zarr.json", lambda d: d["shape"].__setitem__(0, 48))
    chunk = copy("truncated.zarr") / "s0/c/1/0/0"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    meta = copy("badjson.zarr") / "s0/zarr.json"
    meta.write_text(meta.read_text().replace('"shape"', "shape"))
    _edit_json(
        copy("chunkshape.zarr") / "s0/zarr.json",
        lambda d: d["chunk_grid"]["configuration"].__setitem__("chunk_shape", [8, 32, 32]),
    )
    _edit_json(
        copy("nodatasets.zarr") / "zarr.json",
        lambda d: d["attributes"]["ome"]["multiscales"][0].__setitem__("datasets", []),
    )
    bright = zarr.open_array(copy("bright.zarr") / "s0", mode="r+")
    bright[...] = (bright[...] * 3 + 200).astype(bright.dtype)  # another intensity range
    shutil.copy(root / "m16.safetensors", root / "corrupt.safetensors")
    corrupt_model(root / "corrupt.safetensors")
    shutil.copy(root / "m16.safetensors", root / "mc.safetensors")
    (root / "models").mkdir()
    shutil.copy(root / "m16.safetensors", root / "models" / "mc.safetensors")
    return root


def digests(root: Path) -> dict[str, str]:
    """A hash of every file and store in ``root``: what "nothing written" is checked against."""
    from conftest import digest

    return {
        p.name: digest(p) if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.iterdir()
    }


MODEL = ["--model", "m16.safetensors"]
FAULTS = [
    # (case, argv, subject the message starts with, words of the problem or fix)
    (
        "overwrite: OUT is the model",
        ["predict", "in.zarr", "mc.safetensors", "--model", "mc.safetensors", "--overwrite"],
        "mc.safetensors",
        "the output is the model file",
    ),
    (
        "overwrite: OUT holds the model",
        ["predict", "in.zarr", "models", "--model", "models/mc.safetensors", "--overwrite"],
        "models",
        "holds the model file",
    ),
    (
        "overwrite: denoise OUT holds the model",
        ["denoise", "in.zarr", "models", "--model", "models/mc.safetensors", "--overwrite"],
        "models",
        "holds the model file",
    ),
    (
        "overwrite: OUT is not a Zarr store",
        ["predict", "in.zarr", "m16.safetensors.d", *MODEL, "--overwrite"],
        "m16.safetensors.d",
        "not a Zarr store",
    ),
    (
        "missing chunk: predict",
        ["predict", "missing.zarr", "out.zarr", *MODEL],
        "missing.zarr/s0",
        "1 of the 2 chunks is missing (at t=16:32, y=0:32, x=0:32)",
    ),
    (
        "missing chunk: train",
        ["train", "missing.zarr", "new.safetensors", "--patch", "16,16,16", "--steps", "1"],
        "missing.zarr/s0",
        "--allow-missing-chunks",
    ),
    (
        "missing chunk: denoise",
        ["denoise", "missing.zarr", "out.zarr", "--patch", "16,16,16", "--steps", "1"],
        "missing.zarr/s0",
        "fill value 0",
    ),
    (
        "shape enlarged in zarr.json",
        ["predict", "enlarged.zarr", "out.zarr", *MODEL],
        "enlarged.zarr/s0",
        "1 of the 3 chunks is missing (at t=32:48, y=0:32, x=0:32)",
    ),
    (
        "truncated chunk",
        ["predict", "truncated.zarr", "out.zarr", *MODEL],
        "truncated.zarr/s0/c/1/0/0",
        "the chunk at t=16:32, y=0:32, x=0:32 cannot be read",
    ),
    (
        "malformed zarr.json",
        ["predict", "badjson.zarr", "out.zarr", *MODEL],
        "badjson.zarr/s0/zarr.json",
        "JSONDecodeError",
    ),
    (
        "chunk_shape disagrees with the data",
        ["predict", "chunkshape.zarr", "out.zarr", *MODEL],
        "chunkshape.zarr/s0/c/0/0/0",
        "does not fit the chunk shape (8, 32, 32)",
    ),
    (
        "multiscales lists no datasets",
        ["predict", "nodatasets.zarr", "out.zarr", *MODEL],
        "nodatasets.zarr",
        "lists no datasets",
    ),
    (
        "corrupted model weights",
        ["predict", "in.zarr", "out.zarr", "--model", "corrupt.safetensors"],
        "corrupt.safetensors",
        "do not match the checksum",
    ),
    (
        "dashboard address",
        ["predict", "in.zarr", "out.zarr", *MODEL, "--dashboard-address", "notanaddress"],
        "--dashboard-address",
        "'notanaddress' is not an address",
    ),
    (
        "scheduler address",
        ["predict", "in.zarr", "out.zarr", *MODEL, "--scheduler", "notaurl"],
        "--scheduler",
        "'notaurl' is not a scheduler address",
    ),
    (
        "train into an existing model",
        ["train", "in.zarr", "m16.safetensors", "--patch", "16,16,16"],
        "m16.safetensors",
        "--overwrite to replace it",
    ),
    (
        "model inside the input",
        ["train", "in.zarr", "in.zarr/m.safetensors", "--patch", "16,16,16"],
        "in.zarr/m.safetensors",
        "inside the input",
    ),
]


@pytest.mark.parametrize(
    ("argv", "subject", "words"), [c[1:] for c in FAULTS], ids=[c[0] for c in FAULTS]
)
def test_fault_is_one_clear_sentence_and_writes_nothing(
    faults, monkeypatch, capsys, argv, subject, words
):
    monkeypatch.chdir(faults)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    if "m16.safetensors.d" in argv:  # a plain folder with someone's data
        (faults / "m16.safetensors.d").mkdir(exist_ok=True)
        (faults / "m16.safetensors.d" / "notes.txt").write_text("keep me")
    before = digests(faults)
    extra = (
        ["--dashboard-address", ":0"]
        if argv[0] != "train" and "--dashboard-address" not in argv
        else []
    )

    code, out, err = run_cli(capsys, *argv, *extra)

    assert_one_clear_sentence(code, out, err, subject=subject, words=words)
    assert digests(faults) == before  # nothing written, nothing removed, inputs unchanged


@pytest.mark.parametrize(
    ("option", "value", "choices"),
    [("--dtype", "int8", "'float32', 'input'"), ("--autocast", "maybe", "'auto', 'on', 'off'")],
)
def test_bad_choices_are_refused_with_the_choices(
    faults, monkeypatch, capsys, option, value, choices
):
    monkeypatch.chdir(faults)
    before = digests(faults)
    code, out, err = run_cli(capsys, "predict", "in.zarr", "out.zarr", *MODEL, option, value)
    assert code == 2
    assert f"Invalid value for '{option}'" in err and choices in err
    assert "Traceback" not in err + out
    assert digests(faults) == before


def test_missing_chunks_are_listed_by_info_and_allowed_on_request(faults, monkeypatch, capsys):
    monkeypatch.chdir(faults)
    code, out, _ = run_cli(capsys, "info", "missing.zarr")
    assert code == 0
    assert "missing    1 of the 2 chunks is missing (at t=16:32, y=0:32, x=0:32)" in out
    assert "--allow-missing-chunks" in out
    code, out, _ = run_cli(capsys, "info", "in.zarr")
    assert code == 0 and "missing" not in out

    # Allowed: a warning before any work (here the run then stops at the absent GPU).
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    before = digests(faults)
    code, _, err = run_cli(
        capsys,
        "predict",
        "missing.zarr",
        "out.zarr",
        *MODEL,
        "--allow-missing-chunks",
        "--gpus",
        "0",
    )
    lines = err.strip().splitlines()
    assert code == 2
    assert lines[0].startswith("srdvol: warning: missing.zarr/s0: 1 of the 2 chunks is missing")
    assert "read" in lines[0] and "fill value 0" in lines[0]
    assert lines[-1].startswith("srdvol: error: --gpus 0")
    assert digests(faults) == before


def test_input_far_from_the_training_data_warns_with_both_figures(faults, monkeypatch, capsys):
    monkeypatch.chdir(faults)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    code, _, err = run_cli(capsys, "predict", "bright.zarr", "out.zarr", *MODEL, "--gpus", "0")
    warning = err.strip().splitlines()[0]
    assert code == 2  # then stopped by the absent GPU, before anything was written
    assert warning.startswith("srdvol: warning: bright.zarr: the input's intensities (mean ")
    assert "from the model's training data (mean " in warning and "retrain" in warning
    assert "--renormalize" in warning  # the other choice, as a flag
    code, _, err = run_cli(
        capsys, "predict", "bright.zarr", "out.zarr", *MODEL, "--renormalize", "--gpus", "0"
    )
    note = err.strip().splitlines()[0]
    assert code == 2 and "warning" not in err
    assert note.startswith("srdvol: normalising bright.zarr with its own statistics (mean ")
    code, _, err = run_cli(capsys, "predict", "in.zarr", "out.zarr", *MODEL, "--gpus", "0")
    assert "warning" not in err  # the training data itself is not far from itself


# ---------------------------------------------------------------------------------------------
# the output lock


def test_an_output_held_by_a_live_run_is_refused_naming_it(faults, monkeypatch, capsys):
    monkeypatch.chdir(faults)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    lock = Path(lock_path(faults / "held.zarr"))
    try:
        import psutil

        record = {
            "host": socket.gethostname(),
            "pid": holder.pid,
            "process_started": psutil.Process(holder.pid).create_time(),
            "started": "2026-01-01T00:00:00+00:00",
            "token": "other",
        }
        lock.write_text(json.dumps(record))
        before = digests(faults)
        code, _, err = run_cli(
            capsys, "predict", "in.zarr", "held.zarr", *MODEL, "--dashboard-address", ":0"
        )
        message = err.strip()
        assert code == 2 and message.count("\n") == 0
        assert message.startswith("srdvol: error: held.zarr: another srdvol run holds this output")
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert str(lock) in message and "delete the lock file" in message
        assert digests(faults) == before  # the other run's lock is left alone
    finally:
        holder.kill()
        holder.wait()
        lock.unlink(missing_ok=True)


def test_a_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(faults, monkeypatch, capsys):
    """Two identical runs: the second says who holds the output. The first is then killed
    (SIGKILL leaves its lock behind); a third run takes the stale lock over with a note and
    writes the same output as an uninterrupted run."""
    from srdvol.predict.block import predict_array
    from srdvol.predict.predictors import ModelPredictor

    monkeypatch.chdir(faults)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    out = faults / "twice.zarr"
    lock = Path(lock_path(out))
    argv = ["predict", "in.zarr", "twice.zarr", *MODEL, "--dashboard-address", ":0"]
    first = subprocess.Popen(
        [sys.executable, "-m", "srdvol.app.cli", *argv, "--workers", "1"],
        cwd=faults,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the kill takes its workers too
    )
    try:
        deadline = time.monotonic() + 120
        while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lock.exists(), first.communicate()
        os.killpg(first.pid, signal.SIGSTOP)  # it holds the output: keep it there meanwhile
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and err.count("\n") == 1, err
        assert f"another srdvol run holds this output (pid {first.pid} on host" in err
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        assert lock.exists()  # a killed run cannot clean up

        code, _, err = run_cli(capsys, *argv, "--workers", "1")
        assert code == 0, err
        note = "srdvol: note: twice.zarr: took over the lock of a run that is no longer running"
        assert f"{note} (pid {first.pid} on host" in err
        assert not lock.exists()
        data = zarr.open_array(faults / "in.zarr" / "s0", mode="r")[...]
        expected = predict_array(
            data,
            ModelPredictor(faults / "m16.safetensors", device="cpu", anchor=DEFAULT_ANCHOR),
            patch=(16, 16, 16),
        )
        written = zarr.open_array(out / "s0", mode="r")[...]
        np.testing.assert_allclose(written, expected, rtol=1e-5, atol=1e-3)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        lock.unlink(missing_ok=True)
        shutil.rmtree(out, ignore_errors=True)


def test_nan_in_a_frame_of_the_guide_mean_image_is_named_as_input(
    faults, tmp_path, monkeypatch, capsys
):
    """With --guide every block depends on the mean image, which a NaN in any averaged frame
    spoils: whichever block meets it first says the input holds NaN, never that the model's
    output does (which would send the user to retrain)."""
    import functools

    from srdvol.core import normalize

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    values = zarr.open_array(faults / "in.zarr" / "s0", mode="r")[...].astype("float32")
    values = np.concatenate([values, values[::-1]])  # 64 frames: 4 blocks of 16
    values[60, 5, 5] = np.nan
    zarr.create_array("nan.zarr", data=values, chunks=(16, 32, 32))
    one_chunk = 8 * 16 * 32 * 32  # the statistics sample misses the NaN (see above)
    sample = functools.partial(normalize.sample_statistics, max_bytes=one_chunk)
    monkeypatch.setattr(normalize, "sample_statistics", sample)
    argv = ["predict", "nan.zarr", "out.zarr", "--axes", "tyx", "--guide", "2"]
    argv += ["--model", str(faults / "m16.safetensors"), "--block", "16,32,32"]
    code, _, err = run_cli(capsys, *argv, "--workers", "1", "--dashboard-address", ":0")
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("srdvol: ")]
    assert len(lines) == 1, err
    assert "the input holds NaN or Inf values" in lines[0] and "retrain" not in lines[0], err
    assert "replace them" in lines[0], err


def _recorded_blocks(out: Path) -> set[int]:
    """Blocks the output's ledger records as finished."""
    from srdvol.dask.graph import Ledger

    path = out / "s0" / ".srdvol-ledger.json"
    stored = json.loads(path.read_text())
    book = Ledger(path, nblocks=stored["grid"], fingerprint=stored["fingerprint"])
    return {i for i in range(int(np.prod(stored["grid"]))) if book.is_done(i)}


def test_nan_outside_the_statistics_sample_stops_at_its_block_and_keeps_what_was_written(
    faults, tmp_path, monkeypatch, capsys
):
    """A NaN in a chunk the statistics sample does not read is met while blocks are written.
    Stated (README, Errors) and checked here: exit 2 and one sentence naming the input, the
    block and the fix; OUT keeps its metadata and the blocks finished before (recorded in its
    ledger, already holding their final values); the block with the NaN is not written and the
    lock is released. Once the value is replaced in place, the same command computes only the
    rest and ends equal to a run on the clean input."""
    import functools

    from srdvol.core import normalize
    from srdvol.errors import DataError
    from srdvol.ngff.read import open_image

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    clean = zarr.open_array(faults / "in.zarr" / "s0", mode="r")[...].astype("float32")
    clean = np.concatenate([clean, clean[::-1]])  # 64 frames: 4 blocks of 16
    values = clean.copy()
    values[60, 5, 5] = np.nan  # in the last 16 frames
    source = zarr.create_array("nan.zarr", data=values, chunks=(16, 32, 32))
    zarr.create_array("clean.zarr", data=clean, chunks=(16, 32, 32))

    # A sample of one chunk (the first): the NaN is outside it, where the default sample of
    # this small image (every chunk) would have found it before anything was written.
    one_chunk = 8 * 16 * 32 * 32
    sample = normalize.sample_statistics
    image = open_image("nan.zarr", axes="tyx")
    sample(image, max_bytes=one_chunk)
    with pytest.raises(DataError, match="NaN or Inf"):
        sample(image)
    monkeypatch.setattr(
        normalize, "sample_statistics", functools.partial(sample, max_bytes=one_chunk)
    )

    model = str(faults / "m16.safetensors")
    argv = ["predict", "nan.zarr", "out.zarr", "--axes", "tyx", "--model", model]
    argv += ["--block", "16,32,32", "--workers", "1", "--dashboard-address", ":0"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("srdvol: ")]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err
    found = re.fullmatch(
        r"srdvol: error: nan\.zarr, block \((\d), 0, 0\) \(t=(\d+):(\d+), y=0:32, x=0:32\): "
        r"the input holds NaN or Inf values; replace them \(e\.g\. with the local median\) in "
        r"place and run the same command again: it keeps the blocks already written to "
        r"out\.zarr and computes the rest\.",
        lines[0],
    )
    assert found, lines[0]
    block, start, stop = map(int, found.groups())
    assert (start, stop) == (16 * block, 16 * block + 16) and start - 16 < 60 < stop + 16

    out = tmp_path / "out.zarr"
    assert not Path(lock_path(out)).exists()  # the lock is released
    assert (out / "s0" / "zarr.json").exists()
    kept = _recorded_blocks(out)
    assert kept and block not in kept and max(kept) < block  # the blocks before it
    stopped = zarr.open_array(out / "s0", mode="r")[...]
    fill = zarr.open_array(out / "s0", mode="r").fill_value
    unwritten = stopped[start:stop]
    assert np.all(unwritten == fill) or (np.isnan(fill) and np.isnan(unwritten).all())

    source[60, 5, 5] = clean[60, 5, 5]  # the fix the message asks for, in place
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert f"{4 - len(kept)} block(s) computed, {len(kept)} already done" in err
    argv_fresh = [("clean.zarr" if a == "nan.zarr" else a) for a in argv]
    argv_fresh[argv_fresh.index("out.zarr")] = "fresh.zarr"
    code, _, err = run_cli(capsys, *argv_fresh)
    assert code == 0, err
    resumed, whole = zarr.open_group(out, mode="r"), zarr.open_group("fresh.zarr", mode="r")
    assert sorted(resumed.array_keys()) == sorted(whole.array_keys())
    for level in whole.array_keys():  # every level the run wrote
        np.testing.assert_array_equal(resumed[level][...], whole[level][...])
    fresh = zarr.open_array(tmp_path / "fresh.zarr" / "s0", mode="r")[...]
    for b in kept:  # the kept blocks held their final values already
        np.testing.assert_array_equal(stopped[16 * b : 16 * b + 16], fresh[16 * b : 16 * b + 16])


# ---------------------------------------------------------------------------------------------
# read-only and full file systems: a real tmpfs in a private mount namespace


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


# One private mount namespace holds every case: ro/ (read-only), small/ (32 KiB) and full/
# (48 KiB) are fresh tmpfs mounts; the driver runs each srdvol command in one process (one
# interpreter start for all of them) and reports each one's exit code and stderr.
_DRIVER = """
import contextlib, io, json, pathlib, sys
import srdvol.ngff.storecheck as storecheck
from srdvol.app.cli import main

results = []
for case in json.loads(sys.argv[1]):
    storecheck.MIN_FREE_FRACTION = case.get("min_free", 0.5)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(case["argv"])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    folder = pathlib.Path(case.get("list", "."))
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if "list" in case else []
    results.append({"code": code, "err": err.getvalue(), "files": files})
print(json.dumps(results))
"""

NAMESPACE_CASES = {
    "read-only predict": {"argv": ["predict", "in.zarr", "ro/out.zarr", *MODEL]},
    "read-only train": {
        "argv": ["train", "in.zarr", "ro/m.safetensors", "--patch", "16,16,16", "--steps", "1"]
    },
    "too little space": {"argv": ["predict", "in.zarr", "small/out.zarr", *MODEL]},
    # The up-front check is switched off (as if another job filled the disk after it), so the
    # workers meet a real ENOSPC while writing chunks.
    "disk fills up": {
        "argv": ["predict", "in.zarr", "full/out.zarr", *MODEL, "--dashboard-address", ":0"],
        "min_free": 0.0,
        "list": "full",
    },
}


@pytest.fixture(scope="module")
def in_namespace(faults, tmp_path_factory):
    """Run NAMESPACE_CASES with the tmpfs mounts; yield ``(results by case, whole stderr)``
    and the digests of the fault stores before the run."""
    if not _can_mount():
        pytest.skip("needs unshare and user namespaces to mount a tmpfs")
    driver = tmp_path_factory.mktemp("driver") / "driver.py"
    driver.write_text(_DRIVER)
    # full/: the output's metadata fits (a few 4 KiB pages), its first 64 KiB chunk does not
    mounts = {"ro": "ro", "small": "size=32k", "full": "size=48k"}
    for name in mounts:
        (faults / name).mkdir()
    before = digests(faults)
    command = " && ".join(f"mount -t tmpfs -o {o} tmpfs {n}" for n, o in mounts.items())
    cases = json.dumps(list(NAMESPACE_CASES.values()))
    result = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            f'{command} && exec "$0" "$1" "$2"',
            sys.executable,
            str(driver),
            cases,
        ],
        cwd=faults,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "400"},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr
    results = dict(zip(NAMESPACE_CASES, json.loads(result.stdout.splitlines()[-1]), strict=True))
    after = digests(faults)
    for name in mounts:
        (faults / name).rmdir()  # empty again outside the namespace
    yield results, result.stderr, before, after


@pytest.mark.parametrize(
    ("case", "subject", "words"),
    [
        ("read-only predict", "ro/out.zarr", "read-only file system"),
        ("read-only train", "ro/m.safetensors", "read-only file system"),
        ("too little space", "small/out.zarr", "the disk has 32.0 KiB free"),
    ],
)
def test_unwritable_or_full_locations_are_found_before_any_work(in_namespace, case, subject, words):
    results, _, before, after = in_namespace
    message = results[case]["err"].strip()
    assert results[case]["code"] == 2, message
    assert message.count("\n") == 0, message
    named = message.removeprefix("srdvol: error: ").split(": ")[0]
    assert message.startswith("srdvol: error: ") and named.endswith(subject), message
    assert words in message and "Traceback" not in message
    assert after == before  # nothing written next to the mounts, inputs unchanged


def test_a_disk_that_fills_up_during_the_run_is_one_sentence(in_namespace):
    results, stderr, before, after = in_namespace
    lines = results["disk fills up"]["err"].strip().splitlines()
    assert results["disk fills up"]["code"] == 2, lines
    assert lines[-1].startswith("srdvol: error: full/out.zarr: the disk filled up"), lines
    assert "run the same command again to resume" in lines[-1]
    files = results["disk fills up"]["files"]
    assert "out.zarr/s0/zarr.json" in files  # it failed writing blocks, after the metadata
    assert "out.zarr.srdvol-lock" not in files  # and let go of the output
    # the workers' own logs reach the real stderr: no traceback there either
    assert "Traceback" not in stderr and "Compute Failed" not in stderr, stderr
    assert after == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_folder_without_write_permission_is_found_before_any_work(faults, monkeypatch, capsys):
    monkeypatch.chdir(faults)
    folder = faults / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, _, err = run_cli(capsys, "predict", "in.zarr", "locked/out.zarr", *MODEL)
        assert code == 2 and "permission denied" in err and err.count("\n") == 1
    finally:
        folder.chmod(0o755)
        folder.rmdir()


def test_address_checks_accept_every_documented_form():
    from srdvol.dask.cluster import check_addresses
    from srdvol.errors import ConfigError

    for scheduler in ("tcp://127.0.0.1:8786", "tls://node-1:8786", "127.0.0.1:8786", "s.json"):
        check_addresses(scheduler=scheduler)
    for dashboard in (":8787", ":0", "127.0.0.1:8787", "localhost:0", "[::1]:8787"):
        check_addresses(dashboard_address=dashboard)
    for bad in ({"scheduler": "tcp://host:99999"}, {"dashboard_address": "8787"}):
        with pytest.raises(ConfigError):
            check_addresses(**bad)
    with pytest.raises(ConfigError, match=r"the host 'no-such-host.invalid' .* is not known"):
        check_addresses(dashboard_address="no-such-host.invalid:8787")
