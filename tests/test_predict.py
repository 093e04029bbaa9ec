"""Tests for srdvol.predict (predictors and block): predictors, the sums of one block's patches,
and the whole-array pass."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sliding_window import reference_movie

from srdvol.core.blend import divide, weight_sums
from srdvol.core.tiling import stride
from srdvol.errors import DataError, InputError, ModelMismatchError, StoreNotFoundError
from srdvol.predict import predictors as predict
from srdvol.predict.block import Placement, block_sums, predict_array
from srdvol.predict.predictors import AffineModel, ModelPredictor, PatchMeanModel


@given(
    t=st.integers(16, 30),
    y=st.integers(1, 14),
    x=st.integers(1, 14),
    pt=st.integers(1, 20),
    py=st.integers(1, 9),
    px=st.integers(1, 9),
    overlap=st.floats(0, 0.9),
    kind=st.sampled_from(["tent", "cos2"]),
)
@settings(max_examples=40, deadline=None)
def test_affine_known_answer_whole_array(t, y, x, pt, py, px, overlap, kind):
    rng = np.random.default_rng(t * 1000 + y * 10 + x)
    movie = rng.normal(50, 20, size=(t, y, x)).astype(np.float32)
    out = predict_array(
        movie, AffineModel(2, 1), patch=(pt, py, px), overlap=overlap, window_kind=kind
    )
    assert out.dtype == np.float32 and out.shape == movie.shape
    np.testing.assert_allclose(out, 2 * movie + 1, rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("kind", ["tent", "cos2"])
def test_patch_dependent_model_matches_reference(kind):
    rng = np.random.default_rng(3)
    movie = rng.gamma(3, 10, size=(21, 13, 7)).astype(np.float32)  # x shorter than the patch
    patch, overlap = (8, 5, 9), 0.4
    got = predict_array(movie, PatchMeanModel(), patch=patch, overlap=overlap, window_kind=kind)
    want = reference_movie(movie, PatchMeanModel(), patch, overlap, kind)
    np.testing.assert_array_equal(got, want)
    # The stand-in really is patch dependent: its output differs from a pixel-wise shift.
    assert np.ptp(got - movie) > 1.0


def test_block_sums_overlap_add_to_the_whole_pass():
    # Four blocks, each predicting the patches that start in its core over core + high halo;
    # adding their sums where they fall and dividing by the weight sums is the whole pass.
    rng = np.random.default_rng(4)
    movie = rng.random((40, 17, 19)).astype(np.float32) * 100
    patch, overlap = (16, 6, 5), 0.3
    whole = predict_array(movie, PatchMeanModel(), patch=patch, overlap=overlap)
    num = np.zeros(movie.shape)
    calls = []
    for t0, t1 in [(0, 16), (16, 40)]:
        for y0, y1 in [(0, 9), (9, 17)]:
            hi = (min(40, t1 + 15), min(17, y1 + 5), 19)
            region = movie[t0 : hi[0], y0 : hi[1], :]
            sums = block_sums(
                region,
                predictor=PatchMeanModel(),
                patch=patch,
                overlap=overlap,
                place=Placement((t0, y0, 0), movie.shape, [(t0, t1), (y0, y1), (0, 19)]),
                progress=calls.append,
            )
            assert sums.dtype == np.float64 and sums.shape == region.shape
            num[t0 : hi[0], y0 : hi[1], :] += sums
    den = [
        weight_sums(n, p, stride(p, overlap), "tent")
        for n, p in zip(movie.shape, patch, strict=True)
    ]
    np.testing.assert_array_equal(divide(num, den), whole)
    # every lattice patch once: t starts 0, 11, 22, 24; y 0, 4, 8, 11; x 0, 4, 8, 12, 14
    assert sum(calls) == 4 * 4 * 5


def test_block_sums_of_a_block_that_owns_no_patch_are_zero():
    movie = np.ones((40, 8, 8), np.float32)
    sums = block_sums(
        movie[12:20],
        predictor=AffineModel(),
        patch=(16, 8, 8),
        overlap=0.0,  # starts 0, 16, 24: none in [12, 16)
        place=Placement((12, 0, 0), movie.shape, [(12, 16), (0, 8), (0, 8)]),
    )
    assert not sums.any()


def test_block_sums_refuses_region_without_halo():
    movie = np.ones((32, 10, 10), np.float32)
    with pytest.raises(RuntimeError, match="does not hold"):
        block_sums(
            movie[10:20],
            predictor=AffineModel(),
            patch=(16, 4, 4),
            overlap=0.25,
            place=Placement((10, 0, 0), movie.shape, [(10, 20), (0, 10), (0, 10)]),
        )


def test_multi_axis_array_treats_each_plane_as_a_movie():
    rng = np.random.default_rng(5)
    arr = rng.random((2, 16, 3, 8, 9)).astype(np.float32)  # c t z y x
    out = predict_array(arr, PatchMeanModel(), patch=(16, 4, 4), overlap=0.25, dims="ctzyx")
    for c in range(2):
        for z in range(3):
            np.testing.assert_array_equal(
                out[c, :, z],
                predict_array(arr[c, :, z], PatchMeanModel(), patch=(16, 4, 4), overlap=0.25),
            )


def test_errors_short_movie_and_missing_dims():
    with pytest.raises(DataError, match="fewer than the 16"):
        predict_array(np.zeros((15, 4, 4), np.float32), AffineModel(), patch=(8, 4, 4))
    with pytest.raises(InputError, match="dims"):
        predict_array(np.zeros((16, 2, 4, 4), np.float32), AffineModel(), patch=(8, 4, 4))


def test_stand_ins_pickle():
    x = np.arange(2 * 16 * 2 * 2, dtype=np.float32).reshape(2, 16, 2, 2)
    for model in (AffineModel(2, 1, delay=0.01), PatchMeanModel(0.3)):
        back = pickle.loads(pickle.dumps(model))
        np.testing.assert_array_equal(back(x), model(x))
    np.testing.assert_array_equal(AffineModel(2, 1)(x), 2 * x + 1)


# --- ModelPredictor, with real (tiny) model files ---------------------------------------------


@pytest.fixture
def tiny_model(monkeypatch, tmp_path):
    """A tiny SRDTrans model file (fixed random weights), its network, and a load counter."""
    torch = pytest.importorskip("torch")
    from srdvol.model import checkpoint
    from srdvol.model.checkpoint import ModelRecord, Normalization, save_model
    from srdvol.model.config import NetworkConfig
    from srdvol.model.network import build_network

    torch.set_num_threads(1)
    monkeypatch.setattr(predict, "_CACHE", {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = build_network(NetworkConfig.tiny(patch_t=16)).eval()
    record = ModelRecord(
        network=NetworkConfig.tiny(patch_t=16),
        patch=(16, 8, 8),
        sampling="spatial",
        normalization=Normalization(mean=100.0, std=10.0),
    )
    path = tmp_path / "tiny.srdvol"
    save_model(path, network, record)
    loads = []
    real_load = checkpoint.load_model

    def counting_load(model_path):
        loads.append(model_path)
        return real_load(model_path)

    monkeypatch.setattr(checkpoint, "load_model", counting_load)
    return path, network, loads


def _network_in_input_units(network, patches, mean=100.0, std=10.0):
    import torch

    with torch.inference_mode():
        y = network(torch.from_numpy((patches - mean) / std)[:, None])[:, 0].numpy()
    return y * std + mean


def test_model_predictor_normalises_runs_the_network_and_denormalises(tiny_model):
    path, network, loads = tiny_model
    model = ModelPredictor(path, device="cpu", batch_size=4)
    x = np.random.default_rng(0).normal(100, 10, size=(4, 16, 8, 8)).astype(np.float32)
    want = _network_in_input_units(network, x)  # one full batch: the same forward pass
    got = model(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)
    assert np.abs(got - x).max() > 1.0  # the network changes its input
    model(x)
    pickle.loads(pickle.dumps(model))(x)
    assert len(loads) == 1  # loaded once per process, also after pickling
    assert model.patch == {"t": 16, "y": 8, "x": 8}
    assert model.record.normalization.mean == 100.0


def test_renormalized_predictor_follows_a_brighter_input(tiny_model):
    # A recording 60 units brighter than the training data (6 training std): with its own
    # statistics the network sees what it saw in training, so the output is the same movie
    # 60 units brighter; with the model's statistics it is not.
    from srdvol.core.normalize import Statistics

    path, _, _ = tiny_model
    x = np.random.default_rng(0).normal(100, 10, size=(4, 16, 8, 8)).astype(np.float32)
    plain = ModelPredictor(path, device="cpu", batch_size=4)(x)
    own = Statistics(mean=160.0, std=10.0)
    renormalized = ModelPredictor(path, device="cpu", batch_size=4, normalization=own)
    np.testing.assert_allclose(renormalized(x + 60), plain + 60, atol=1e-3)
    shifted = ModelPredictor(path, device="cpu", batch_size=4)(x + 60)
    assert np.abs(shifted - (plain + 60)).max() > 1.0
    assert "renormalized" in repr(pickle.loads(pickle.dumps(renormalized)))


@pytest.mark.parametrize("shape", [(3, 16, 8, 8), (2, 16, 8, 12)])
def test_tta_predictor_is_the_mean_over_the_eight_symmetries(tiny_model, shape):
    # numpy reference: turn/mirror the patches, run the plain predictor, map back, average.
    from srdvol.model.symmetry import dihedral, dihedral_inverse

    path, _, _ = tiny_model
    x = np.random.default_rng(1).normal(100, 10, size=shape).astype(np.float32)
    plain = ModelPredictor(path, device="cpu", batch_size=4)
    tta = ModelPredictor(path, device="cpu", batch_size=4, tta=True)
    expected = np.mean(
        [dihedral_inverse(plain(np.ascontiguousarray(dihedral(x, k))), k) for k in range(8)],
        axis=0,
    )
    got = tta(x)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert np.abs(got - plain(x)).max() > 0.1  # the network is not equivariant: TTA changes it
    # a patch's result does not depend on the patches it is batched with
    np.testing.assert_array_equal(tta(x[:1]), got[:1])
    again = pickle.loads(pickle.dumps(tta))
    assert again.tta and "tta" in repr(again)


def test_model_predictor_tensor_path_and_batch(tiny_model):
    import torch

    path, _, _ = tiny_model
    model = ModelPredictor(path, device="cpu")
    assert model.batch_size == predict.CPU_BATCH  # none given: the CPU default
    assert model.tensor_device == torch.device("cpu")
    x = np.random.default_rng(2).normal(100, 10, size=(5, 16, 8, 8)).astype(np.float32)
    got = model.predict_tensor(torch.from_numpy(x))
    assert got.dtype == torch.float32 and tuple(got.shape) == x.shape
    np.testing.assert_array_equal(got.numpy(), model(x))  # the same bits either way
    assert ModelPredictor(path, device="cpu", batch_size=2).batch_size == 2


def test_model_predictor_patch_mismatch(tiny_model):
    path, _, _ = tiny_model
    with pytest.raises(ModelMismatchError, match=r"^patch: "):
        _ = ModelPredictor(path, device="cpu", patch=(32, 8, 8)).patch
    with pytest.raises(ModelMismatchError, match="patch_t 16"):
        ModelPredictor(path, device="cpu")(np.zeros((1, 32, 4, 4), np.float32))


def test_model_predictor_missing_file(tmp_path):
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        ModelPredictor(tmp_path / "nope", device="cpu")(np.zeros((1, 16, 4, 4), np.float32))


def test_real_model_through_the_whole_array_path(tiny_model):
    path, network, _ = tiny_model
    predictor = ModelPredictor(path, device="cpu")
    movie = np.random.default_rng(1).normal(100, 10, size=(16, 20, 20)).astype(np.float32)
    out = predict_array(movie, predictor, patch=(16, 16, 16))
    # Bit for bit the independent sliding window over the same predictor...
    np.testing.assert_array_equal(out, reference_movie(movie, predictor, (16, 16, 16), 0.25))
    # ...and in input units: the corner only the first patch covers is that patch's output.
    corner = _network_in_input_units(network, movie[None, :, :16, :16])[0]
    np.testing.assert_allclose(out[:, :4, :4], corner[:, :4, :4], rtol=1e-6, atol=1e-4)
    assert np.abs(out - movie).max() > 1.0


def test_a_closing_worker_stops_the_block_in_the_model_at_its_next_batch():
    # A closing worker must not exit while a block's thread is inside torch (C++ then aborts
    # with "terminate called without an active exception"): stop_blocks parks that block at its
    # next batch and returns; the block raises only if it is let go (here, by the test).
    import threading
    import time

    from srdvol.predict import block

    movie = np.ones((16, 64, 64), np.float32)
    raised = []

    def run() -> None:
        try:
            with block.model_turn():
                block_sums(
                    movie,
                    predictor=AffineModel(delay=0.2),  # 0.2 s per call of one patch
                    patch=(16, 8, 8),
                    overlap=0.0,  # 64 patches: about 13 s in all
                    place=Placement((0, 0, 0), movie.shape, [(0, 16), (0, 64), (0, 64)]),
                    batch_size=1,
                )
        except block.BlocksStopped as exc:
            raised.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.5)
    started = time.monotonic()
    try:
        assert block.stop_blocks(timeout=10)
        assert time.monotonic() - started < 8  # a batch or so, not the 13 s of the block
        assert worker.is_alive() and not raised  # parked, outside the model's code
    finally:
        block._CLOSING.clear()  # this test process goes on predicting: let the block go
        worker.join(20)
        block._PARKED.clear()
    assert raised and "parked" in str(raised[0])
