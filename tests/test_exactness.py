"""The engine's output equals one whole-array sliding window, bit for bit, for any blocks.

The reference (:mod:`sliding_window`, next to this file) is written from DESIGN.md's definition,
without srdvol's lattice, stride, window or accumulator code, and sends every lattice patch to
the model on its own, while the engine batches the patches of a block together: equality
therefore also shows that a patch's prediction does not depend on the patches it shares a
forward pass with. Two models: ``PatchMeanModel``, whose output depends on where the patch sits
(a wrong lattice, halo or weight changes it), and a tiny real SRDTrans network with fixed random
weights, run by :class:`ModelPredictor` on the CPU.

Both write paths are covered: the in-process threaded writer (``write(..., client=None)``) and
a LocalCluster of worker processes (few examples there: each costs seconds).
"""

from __future__ import annotations

import math
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sliding_window import Model, reference, reference_movie

from srdvol.dask.graph import denoise, write
from srdvol.model.checkpoint import ModelRecord, Normalization, save_model
from srdvol.model.config import NetworkConfig
from srdvol.model.network import build_network
from srdvol.predict.predictors import AffineModel, ModelPredictor, PatchMeanModel

# ------------------------------------------------------------------------------ the reference


def test_reference_gives_the_affine_known_answer():
    # The reference itself: a pixel-wise model comes back exactly (to float32 rounding), with
    # a short y axis (reflect-padded), a snapped last patch and high overlap.
    movie = np.random.default_rng(0).gamma(2.0, 30.0, size=(21, 5, 13)).astype(np.float32)
    for kind in ("tent", "cos2"):
        out = reference_movie(movie, AffineModel(2, 1), (16, 7, 4), 0.7, kind)
        np.testing.assert_allclose(out, 2 * movie + 1, rtol=2e-7, atol=0)


def test_reference_matches_a_hand_computed_case():
    # Only t varies: length 6, patch 4, overlap 0.5 -> stride 2, starts 0 and 2. The model adds
    # the patch mean (1.5 and 3.5); tent weights of a 4-patch are 1/4, 3/4, 3/4, 1/4.
    movie = np.arange(6, dtype=np.float32).reshape(6, 1, 1)
    out = reference_movie(movie, PatchMeanModel(1.0), (4, 1, 1), 0.5, "tent")[:, 0, 0]
    w0 = np.array([0.25, 0.75, 0.75, 0.25, 0, 0])  # patch at 0
    w1 = np.roll(w0, 2)  # patch at 2
    t = np.arange(6.0)
    expected = (w0 * (t + 1.5) + w1 * (t + 3.5)) / (w0 + w1)
    np.testing.assert_allclose(out, expected, rtol=1e-7)
    assert out[2] == pytest.approx(2 + 0.75 * 1.5 + 0.25 * 3.5)


# ------------------------------------------------------------------------------ models


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    # Worker processes of a LocalCluster run torch with one thread; so does the reference.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SRDTrans network with fixed random weights, saved as a real model file."""
    config = NetworkConfig.tiny(16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12)
        network = build_network(config).eval()
    record = ModelRecord(
        network=config,
        patch=(16, 8, 8),
        sampling="spatial",
        normalization=Normalization(mean=60.0, std=40.0),
    )
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(path, network, record)
    return path


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exactness")


# ------------------------------------------------------------------------------ cases


@st.composite
def cases(draw: st.DrawFn, *, network: bool) -> dict:
    """A movie, patch, overlap, window, output chunks and processing blocks."""
    dims = "tyx" if network else draw(st.sampled_from(["tyx", "tzyx"]))
    t = draw(st.integers(16, 34 if network else 40))
    y = draw(st.integers(1, 12 if network else 18))
    x = draw(st.integers(1, 12 if network else 18))
    z = draw(st.integers(1, 2)) if "z" in dims else None
    patch = (
        16 if network else draw(st.integers(1, 20)),
        draw(st.integers(1, 8 if network else 12)),
        draw(st.integers(1, 8 if network else 12)),
    )
    chunks = {a: draw(st.integers(1, 12)) for a in "tyx"}
    block = {a: draw(st.integers(1, 24)) for a in "tyx"}
    shape = {"t": t, "z": z, "y": y, "x": x}
    return {
        "dims": dims,
        "shape": tuple(shape[a] for a in dims),
        "patch": patch,
        "overlap": draw(st.floats(0.0, 0.6 if network else 0.8)),
        "kind": draw(st.sampled_from(["tent", "cos2"])),
        "chunks": tuple(chunks.get(a, 1) for a in dims),
        "block": tuple(block[a] for a in "tyx"),
        "batch_size": draw(st.integers(1, 5)),
        "model_batch": draw(st.integers(2, 4)),
        "seed": draw(st.integers(0, 2**16)),
        "threads": draw(st.integers(1, 2)),
    }


def _movie(case: dict) -> np.ndarray:
    rng = np.random.default_rng(case["seed"])
    return rng.gamma(2.0, 30.0, size=case["shape"]).astype(np.float32)


def _model(case: dict, model_path: Path | None) -> Model:
    if model_path is None:
        model = PatchMeanModel(0.5)
        model.batch_size = case["batch_size"]  # patches per call, read by the engine
        return model
    # the engine calls it with its forward batch; how patches are grouped into calls does not
    # change their bits (test_real_network_prediction_does_not_depend_on_its_batch)
    return ModelPredictor(model_path, device="cpu", batch_size=case["model_batch"])


def _engine(case: dict, model: Model, root: Path, *, client=None) -> np.ndarray:
    """denoise + write into a real Zarr store, then read the store back."""
    arr = _movie(case)
    target = zarr.create_array(
        str(root / f"out-{uuid.uuid4().hex}.zarr"),
        shape=arr.shape,
        chunks=case["chunks"],
        dtype="float32",
        fill_value=np.nan,  # a block never written would show
    )
    lazy = denoise(
        da.from_array(arr, chunks=tuple(max(1, n // 2) for n in arr.shape)),
        model,
        dims=case["dims"],
        patch=case["patch"],
        overlap=case["overlap"],
        block=case["block"],
        window=case["kind"],
        chunks=target.chunks,
    )
    report = write(lazy, target, client=client, threads=case["threads"], wave=3)
    assert report.computed == math.prod(lazy.numblocks)
    return target[...]


def _check(case: dict, model_path: Path | None, root: Path, *, client=None) -> None:
    model = _model(case, model_path)
    got = _engine(case, model, root, client=client)
    want = reference(
        _movie(case),
        model,
        dims=case["dims"],
        patch=case["patch"],
        overlap=case["overlap"],
        kind=case["kind"],
    )
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------ threaded writer

EXAMPLES = settings(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@settings(EXAMPLES, max_examples=60)
@given(case=cases(network=False))
def test_patch_mean_model_engine_equals_whole_array_pass(case, scratch):
    _check(case, None, scratch)


@settings(EXAMPLES, max_examples=30)
@given(case=cases(network=True))
def test_real_network_engine_equals_whole_array_pass(case, scratch, tiny_model):
    _check(case, tiny_model, scratch)


def test_real_network_prediction_does_not_depend_on_its_batch(tiny_model):
    # The direct statement behind the engine test: a patch gives the same bits alone, in a
    # short batch, in a full one and in a long one, wherever it sits among other patches.
    rng = np.random.default_rng(5)
    patches = rng.gamma(2.0, 30.0, size=(7, 16, 8, 8)).astype(np.float32)
    model = ModelPredictor(tiny_model, device="cpu", batch_size=3)
    together = model(patches)
    for i in range(len(patches)):
        np.testing.assert_array_equal(model(patches[i : i + 1])[0], together[i])
    np.testing.assert_array_equal(model(patches[::-1])[::-1], together)
    np.testing.assert_array_equal(model(patches[2:4]), together[2:4])
    # and the network is not a trivial map: different patches, different outputs
    assert not np.allclose(together[0] - patches[0], together[1] - patches[1])


# ------------------------------------------------------------------------------ LocalCluster


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


@pytest.mark.slow
@settings(EXAMPLES, max_examples=4)
@given(case=cases(network=False), network=st.booleans())
def test_engine_on_a_local_cluster_equals_whole_array_pass(
    case, network, scratch, tiny_model, client
):
    if network:  # the network's constraints: patch_t 16, a movie of one plane
        case = {**case, "dims": "tyx", "shape": case["shape"][:1] + case["shape"][-2:]}
        case["patch"] = (16, min(case["patch"][1], 8), min(case["patch"][2], 8))
        case["chunks"] = case["chunks"][:1] + case["chunks"][-2:]
    with tempfile.TemporaryDirectory(dir=scratch) as root:
        _check(case, tiny_model if network else None, Path(root), client=client)
