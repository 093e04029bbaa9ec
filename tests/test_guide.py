"""Tests for srdvol.predict.guide: each frame's activity filtered with the input's mean image."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import torch
from scipy import ndimage

from srdvol.dask.graph import denoise
from srdvol.predict.anchor import anchor_to_input
from srdvol.predict.block import predict_array
from srdvol.predict.guide import GUIDE_EPS, GUIDE_FRAMES, guide_frames, guided_filter, mean_image
from srdvol.predict.predictors import ModelPredictor


def _reference(
    p: np.ndarray, guide: np.ndarray, radius: int, eps: float, weight_eps: float | None = None
) -> np.ndarray:
    """He et al.'s guided filter written with scipy, frame by frame, borders mirrored, with the
    windows' fits averaged with weights 1 / (residual variance + weight_eps, default eps)."""
    weight_eps = eps if weight_eps is None else weight_eps
    size = 2 * radius + 1
    out = np.empty_like(p, dtype=np.float64)
    for i in range(p.shape[0]):
        image = guide[i].astype(np.float64)

        def box(v):
            return ndimage.uniform_filter(v, size, mode="mirror")

        mean_i = box(image)
        var_i = box(image * image) - mean_i**2
        for j in range(p.shape[1]):
            frame = p[i, j].astype(np.float64)
            mean_p = box(frame)
            cov = box(image * frame) - mean_i * mean_p
            a = cov / (var_i + eps)
            b = mean_p - a * mean_i
            residual = np.maximum(box(frame * frame) - mean_p**2 - a * cov, 0)
            w = 1 / (residual + weight_eps)
            out[i, j] = (box(w * a) * image + box(w * b)) / box(w)
    return out


@pytest.mark.parametrize(
    ("radius", "eps", "weight_eps"),
    [(1, 0.01, None), (2, 0.01, None), (3, 0.5, None), (2, 1e-4, 0.5)],
)
def test_guided_filter_matches_a_scipy_reference(radius, eps, weight_eps):
    rng = np.random.default_rng(radius)
    guide = rng.normal(0, 1, size=(2, 17, 20)).astype(np.float32)
    p = rng.normal(0, 1, size=(2, 3, 17, 20)).astype(np.float32)
    got = guided_filter(
        torch.from_numpy(p), torch.from_numpy(guide), radius, eps, weight_eps=weight_eps
    ).numpy()
    expected = _reference(p, guide, radius, eps, weight_eps)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)


def test_activity_that_follows_the_mean_image_passes_and_noise_does_not():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :40]
    cell = np.exp(-((yy - 20.0) ** 2 + (xx - 18.0) ** 2) / (2 * 5.0**2))  # a soma's brightness
    image = (0.2 + 3 * cell).astype(np.float32)[None]
    trace = rng.uniform(-1, 2, size=6)
    activity = (trace[:, None, None] * cell).astype(np.float32)[None]  # ΔF = trace x shape
    got = guided_filter(torch.from_numpy(activity), torch.from_numpy(image), 2).numpy()
    inner = (..., slice(4, 36), slice(4, 36))
    assert np.abs(got - activity)[inner].max() < 0.03 * np.abs(activity).max()
    noise = rng.normal(0, 1, size=(1, 6, 40, 40)).astype(np.float32)
    flat = np.ones((1, 40, 40), np.float32)  # no structure: the windows average the noise
    quiet = guided_filter(torch.from_numpy(noise), torch.from_numpy(flat), 2).numpy()
    assert quiet[inner].std() < 0.35 * noise[inner].std()


def test_mean_image_samples_evenly_and_numpy_equals_dask():
    assert guide_frames(5).tolist() == [0, 1, 2, 3, 4]
    picked = guide_frames(4 * GUIDE_FRAMES)
    assert len(picked) == GUIDE_FRAMES and picked[0] == 0 and picked[-1] == 4 * GUIDE_FRAMES - 1
    movie = np.random.default_rng(1).integers(0, 4000, size=(3, 300, 6, 7), dtype=np.uint16)
    got = mean_image(movie, axis=1)
    expected = movie[:, guide_frames(300)].astype(np.float64).mean(axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-7)
    lazy = mean_image(da.from_array(movie, chunks=(1, 37, 4, 7)), axis=1)
    np.testing.assert_array_equal(lazy.compute(), got)  # integers: any chunking, same image


def test_model_predictor_guides_each_patch_then_anchors(tiny_model):
    rng = np.random.default_rng(3)
    x = rng.normal(100, 10, size=(3, 16, 12, 14)).astype(np.float32)
    guide = x.mean(axis=1)
    plain = ModelPredictor(tiny_model, device="cpu", batch_size=4)
    guided = ModelPredictor(tiny_model, device="cpu", batch_size=4, guide=2)
    both = ModelPredictor(tiny_model, device="cpu", batch_size=4, guide=2, anchor=3.0)
    own = plain(x)
    mean, std = float(plain.record.normalization.mean), float(plain.record.normalization.std)
    g = (guide - mean) / std
    n = (own - mean) / std
    expected = (g[:, None] + _reference(n - g[:, None], g, 2, GUIDE_EPS)) * std + mean
    t = torch.from_numpy
    got = guided.predict_tensor(t(x), t(guide)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3)
    assert np.abs(got - own).max() > 0.5
    # then the anchor, its correction shaped like the mean image
    shaped = anchor_to_input(t(x), t(got), 3.0, t(guide)).numpy()
    np.testing.assert_allclose(both.predict_tensor(t(x), t(guide)).numpy(), shaped, atol=2e-3)
    assert np.abs(shaped - anchor_to_input(t(x), t(got), 3.0).numpy()).max() > 0.05
    assert "guide=2" in repr(guided)
    with pytest.raises(RuntimeError, match="mean image"):
        guided(x)  # patches alone: no mean image to guide with


def test_engine_blocks_give_the_in_memory_result(tiny_model):
    # The mean image is the whole movie's, whatever the blocks: several blocks equal one.
    movie = np.random.default_rng(4).integers(50, 400, size=(40, 44, 40), dtype=np.uint16)
    guided = ModelPredictor(tiny_model, device="cpu", batch_size=4, guide=2, anchor=4.0)
    whole = predict_array(movie, guided, patch=(16, 16, 16), overlap=0.25)
    plain = predict_array(
        movie, ModelPredictor(tiny_model, device="cpu", batch_size=4, anchor=4.0),
        patch=(16, 16, 16), overlap=0.25,
    )  # fmt: skip
    assert np.abs(whole - plain).max() > 1
    lazy = denoise(
        da.from_array(movie, chunks=(8, 16, 8)),
        guided,
        patch=(16, 16, 16),
        overlap=0.25,
        block=(16, 16, 16),
        dims="tyx",
    )
    assert min(lazy.numblocks) > 1
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(lazy.compute(), whole)


def test_each_plane_is_guided_by_its_own_mean_image(tiny_model):
    # tzyx: every z plane is its own movie with its own mean image, in memory and in blocks.
    rng = np.random.default_rng(5)
    movie = rng.integers(50, 400, size=(40, 2, 40, 20), dtype=np.uint16)
    movie[:, 1] //= 4  # the planes differ: a mix-up of their images shows
    guided = ModelPredictor(tiny_model, device="cpu", batch_size=4, guide=2)
    both = predict_array(movie, guided, patch=(16, 16, 16), dims="tzyx")
    for z in range(2):
        alone = predict_array(movie[:, z], guided, patch=(16, 16, 16))
        np.testing.assert_array_equal(both[:, z], alone)
    lazy = denoise(
        da.from_array(movie, chunks=(8, 1, 8, 20)),
        guided,
        patch=(16, 16, 16),
        block=(16, 16, 20),
        dims="tzyx",
    )
    assert lazy.numblocks[1] == 2 and max(lazy.numblocks[0], lazy.numblocks[2]) > 1
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(lazy.compute(), both)


class _CountingFrames:
    """A (t, y, x) array that records which frames each read asks for."""

    def __init__(self, movie: np.ndarray):
        self.movie, self.shape, self.dtype, self.ndim = movie, movie.shape, movie.dtype, movie.ndim
        self.reads: list[tuple[int, int]] = []

    def __getitem__(self, key):
        if key[0].stop > key[0].start:  # dask's own probe at from_array reads no frame
            self.reads.append((key[0].start, key[0].stop))
        return self.movie[key]


def test_mean_image_reads_whole_storage_chunks_only():
    movie = np.random.default_rng(6).integers(0, 4000, size=(600, 5, 6), dtype=np.uint16)
    counting = _CountingFrames(movie)
    lazy = da.from_array(counting, chunks=(8, 5, 6), asarray=False)
    picked = guide_frames(600, lazy.chunks[0])
    assert len(picked) == GUIDE_FRAMES  # 32 chunks of 8 frames
    with dask.config.set(scheduler="sync"):
        got = mean_image(lazy, 0, chunks=lazy.chunks[0]).compute()
    assert len(counting.reads) == 32 and all(b - a == 8 for a, b in counting.reads)
    np.testing.assert_array_equal(got, mean_image(movie, 0, chunks=lazy.chunks[0]))
    np.testing.assert_allclose(got, movie[picked].astype(np.float64).mean(axis=0), rtol=1e-6)
    # without the chunks: evenly spaced frames, one from each of 75 chunks
    counting.reads.clear()
    with dask.config.set(scheduler="sync"):
        mean_image(lazy, 0).compute()
    assert len(counting.reads) == 75


def test_engine_mean_image_neither_waits_for_blocks_nor_shares_their_reads(tiny_model, monkeypatch):
    # The guide is read before any block runs; taken from the blocks it would need the whole
    # input read (and held) first, and sharing their reads it would hold its chunks until then.
    import srdvol.dask.graph as graph

    images = []

    def keep(*args, **kwargs):
        images.append(mean_image(*args, **kwargs))
        return images[-1]

    monkeypatch.setattr(graph, "mean_image", keep)
    movie = np.random.default_rng(7).integers(50, 400, size=(600, 16, 16), dtype=np.uint16)
    data = da.from_array(movie, chunks=(8, 16, 16))
    guided = ModelPredictor(tiny_model, device="cpu", batch_size=4, guide=2)
    denoise(data, guided, patch=(16, 16, 16), block=(64, 16, 16), dims="tyx")
    (image,) = images
    graph_ = image.__dask_graph__().cull(set(dask.core.flatten(image.__dask_keys__())))
    names = {key[0] if isinstance(key, tuple) else key for key in graph_.keys()}
    assert not [n for n in names if n.startswith("rechunk")], names
    # its reads: the tasks it starts from, 32 whole chunks of 8 frames, none of them the blocks'
    starts = [key for key, deps in graph_.get_all_dependencies().items() if not deps]
    reads = [key for key in starts if isinstance(key, tuple)]  # not the frame index list
    assert len(reads) == 32
    assert not set(reads) & set(dict(data.__dask_graph__()))


def test_an_in_memory_input_gets_the_in_memory_guide(tiny_model):
    # A numpy input has no storage chunks: the engine averages the same evenly spaced frames
    # as predict_array (not every frame of its one in-memory chunk), so the two agree.
    movie = np.random.default_rng(8).integers(50, 400, size=(300, 16, 16), dtype=np.uint16)
    movie[::7] += 300  # frames outside the even sample: a mean of every frame differs
    guided = ModelPredictor(tiny_model, device="cpu", batch_size=8, guide=2)
    whole = predict_array(movie, guided, patch=(16, 16, 16), overlap=0.25)
    lazy = denoise(movie, guided, patch=(16, 16, 16), block=(128, 16, 16), dims="tyx")
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(lazy.compute(), whole)
