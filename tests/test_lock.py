"""Tests for srdvol.ngff.lock: one run per output, who holds it, stale locks, URLs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import psutil
import pytest

from srdvol.errors import OutputLockedError, OutputPathError
from srdvol.ngff.lock import hold, lock_path, read_lock


@pytest.fixture
def sleeper():
    """A live process on this host that is not this one."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield child
    child.kill()
    child.wait()


def _finished_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write(path: str, **record) -> None:
    Path(path).write_text(json.dumps(record))


def test_the_lock_names_this_run_and_goes_away(tmp_path):
    out = tmp_path / "out.zarr"
    with hold(out) as path:
        assert path == str(out) + ".srdvol-lock"
        record = read_lock(path)
        assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
        assert record["process_started"] == pytest.approx(psutil.Process().create_time())
        assert record["started"].endswith("+00:00") and record["token"]
        with hold(out):  # re-entrant: denoise holds it, its predict step takes it again
            assert read_lock(path) == record
        assert read_lock(path) == record
    assert sorted(os.listdir(tmp_path)) == []  # no lock, no temporary file


def test_a_live_run_keeps_its_lock(tmp_path, sleeper):
    out = tmp_path / "out.zarr"
    path = lock_path(out)
    started = psutil.Process(sleeper.pid).create_time()
    _write(path, host=socket.gethostname(), pid=sleeper.pid, process_started=started, token="a")
    before = Path(path).read_text()
    with pytest.raises(OutputLockedError) as caught:
        with hold(out):
            pass
    message = str(caught.value)
    assert message.startswith(f"{out}: another srdvol run holds this output (pid {sleeper.pid}")
    assert path in message and "delete the lock file" in message
    assert Path(path).read_text() == before


def test_stale_locks_are_taken_over_with_a_note(tmp_path, sleeper):
    out = tmp_path / "out.zarr"
    path = lock_path(out)
    notes: list[str] = []
    dead = _finished_pid()
    _write(path, host=socket.gethostname(), pid=dead, token="gone")
    with hold(out, note=notes.append):
        assert read_lock(path)["pid"] == os.getpid()
    assert len(notes) == 1 and f"pid {dead} on host {socket.gethostname()}" in notes[0]
    assert not os.path.exists(path)
    # a pid that runs again, but a process started later than the lock's: reused, so stale
    _write(path, host=socket.gethostname(), pid=sleeper.pid, process_started=1.0, token="old")
    with hold(out, note=notes.append):
        pass
    assert len(notes) == 2


def test_a_lock_from_another_host_is_never_taken(tmp_path):
    out = tmp_path / "out.zarr"
    path = lock_path(out)
    _write(path, host="some-other-node", pid=_finished_pid(), started="yesterday", token="x")
    with pytest.raises(OutputLockedError, match=r"on host some-other-node, started yesterday"):
        with hold(out):
            pass
    assert read_lock(path)["host"] == "some-other-node"


def test_a_lock_is_only_removed_by_its_owner(tmp_path):
    out = tmp_path / "out.zarr"
    with hold(out) as path:
        _write(path, host="elsewhere", pid=1, token="someone else took it over")
    assert read_lock(path)["token"] == "someone else took it over"


def test_missing_folders_are_made_and_removed_again(tmp_path):
    out = tmp_path / "a" / "b" / "out.zarr"
    with hold(out):
        assert (tmp_path / "a" / "b").is_dir()
    assert os.listdir(tmp_path) == []
    with hold(out):
        (tmp_path / "a" / "b" / "out.zarr").mkdir()  # the run wrote its output: kept
    assert (tmp_path / "a" / "b" / "out.zarr").is_dir()


def test_an_unwritable_location_is_one_sentence(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(
        OutputPathError, match=r"the lock file .* cannot be written \(Not a directory\)"
    ):
        with hold(blocker / "out.zarr"):
            pass


def test_fsspec_urls_hold_a_lock_object():
    out = f"memory://locks-{uuid.uuid4().hex}/out.zarr"
    fs = fsspec.filesystem("memory")
    with hold(out) as path:
        assert path == out + ".srdvol-lock"
        assert read_lock(path)["pid"] == os.getpid()
        other = {"host": "node-7", "pid": 4, "token": "t"}
        fs.pipe_file(path.removeprefix("memory://") + ".copy", json.dumps(other).encode())
    assert not fs.exists(path.removeprefix("memory://"))
    fs.mv(path.removeprefix("memory://") + ".copy", path.removeprefix("memory://"))
    with pytest.raises(OutputLockedError, match="pid 4 on host node-7"):
        with hold(out):
            pass
    fs.rm_file(path.removeprefix("memory://"))


def test_a_lock_that_cannot_be_removed_does_not_hide_the_runs_own_error(monkeypatch):
    """The store went away mid-run: the run's error is what the user sees; after a run that
    finished, a note names the lock left behind (the next run on this host takes it over)."""
    import srdvol.ngff.lock as lock

    def unreachable(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    folder = f"memory://locks-{uuid.uuid4().hex}"
    monkeypatch.setattr(lock, "_release", unreachable)
    notes: list[str] = []
    with (
        pytest.raises(OSError, match="the disk filled up"),
        hold(f"{folder}/failed.zarr", note=notes.append),
    ):
        raise OSError("the disk filled up")
    assert not notes
    with hold(f"{folder}/done.zarr", note=notes.append) as path:
        pass
    assert notes == [
        f"srdvol: note: {folder}/done.zarr: the lock file {path} could not be removed "
        "(ConnectionRefusedError: [Errno 111] Connection refused); the next run takes it over"
    ]
    fsspec.filesystem("memory").rm(folder.removeprefix("memory://"), recursive=True)
