"""Tests of srdvol.dask.cluster, workers and gpus with real worker processes (1-2 of them)."""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request
from collections.abc import Callable

import pytest
from distributed import Client, LocalCluster

from srdvol.dask.cluster import cpu_worker_spec, dashboard_link, gpu_worker_spec, open_cluster
from srdvol.dask.gpus import resolve_gpus, visible_gpus
from srdvol.errors import ClusterError, ConfigError, GPUUnavailableError, StoreNotFoundError
from srdvol.options import parse_gpus


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _slow_square(x: int) -> int:
    time.sleep(1.5)
    return x * x


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------ GPU detection

UUID_A = "GPU-8f3c1a2b-0d4e-5f60-7182-93a4b5c6d7e8"
UUID_B = "GPU-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"
MIG = "MIG-4b7e2f10-1c2d-5e3f-8a9b-0c1d2e3f4a5b"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ("2,3", ["2", "3"]),
        ("0", ["0"]),
        (" 5 , 7 ", ["5", "7"]),
        ("", []),
        ("-1", []),
        ("1,-1,2", ["1"]),  # CUDA stops at the first invalid entry
        (f"{UUID_A},{UUID_B}", [UUID_A, UUID_B]),  # kept as written, not turned into 0, 1
        (f"{MIG},3", [MIG, "3"]),
        (f"{UUID_A},nonsense,{UUID_B}", [UUID_A]),
    ],
)
def test_visible_gpus_keeps_cuda_visible_devices_entries(monkeypatch, env, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    assert visible_gpus() == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),
        ("auto", "auto"),
        ("ALL", "all"),
        ("none", "none"),
        ("0,2", [0, 2]),
        (f"{UUID_B}, 1", [UUID_B, 1]),
    ],
)
def test_parse_gpus_reads_the_option(text, expected):
    assert parse_gpus(text) == expected


@pytest.mark.parametrize("text", ["", "gpu0", "-1", "0,x", "GPU-", "0,,1"])
def test_parse_gpus_rejects_nonsense(text):
    with pytest.raises(ConfigError, match=r"^gpus: ") as info:
        parse_gpus(text)
    assert "GPU-<uuid>" in str(info.value)  # the fix names both forms
    assert info.value.command_line_message().startswith("--gpus: ")


@pytest.mark.parametrize(
    ("env", "gpus", "expected"),
    [
        ("5,7", None, ["5", "7"]),
        ("5,7", "all", ["5", "7"]),
        ("5,7", [1], ["7"]),  # a position in the visible list, not physical device 1
        ("5,7", [1, 0], ["7", "5"]),
        (f"{UUID_A},{UUID_B}", [1], [UUID_B]),
        (f"{UUID_A},{UUID_B}", [UUID_B], [UUID_B]),
        (f"{UUID_A},{UUID_B}", "auto", [UUID_A, UUID_B]),
        ("5,7", "none", []),
    ],
)
def test_resolve_gpus_maps_positions_and_ids_to_visible_devices(monkeypatch, env, gpus, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    assert resolve_gpus(gpus) == expected


@pytest.mark.parametrize(
    ("env", "gpus", "error", "match"),
    [
        (
            "5,7",
            [5],
            GPUUnavailableError,
            r"GPU 5 is not visible \(visible GPUs by position: "
            r"0: 5, 1: 7\)",
        ),
        (f"{UUID_A}", [UUID_B], GPUUnavailableError, "0: GPU-8f3c"),
        ("5,7", [1, 1], ConfigError, "twice"),
        (f"{UUID_A},{UUID_B}", [0, UUID_A], ConfigError, "twice"),
    ],
)
def test_resolve_gpus_refuses_invisible_or_repeated_gpus(monkeypatch, env, gpus, error, match):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    with pytest.raises(error, match=match) as info:
        resolve_gpus(gpus)
    assert str(info.value).startswith("gpus ")
    assert info.value.command_line_message().startswith("--gpus ")


# ------------------------------------------------------------------------------ worker specs


def test_gpu_worker_spec_pins_one_device_per_worker():
    spec = gpu_worker_spec(["0", 3, UUID_A], memory_limit="1GB", threads=2)
    assert sorted(spec) == sorted(["gpu-0", "gpu-3", f"gpu-{UUID_A}"])
    for gpu in ("0", "3", UUID_A):
        options = spec[f"gpu-{gpu}"]["options"]
        assert options["env"]["CUDA_VISIBLE_DEVICES"] == gpu
        assert options["resources"] == {"GPU": 1}
        assert options["nthreads"] == 1
        assert options["memory_limit"] == "1GB"
        assert options["env"]["OMP_NUM_THREADS"] == "2"


def test_gpu_worker_spec_refuses_repeated_ids():
    with pytest.raises(ConfigError, match="repeat"):
        gpu_worker_spec([1, "1"])


def test_cpu_worker_spec_sets_threads_and_names():
    spec = cpu_worker_spec(3, threads=2)
    assert sorted(spec) == ["cpu-0", "cpu-1", "cpu-2"]
    assert all(s["options"]["env"]["OMP_NUM_THREADS"] == "2" for s in spec.values())
    assert all("resources" not in s["options"] for s in spec.values())
    with pytest.raises(ConfigError, match=r"^workers: "):
        cpu_worker_spec(0)


def _gpu_worker_state() -> dict[str, object]:
    import sys

    import torch

    return {
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "torch_imported": "torch" in sys.modules,  # the thread plugin ran
        "cuda_initialized": torch.cuda.is_initialized(),
    }


@pytest.mark.parametrize("visible", [["5", "7"], [UUID_A, UUID_B]], ids=["indices", "uuids"])
def test_open_cluster_pins_each_gpu_worker_to_its_own_device(monkeypatch, visible):
    # The GPU path needs no GPU: pinning is environment variables and resources only, and
    # nothing initialises CUDA while a worker starts.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(visible))
    with open_cluster(dashboard_address=None, memory_limit="1GB") as client:
        client.wait_for_workers(2, timeout=60)
        info = client.scheduler_info(n_workers=-1)["workers"]
        states = client.run(_gpu_worker_state)
        assert sorted(states) == sorted(info)
        seen = []
        for address, worker in info.items():
            state = states[address]
            assert worker["resources"] == {"GPU": 1}
            assert worker["nthreads"] == 1
            assert worker["name"] == f"gpu-{state['CUDA_VISIBLE_DEVICES']}"
            assert state["torch_imported"] and not state["cuda_initialized"]
            seen.append(state["CUDA_VISIBLE_DEVICES"])
        assert sorted(seen) == sorted(visible)  # each worker its own device, as written
        # a GPU task lands only on workers that advertise the resource
        future = client.submit(_gpu_worker_state, resources={"GPU": 1}, pure=False)
        assert future.result(timeout=60)["CUDA_VISIBLE_DEVICES"] in visible


# ------------------------------------------------------------------------------ open_cluster


@pytest.mark.parametrize("gpus", [[0], "all", [0, 1]])
def test_open_cluster_without_gpus_refuses_gpu_request(monkeypatch, gpus):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the same answer on a machine with GPUs
    with pytest.raises(GPUUnavailableError) as info, open_cluster(gpus=gpus):
        pytest.fail("a cluster was started")
    message = info.value.command_line_message()
    assert message.startswith("--gpus")
    assert "not visible" in message or "no GPU" in message
    assert "without --gpus" in message


def test_open_cluster_rejects_zero_workers():
    with pytest.raises(ConfigError, match=r"^workers: "), open_cluster(gpus="none", workers=0):
        pytest.fail("a cluster was started")


def test_cpu_cluster_sets_torch_threads_and_serves_dashboard(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with open_cluster(workers=2, threads_per_worker=2, dashboard_address=":0") as client:
        client.wait_for_workers(2, timeout=60)
        threads = client.run(_torch_threads)
        assert list(threads.values()) == [2, 2]
        # tasks run on the worker's executor thread, not the event loop: check there too
        assert client.submit(_torch_threads, pure=False).result(timeout=60) == 2

        link = dashboard_link(client)
        assert link is not None
        assert link.startswith("http://127.0.0.1:")
        assert link.endswith("/status")
        assert not link.startswith("http://127.0.0.1:8787/")  # ":0" picked a free port
        running = client.map(_slow_square, [2, 3], pure=False)
        with urllib.request.urlopen(link, timeout=30) as response:
            assert response.status == 200
            assert b"<html" in response.read(2000).lower()
        assert client.gather(running) == [4, 9]


def _malloc_trim() -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_cluster_without_dashboard_reports_none(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with open_cluster(workers=1, threads_per_worker=1, dashboard_address=None) as client:
        assert dashboard_link(client) is None
        assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
        # distributed's default (64 KiB) halves CPU training speed; srdvol's workers drop it
        assert list(client.run(_malloc_trim).values()) == [None]


def test_attach_to_running_scheduler():
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        with open_cluster(scheduler=cluster.scheduler_address) as client:
            assert client.submit(pow, 3, 4).result(timeout=60) == 81
            assert client.scheduler.address == cluster.scheduler_address
            assert dashboard_link(client) == cluster.dashboard_link
        # closing the attached client leaves the user's cluster running
        with Client(cluster.scheduler_address, timeout=10) as again:
            assert again.submit(pow, 2, 5).result(timeout=60) == 32


def test_attach_to_unreachable_scheduler_fails_fast():
    address = f"tcp://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(ClusterError) as info, open_cluster(scheduler=address, timeout=2):
        pytest.fail("connected to nothing")
    assert time.monotonic() - start < 15
    message = info.value.command_line_message()
    assert message.startswith(address)
    assert "no Dask scheduler answered" in message
    assert "--scheduler" in message
    assert isinstance(info.value, ConnectionError)


def test_attach_to_missing_scheduler_file(tmp_path):
    path = tmp_path / "scheduler.json"
    with pytest.raises(ClusterError, match="does not exist"), open_cluster(scheduler=str(path)):
        pytest.fail("connected to nothing")


# ------------------------------------------------------------------------------ ModelPlugin


def _cached_models() -> list[str]:
    from srdvol.predict import predictors as predict

    return sorted(str(key[0]) for key in predict._CACHE)


def _predict_with(model_path: str):
    import numpy as np

    from srdvol.predict import predictors as predict

    before = len(predict._CACHE)
    patches = np.full((1, 16, 8, 8), 100.0, dtype=np.float32)
    out = predict.ModelPredictor(model_path, device="cpu")(patches)
    return before, len(predict._CACHE), out.shape


def test_model_plugin_loads_the_model_once_per_worker(monkeypatch, tmp_path):
    import torch

    from srdvol.dask.workers import ModelPlugin
    from srdvol.model.checkpoint import ModelRecord, Normalization, save_model
    from srdvol.model.config import NetworkConfig
    from srdvol.model.network import build_network

    config = NetworkConfig.tiny(16)
    torch.manual_seed(0)
    path = tmp_path / "tiny.srdvol"
    record = ModelRecord(
        network=config,
        patch=(16, 8, 8),
        sampling="spatial",
        normalization=Normalization(mean=100.0, std=10.0),
    )
    save_model(path, build_network(config), record)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with open_cluster(workers=2, threads_per_worker=1, dashboard_address=None) as client:
        client.wait_for_workers(2, timeout=60)
        assert list(client.run(_cached_models).values()) == [[], []]
        client.register_plugin(ModelPlugin(path, device="cpu", threads=1))
        # loaded on every worker before any task asked for it
        expected = [str(path.resolve())]
        assert list(client.run(_cached_models).values()) == [expected, expected]
        # a task finds it in the cache and adds nothing
        assert client.submit(_predict_with, str(path), pure=False).result(timeout=120) == (
            1,
            1,
            (1, 16, 8, 8),
        )
        # a missing file fails at registration, with srdvol's message, not in the first task
        with pytest.raises(StoreNotFoundError, match="does not exist"):
            client.register_plugin(ModelPlugin(tmp_path / "missing.srdvol", device="cpu"))


# ------------------------------------------------------------------------------ safe defaults


def _listening(port: int) -> set[str]:
    import psutil

    return {
        c.laddr.ip
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


def test_local_cluster_listens_on_loopback_by_default(monkeypatch):
    from urllib.parse import urlparse

    from srdvol.dask.workers import live_workers
    from srdvol.options import DEFAULT_DASHBOARD_ADDRESS

    assert DEFAULT_DASHBOARD_ADDRESS == "127.0.0.1:8787"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with open_cluster(workers=1, threads_per_worker=1) as client:  # every default
        scheduler = urlparse(client.scheduler.address)
        dashboard = urlparse(dashboard_link(client))
        assert scheduler.hostname == dashboard.hostname == "127.0.0.1"
        # the scheduler and its dashboard run in this process: what do their sockets bind?
        assert _listening(scheduler.port) == {"127.0.0.1"}
        assert _listening(dashboard.port) == {"127.0.0.1"}  # not 0.0.0.0 / every interface
        assert all(a.startswith("tcp://127.0.0.1:") for a in live_workers(client))


# ------------------------------------------------------------------------------ which workers live


def test_live_workers_asks_the_scheduler_not_the_clients_cache(monkeypatch):
    from distributed.client import SchedulerInfo

    from srdvol.dask.workers import live_workers

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        address = next(iter(cluster.scheduler.workers))
        empty = SchedulerInfo({**dict(client.scheduler_info()), "workers": {}})
        client._scheduler_identity = empty  # what the client's 2 s refresh can leave there
        monkeypatch.setattr(client, "scheduler_info", lambda *args, **kwargs: empty)
        assert client.scheduler_info()["workers"] == {}
        workers = live_workers(client)
        assert list(workers) == [address]
        assert workers[address]["nthreads"] == 1


def test_a_worker_is_lost_only_when_two_answers_apart_lack_it():
    from srdvol.dask.workers import WorkerWatch

    now = [0.0]
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        alive = next(iter(cluster.scheduler.workers))
        gone = "tcp://127.0.0.1:9"  # never a worker of this cluster
        watch = WorkerWatch(client, [alive, gone], confirm=3.0, every=0.0, clock=lambda: now[0])
        assert watch.lost() == []  # one missing sighting is a suspicion only
        assert watch.suspects == [gone]
        now[0] = 2.0
        assert watch.lost() == []
        now[0] = 3.5
        assert watch.lost() == [gone]  # absent from answers 3.5 s apart: confirmed
        assert alive not in watch.lost()


# ------------------------------------------------------------------------------ dashboard noise


def _closed_page_record():
    """The record tornado logs when bokeh's websocket on_close meets a detached session: made
    by bokeh's own code (a browser closing a dashboard tab triggers the same)."""
    import logging
    import sys

    from bokeh.server.connection import ServerConnection
    from bokeh.server.views.ws import WSHandler

    connection = ServerConnection.__new__(ServerConnection)
    connection._session = None  # detached, as after client_lost
    handler = WSHandler.__new__(WSHandler)
    handler.connection = connection
    handler.close_code, handler.close_reason = 1001, None
    try:
        WSHandler.on_close(handler)
    except AssertionError:
        exc_info = sys.exc_info()
    else:
        pytest.fail("bokeh no longer fails there; the filter may be dropped")
    return logging.LogRecord(
        "tornado.application",
        logging.ERROR,
        __file__,
        1,
        "Uncaught exception GET %s",
        ("/status/ws",),
        exc_info,
    )


def test_a_closed_dashboard_page_prints_no_traceback(capsys):
    import logging

    from srdvol.dask.cluster import quiet_dashboard_noise

    logger = logging.getLogger("tornado.application")
    quiet_dashboard_noise()
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        logger.handle(_closed_page_record())
        assert seen == []  # bokeh's closed-page AssertionError is dropped
        try:
            raise AssertionError("a real bug")
        except AssertionError:
            logger.exception("Uncaught exception GET /other")
        logger.error("something else went wrong")
        assert [r.getMessage() for r in seen] == [
            "Uncaught exception GET /other",
            "something else went wrong",
        ]
    finally:
        logger.removeHandler(handler)


def test_a_dashboard_port_in_use_is_said_in_the_dashboard_line(capfd, monkeypatch):
    # On a shared node another user's Dask often holds 8787: one line says where the dashboard
    # went instead of distributed's four-line UserWarning.
    import socket
    import warnings
    from urllib.parse import urlparse

    from srdvol.app.session import cluster_session
    from srdvol.options import ClusterOptions

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        options = ClusterOptions(workers=1, threads_per_worker=1, dashboard_address=f":{port}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # what a terminal would show
            with cluster_session(options) as client:
                link = dashboard_link(client)
    err = capfd.readouterr().err
    assert link and urlparse(link).port != port
    assert f"dashboard: {link} (port {port} was in use)" in err, err
    assert not [w for w in caught if "already in use" in str(w.message)]


def test_lost_workers_on_a_shared_scheduler_are_said_only_when_they_ran_our_tasks():
    """A worker killed while running another client's task is none of srdvol's business on a
    shared scheduler (``ours``); on a cluster of our own every lost worker is said."""
    from distributed import Event

    from srdvol.dask.workers import lost_workers_reported

    def block_until(name: str) -> int:
        Event(name).wait()
        return 0

    held = []  # released only at the end: a released task is no longer the lost worker's

    def kill_the_worker_running(client: Client, key: str) -> str:
        held.append(client.submit(block_until, "never", key=key, pure=False))
        deadline = time.monotonic() + 60
        while not any(client.processing().values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        (address,) = [a for a, keys in client.processing().items() if keys]
        pid = client.run(os.getpid, workers=[address])[address]
        os.kill(pid, signal.SIGKILL)
        return address

    def wait_until(condition: Callable[[], object]) -> None:
        deadline = time.monotonic() + 60
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)

    said: dict[str, list[tuple[str, int]]] = {"shared": [], "own": []}
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as shared,
        Client(cluster) as own,
        lost_workers_reported(shared, lambda a, n: said["shared"].append((a, n)), ours="srdvol-"),
        lost_workers_reported(own, lambda a, n: said["own"].append((a, n))),
    ):
        other = kill_the_worker_running(own, "someone-elses-task")
        wait_until(lambda: len(said["own"]) == 1)
        held.pop().release()
        own.wait_for_workers(2, timeout=60)
        mine = kill_the_worker_running(own, "srdvol-denoise-abc")
        wait_until(lambda: len(said["own"]) == 2 and said["shared"])
        held.pop().release()
    assert said["own"] == [(other, 1), (mine, 1)]
    assert said["shared"] == [(mine, 1)]
