"""Tests of srdvol.training.pairs: spatial and temporal pairs, loss, dihedral augmentation, auto."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from srdvol.errors import ConfigError, DataError
from srdvol.training.pairs import (
    SPATIAL_TRIPLES,
    dihedral,
    dihedral_inverse,
    estimate_redundancy,
    pair_loss,
    random_dihedral,
    spatial_loss,
    spatial_pairs,
    temporal_pairs,
    training_read_shape,
)

torch.set_num_threads(1)


def _positions(shape: tuple[int, ...]) -> torch.Tensor:
    """A float64 array whose value is its own flat index, so gathered values decode positions."""
    return torch.arange(int(np.prod(shape)), dtype=torch.float64).reshape(shape)


def _decode(values: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    return np.stack(np.unravel_index(values.numpy().astype(np.int64), shape), axis=-1)


def test_spatial_pairs_use_orthogonal_neighbours_of_the_same_cell() -> None:
    shape = (2, 3, 8, 10)
    data = _positions(shape)
    inputs, target_a, target_b = spatial_pairs(data, generator=torch.Generator().manual_seed(1))
    assert inputs.shape == target_a.shape == target_b.shape == (2, 3, 4, 5)
    pin, pa, pb = (_decode(v, shape) for v in (inputs, target_a, target_b))
    # Same patch and frame, same 2x2 cell, and the cell is the one at the output position.
    for p in (pin, pa, pb):
        assert (p[..., :2] == pin[..., :2]).all()
        cell_y, cell_x = np.meshgrid(np.arange(4), np.arange(5), indexing="ij")
        assert (p[..., 2] // 2 == cell_y).all()
        assert (p[..., 3] // 2 == cell_x).all()
    da = np.abs(pa[..., 2:] - pin[..., 2:])
    db = np.abs(pb[..., 2:] - pin[..., 2:])
    # Each target is exactly one step away (never the pixel itself, never the diagonal) ...
    assert (da.sum(-1) == 1).all()
    assert (db.sum(-1) == 1).all()
    # ... and the two targets lie on different axes: one horizontal, one vertical neighbour.
    assert (da[..., 0] != db[..., 0]).all()


def test_spatial_triples_table_is_the_8_orthogonal_triples() -> None:
    yx = {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1)}
    expected = set()
    for pixel, a, b in itertools.permutations(range(4), 3):
        steps = [tuple(abs(p - q) for p, q in zip(yx[pixel], yx[t], strict=True)) for t in (a, b)]
        if sorted(steps) == [(0, 1), (1, 0)]:
            expected.add((pixel, a, b))
    assert set(SPATIAL_TRIPLES) == expected
    assert len(SPATIAL_TRIPLES) == 8


def test_spatial_pairs_draw_all_8_triples_about_uniformly_per_cell_and_frame() -> None:
    shape = (4, 16, 32, 32)
    data = _positions(shape)
    inputs, target_a, target_b = spatial_pairs(data, generator=torch.Generator().manual_seed(2))
    cell_index = [_decode(v, shape)[..., 2:] % 2 for v in (inputs, target_a, target_b)]
    codes = [2 * c[..., 0] + c[..., 1] for c in cell_index]
    triples = np.stack(codes, axis=-1).reshape(-1, 3)
    found, counts = np.unique(triples, axis=0, return_counts=True)
    assert {tuple(t) for t in found} == set(SPATIAL_TRIPLES)
    expected = triples.shape[0] / 8
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
    # Frames of one patch draw independently (not one mask per patch).
    assert not np.array_equal(codes[0][0, 0], codes[0][0, 1])


def test_spatial_pairs_are_reproducible_and_accept_any_leading_shape() -> None:
    data = torch.randn(2, 1, 4, 6, 6)
    first = spatial_pairs(data, generator=torch.Generator().manual_seed(3))
    again = spatial_pairs(data, generator=torch.Generator().manual_seed(3))
    for x, y in zip(first, again, strict=True):
        assert x.shape == (2, 1, 4, 3, 3)
        assert torch.equal(x, y)
    movie = spatial_pairs(torch.randn(5, 4, 4))
    assert movie[0].shape == (5, 2, 2)


@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (2, 4, 6, 7)])
def test_spatial_pairs_reject_odd_frames(shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match="even"):
        spatial_pairs(torch.zeros(shape))


@pytest.mark.parametrize("kind", ["mse", "l1mse"])
def test_losses_match_numpy(kind: str) -> None:
    rng = np.random.default_rng(4)
    pred, a, b = (rng.normal(size=(2, 3, 4, 4)) for _ in range(3))

    def reference(p: np.ndarray, t: np.ndarray) -> float:
        mse = ((p - t) ** 2).mean()
        return mse if kind == "mse" else 0.5 * np.abs(p - t).mean() + 0.5 * mse

    torch_pred, torch_a, torch_b = (torch.from_numpy(v) for v in (pred, a, b))
    assert float(pair_loss(torch_pred, torch_a, kind=kind)) == pytest.approx(reference(pred, a))
    expected = 0.5 * (reference(pred, a) + reference(pred, b))
    got = spatial_loss(torch_pred, torch_a, torch_b, kind=kind)
    assert float(got) == pytest.approx(expected)


def test_the_mse_loss_is_minimised_by_the_mean_and_l1mse_pulls_towards_the_median() -> None:
    # Skewed targets (Poisson counts of mean 0.5): the best constant prediction under MSE is
    # their mean; 0.5 L1 + 0.5 MSE lands between the median (0) and the mean.
    targets = torch.from_numpy(np.random.default_rng(5).poisson(0.5, 20000).astype(np.float64))
    grid = torch.linspace(0.0, 1.0, 201, dtype=torch.float64)

    def best(kind: str) -> float:
        losses = [float(pair_loss(c.expand_as(targets), targets, kind=kind)) for c in grid]
        return float(grid[int(np.argmin(losses))])

    mean = float(targets.mean())
    assert best("mse") == pytest.approx(mean, abs=0.005)
    # Between 0 and 1 the L1 half's slope is 0.5 (P(0) - P(>0)); the MSE half's is c - mean.
    pull = 0.5 * (2 * np.exp(-0.5) - 1)
    assert best("l1mse") == pytest.approx(mean - pull, abs=0.01)


def test_an_unknown_loss_names_the_option() -> None:
    with pytest.raises(ConfigError, match="loss"):
        pair_loss(torch.zeros(2), torch.zeros(2), kind="huber")


def test_temporal_pairs_pair_adjacent_distinct_frames() -> None:
    frames = torch.arange(3 * 8, dtype=torch.float32).reshape(3, 1, 8, 1, 1).expand(3, 1, 8, 2, 2)
    inputs, targets = temporal_pairs(frames, swap=False)
    assert inputs.shape == targets.shape == (3, 1, 4, 2, 2)
    assert torch.equal(inputs[0, 0, :, 0, 0], torch.tensor([0.0, 2, 4, 6]))
    assert torch.equal(targets[0, 0, :, 0, 0], torch.tensor([1.0, 3, 5, 7]))
    seen_swapped = seen_plain = False
    generator = torch.Generator().manual_seed(5)
    for _ in range(20):
        inputs, targets = temporal_pairs(frames, generator=generator)
        assert not (inputs == targets).any()
        assert ((inputs - targets).abs() == 1).all()
        seen_swapped |= bool((inputs > targets).any())
        seen_plain |= bool((inputs < targets).any())
    assert seen_swapped and seen_plain


def test_temporal_pairs_reject_odd_frame_counts() -> None:
    with pytest.raises(ConfigError, match="2 \\* patch_t"):
        temporal_pairs(torch.zeros(1, 7, 4, 4))


def test_training_read_shape() -> None:
    assert training_read_shape((16, 64, 64), sampling="spatial") == (16, 64, 64)
    assert training_read_shape((16, 64, 64), sampling="temporal") == (32, 64, 64)
    with pytest.raises(ConfigError, match=r"^patch: "):
        training_read_shape((16, 63, 64), sampling="spatial")
    with pytest.raises(ConfigError, match=r"^sampling: "):
        training_read_shape((16, 64, 64), sampling="diagonal")  # type: ignore[arg-type]


def test_dihedral_gives_8_distinct_invertible_transforms() -> None:
    image = np.arange(9.0).reshape(3, 3) ** 1.5  # no symmetry
    outputs = [dihedral(image, k) for k in range(8)]
    assert len({o.tobytes() for o in map(np.ascontiguousarray, outputs)}) == 8
    for k, out in enumerate(outputs):
        assert np.array_equal(dihedral_inverse(out, k), image)
        tensor_out = dihedral(torch.from_numpy(image), k)
        assert np.array_equal(tensor_out.numpy(), out)
        assert torch.equal(dihedral_inverse(tensor_out, k), torch.from_numpy(image))
    # Known answers: a quarter turn maps the top-right corner to the top-left; k=4 mirrors x.
    small = np.array([[1, 2, 3], [4, 5, 6]])
    assert np.array_equal(dihedral(small, 1), [[3, 6], [2, 5], [1, 4]])
    assert np.array_equal(dihedral(small, 4), [[3, 2, 1], [6, 5, 4]])
    with pytest.raises(ConfigError):
        dihedral(small, 8)


def test_random_dihedral_transforms_each_patch_and_keeps_non_square_shapes() -> None:
    generator = torch.Generator().manual_seed(6)
    patches = torch.randn(16, 2, 5, 5)
    out = random_dihedral(patches, generator=generator)
    used = set()
    for before, after in zip(patches, out, strict=True):
        matches = [k for k in range(8) if torch.equal(dihedral(before, k), after)]
        assert len(matches) == 1
        used.add(matches[0])
    assert len(used) >= 4
    wide = torch.randn(8, 2, 4, 6)
    assert random_dihedral(wide, generator=generator).shape == wide.shape


def _noisy(signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(signal).astype(np.uint16)


def test_estimate_redundancy_prefers_temporal_for_slow_movies() -> None:
    rng = np.random.default_rng(7)
    t = np.arange(40)[:, None, None]
    # Every pixel varies slowly and independently of its neighbours: frames share the signal.
    amplitude = rng.uniform(20, 40, size=(1, 24, 24))
    phase = rng.uniform(0, 2 * np.pi, size=(1, 24, 24))
    signal = 50 + amplitude * np.sin(2 * np.pi * t / 40 + phase)
    estimate = estimate_redundancy(_noisy(signal, rng))
    assert estimate.choice == "temporal"
    assert estimate.temporal > estimate.spatial + 0.3
    assert "temporal" in estimate.reason


def test_estimate_redundancy_prefers_spatial_for_fast_smooth_frames() -> None:
    rng = np.random.default_rng(8)
    # Independent frames (0.3 Hz-like), each a smooth image: neighbouring pixels share signal.
    fields = gaussian_filter(rng.normal(size=(40, 32, 32)), sigma=(0, 3, 3))
    signal = np.clip(100 + 20 * fields / fields.std(), 0, None)
    estimates = [estimate_redundancy(_noisy(scale * signal, rng)) for scale in (0.2, 1.0, 5.0)]
    for estimate in estimates:
        assert estimate.choice == "spatial"
        assert estimate.spatial > estimate.temporal
    # More photons, less noise: both correlations rise, the choice does not change.
    assert estimates[0].spatial < estimates[1].spatial < estimates[2].spatial


def test_estimate_redundancy_accepts_several_movies_and_rejects_bad_data() -> None:
    rng = np.random.default_rng(9)
    movies = [rng.normal(size=(10, 8, 8)) for _ in range(3)]
    estimate = estimate_redundancy(movies)
    assert abs(estimate.spatial) < 0.1
    assert estimate.choice == "spatial"  # pure noise: nothing to prefer temporal for
    bad = movies[0].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        estimate_redundancy(bad, subject="in.zarr")
    with pytest.raises(DataError, match="t >= 3"):
        estimate_redundancy(np.zeros((2, 8, 8)))
    with pytest.raises(DataError):
        estimate_redundancy([])
    static = estimate_redundancy(np.ones((5, 4, 4)))
    assert static.choice == "spatial"
