"""``srdvol export``: a tiny trained model becomes a BioImage Model Zoo package that
bioimageio.spec validates and bioimageio.core runs on the CPU, offline, reproducing srdvol's own
prediction; bad input is one sentence, exit 2, nothing written."""

from __future__ import annotations

import getpass
import hashlib
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from cli_run import assert_one_clear_sentence, run_cli

pytestmark = [
    pytest.mark.slow,
    # bioimageio.core loads TorchScript weights with torch.jit.load, which torch 2.13 deprecates
    # (it still works; bioimageio has no torch.export weights format yet).
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
]


class _NoNetwork:
    """Refuse every socket connection and name lookup, and remember the attempts (bioimageio
    turns a failed request into a validation warning, so a refusal alone could pass unseen)."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def refuse(self, *args, **kwargs):
        self.attempts.append(repr(args[1:] or args))
        raise OSError("srdvol tests: no network")


@pytest.fixture(scope="module")
def offline():
    """No network and a private bioimageio cache for the whole module."""
    import bioimageio.spec

    guard = _NoNetwork()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", guard.refuse)
        patch.setattr(socket.socket, "connect_ex", guard.refuse)
        patch.setattr(socket, "getaddrinfo", guard.refuse)
        patch.setattr(bioimageio.spec.settings, "cache_path", Path("/nonexistent/bioimageio"))
        yield guard
    assert guard.attempts == [], "bioimageio tried to reach the network"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, offline):
    """A simulated 32-frame 32x32 recording and a tiny model trained one step on it."""
    from srdvol.model.config import NetworkConfig
    from srdvol.simulate import simulate
    from srdvol.training.loop import train

    root = tmp_path_factory.mktemp("export")
    simulate(root / "in.zarr", truth=root / "truth.zarr", frames=32, size=(32, 32), seed=0)
    train(
        root / "in.zarr",
        root / "m16.safetensors",
        patch=(16, 16, 16),
        steps=1,
        batch_size=1,
        network=NetworkConfig.tiny(16),
        progress=False,
    )
    (root / "m16.safetensors.state").unlink()
    return root


@pytest.fixture(scope="module")
def package(trained):
    """The model exported through the library, with the default (noise) test input."""
    from srdvol.model.zoo import export_package

    return export_package(trained / "m16.safetensors", trained / "pkg.zip")


def _member(package: Path, name: str) -> bytes:
    with zipfile.ZipFile(package) as archive:
        return archive.read(name)


def _npy(package: Path, name: str) -> np.ndarray:
    import io

    return np.load(io.BytesIO(_member(package, name)))


def test_package_passes_bioimageio_spec_validation(package):
    from bioimageio.spec import InvalidDescr, load_description

    description = load_description(package, perform_io_checks=True)

    assert not isinstance(description, InvalidDescr), description.validation_summary
    assert description.validation_summary.status == "valid-format"
    assert description.weights.torchscript is not None
    assert [a.id for a in description.inputs[0].axes] == ["batch", "channel", "time", "y", "x"]
    assert description.name == "SRDTrans-denoiser-m16" and str(description.license) == "CC-BY-4.0"
    assert [a.name for a in description.authors] == [getpass.getuser()]


def test_bioimageio_core_reproduces_the_test_output_on_cpu(package):
    from bioimageio.core import test_model

    summary = test_model(package, weight_format="torchscript", devices=["cpu"])

    failed = [e.msg[:3000] for d in summary.details if d.status == "failed" for e in d.errors]
    assert summary.status == "passed", failed
    names = " ".join(d.name for d in summary.details)
    assert "Reproduce test outputs from test inputs (torchscript)" in names


def test_test_output_is_srdvols_own_prediction(trained, package):
    from srdvol.predict.predictors import ModelPredictor

    test_input = _npy(package, "test_input.npy")
    test_output = _npy(package, "test_output.npy")
    predictor = ModelPredictor(trained / "m16.safetensors", device="cpu")

    assert test_input.shape == test_output.shape == (1, 1, 16, 16, 16)
    np.testing.assert_allclose(test_output[0], predictor(test_input[0]), rtol=1e-5, atol=1e-4)


def test_bioimageio_core_denoises_a_new_movie_like_srdvol(trained, package):
    """Another frame size (not a multiple of the Swin window), 32 frames of real data, raw
    uint16 in: bioimageio.core's own pipeline (processing steps, TorchScript) gives srdvol's
    network output for each block of 16 frames, in input units, whether it runs the movie
    whole (two blocks in one call) or in blocks of 16 frames."""
    import xarray as xr
    from bioimageio.core import predict

    from srdvol.predict.predictors import ModelPredictor

    movie = zarr.open_array(trained / "in.zarr" / "s0", mode="r")[:, 3:23, 1:28]
    predictor = ModelPredictor(trained / "m16.safetensors", device="cpu")
    expected = np.concatenate(
        [predictor(movie[None, t : t + 16].astype("float32"))[0] for t in (0, 16)]
    )
    raw = xr.DataArray(movie[None, None], dims=("batch", "channel", "time", "y", "x"))
    blocks = {"raw": {"batch": 1, "channel": 1, "time": 16, "y": 20, "x": 27}}

    whole = predict(model=package, inputs={"raw": raw})
    blockwise = predict(model=package, inputs={"raw": raw}, input_block_shape=blocks)

    for result in (whole, blockwise):
        denoised = result.members["denoised"].data.values[0, 0]
        assert denoised.shape == movie.shape
        np.testing.assert_allclose(denoised, expected, rtol=1e-5, atol=1e-3)


def test_description_carries_the_record(trained, package):
    from srdvol.model.checkpoint import read_record

    record = read_record(trained / "m16.safetensors")
    rdf = yaml.safe_load(_member(package, "rdf.yaml"))
    readme = _member(package, "README.md").decode()

    assert rdf["config"]["srdvol"] == record.model_dump(mode="json")
    preprocessing = rdf["inputs"][0]["preprocessing"]
    normalise = next(p for p in preprocessing if p["id"] == "fixed_zero_mean_unit_variance")
    assert normalise["kwargs"] == {
        "mean": record.normalization.mean,
        "std": record.normalization.std,
    }
    back = rdf["outputs"][0]["postprocessing"][0]
    assert back == {
        "id": "scale_linear",
        "kwargs": {"gain": record.normalization.std, "offset": record.normalization.mean},
    }
    time, y = rdf["inputs"][0]["axes"][2:4]
    assert time["size"] == 16 and y["size"] == {"min": 7, "step": 1}
    assert "patch t,y,x 16,16,16" in rdf["description"]
    assert "| patch (t, y, x) | 16,16,16 |" in readme and "## Validation" in readme
    assert str(record.training_data["source"]) in readme
    assert rdf["cite"][0]["doi"] == "10.1038/s43588-023-00568-2"
    # the README's recipe for srdvol's default --anchor is srdvol's anchoring
    import torch

    from srdvol.predict.anchor import anchor_to_input
    from srdvol.values import DEFAULT_ANCHOR

    recipe = next(b for b in readme.split("```python")[1:] if "gaussian_filter" in b)
    rng = np.random.default_rng(3)
    movie, network_output = rng.normal(size=(2, 16, 20, 24)).astype(np.float32)
    scope = {"movie": movie, "denoised": network_output.copy()}
    exec(recipe.split("```")[0], scope)
    expected = anchor_to_input(
        torch.from_numpy(movie)[None], torch.from_numpy(network_output)[None], DEFAULT_ANCHOR
    )
    np.testing.assert_allclose(scope["denoised"], expected[0].numpy(), atol=1e-5)


def test_trace_follows_any_frame_size_and_batch():
    """The property the package relies on: one trace serves every batch, frame size and
    number of 16-frame blocks."""
    import torch

    from srdvol.model.config import NetworkConfig
    from srdvol.model.network import build_network
    from srdvol.model.zoo import trace_network

    torch.manual_seed(0)
    network = build_network(NetworkConfig.tiny(16)).eval()
    traced = trace_network(network, torch.randn(1, 1, 16, 16, 16))
    for shape in [(3, 1, 32, 9, 30)]:
        x = torch.randn(shape)
        with torch.no_grad():
            blocks = [network(x[:, :, t : t + 16]) for t in range(0, shape[2], 16)]
            torch.testing.assert_close(traced(x), torch.cat(blocks, 2), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the command


def test_export_command_writes_a_package_with_the_sample(trained, monkeypatch, capsys):
    from bioimageio.spec import InvalidDescr, load_description

    monkeypatch.chdir(trained)
    code, _, err = run_cli(
        capsys,
        "export",
        "m16.safetensors",
        "zoo/cli.zip",
        "--sample",
        "in.zarr",
        "--name",
        "calcium V1 (tiny)",
        "--author",
        "Ada Lovelace",
        "--author",
        "Alan Turing",
        "--license",
        "MIT",
    )

    assert code == 0, err
    assert err.startswith("BioImage Model Zoo package written to ")
    assert "bioimageio test zoo/cli.zip" in err
    package = trained / "zoo" / "cli.zip"
    description = load_description(package, perform_io_checks=True)
    assert not isinstance(description, InvalidDescr), description.validation_summary
    assert description.name == "calcium V1 (tiny)" and str(description.license) == "MIT"
    assert [a.name for a in description.authors] == ["Ada Lovelace", "Alan Turing"]
    movie = zarr.open_array(trained / "in.zarr" / "s0", mode="r")[:16, 8:24, 8:24]
    np.testing.assert_array_equal(_npy(package, "test_input.npy")[0, 0], movie)
    assert sorted(p.name for p in (trained / "zoo").iterdir()) == ["cli.zip"]  # no leftovers


def test_overwrite_allows_an_existing_package(trained, package):
    from srdvol.errors import OutputExistsError
    from srdvol.model.zoo import check_package_path

    existing = package
    model = trained / "m16.safetensors"
    with pytest.raises(OutputExistsError):
        check_package_path(existing, model_path=model)
    assert check_package_path(existing, model_path=model, overwrite=True) == existing


def digests(root: Path) -> dict[str, str]:
    """A hash of every file and folder in ``root``: what "nothing written" is checked against."""
    from conftest import digest

    return {
        p.name: digest(p) if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.iterdir()
    }


@pytest.fixture(scope="module")
def faults(trained):
    """The trained folder plus what the error cases need: a damaged model, a text file, an
    existing package, a folder named like a package."""
    root = trained
    damaged = root / "corrupt.safetensors"
    shutil.copy(root / "m16.safetensors", damaged)
    raw = bytearray(damaged.read_bytes())
    raw[-64:] = bytes(64)  # the last tensor's bytes: the checksum in the record catches it
    damaged.write_bytes(bytes(raw))
    (root / "notes.txt").write_text("not a model")
    (root / "existing.zip").write_bytes(b"someone's package")
    (root / "folder.zip").mkdir()
    (root / "short.zarr").mkdir()
    return root


FAULTS = [
    # (case, argv, subject the message starts with, words of the problem or fix)
    ("not a model file", ["notes.txt", "new.zip"], "notes.txt", "is not a srdvol model file"),
    ("a store as model", ["in.zarr", "new.zip"], "in.zarr", "not a model file"),
    ("missing model", ["absent.safetensors", "new.zip"], "absent.safetensors", "does not exist"),
    (
        "corrupted model",
        ["corrupt.safetensors", "new.zip"],
        "corrupt.safetensors",
        "do not match the checksum",
    ),
    ("existing OUT", ["m16.safetensors", "existing.zip"], "existing.zip", "--overwrite"),
    ("OUT is a folder", ["m16.safetensors", "folder.zip"], "folder.zip", "is a folder"),
    ("OUT not a zip", ["m16.safetensors", "new.tar"], "new.tar", "ending in .zip"),
    ("OUT a URL", ["m16.safetensors", "s3://bucket/new.zip"], "s3://bucket/new.zip", "local path"),
    (
        "OUT under a file",
        ["m16.safetensors", "notes.txt/new.zip"],
        "notes.txt/new.zip",
        "is a file, so no folder can be created there",
    ),
    ("bad licence", ["m16.safetensors", "new.zip", "--license", "GPL-9"], "--license", "SPDX"),
    ("bad name", ["m16.safetensors", "new.zip", "--name", "a/b"], "--name", "letters, digits"),
    ("bad author", ["m16.safetensors", "new.zip", "--author", "x/y"], "--author", "without '/'"),
    (
        "sample not a store",
        ["m16.safetensors", "new.zip", "--sample", "short.zarr"],
        "short.zarr",
        "",
    ),
]


@pytest.mark.parametrize(
    ("argv", "subject", "words"), [c[1:] for c in FAULTS], ids=[c[0] for c in FAULTS]
)
def test_bad_input_is_one_clear_sentence_and_writes_nothing(
    faults, monkeypatch, capsys, argv, subject, words
):
    monkeypatch.chdir(faults)
    before = digests(faults)

    code, out, err = run_cli(capsys, "export", *argv)

    assert_one_clear_sentence(code, out, err, subject=subject, words=words)
    assert digests(faults) == before


def test_sample_with_too_few_frames_is_refused(faults, make_image, monkeypatch, capsys):
    path, _ = make_image("eight.zarr", axes="tyx", shape=(8, 32, 32))
    monkeypatch.chdir(faults)
    before = digests(faults)

    code, _, err = run_cli(capsys, "export", "m16.safetensors", "new.zip", "--sample", path)

    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"srdvol: error: {path}: the time axis has 8 frames")
    assert digests(faults) == before


def test_sample_is_the_first_frames_cropped_around_the_centre(make_image):
    """A model of 32 frames: a 20-frame sample is refused; a longer one gives its first 32
    frames, the middle of each (c, z) plane's first, cropped to the training patch."""
    from srdvol.app.export import sample_movie
    from srdvol.errors import DataError
    from srdvol.model.checkpoint import ModelRecord, Normalization
    from srdvol.model.config import NetworkConfig

    record = ModelRecord(
        network=NetworkConfig.tiny(32),
        patch=(32, 16, 24),
        sampling="spatial",
        normalization=Normalization(mean=0.0, std=1.0),
    )
    short, _ = make_image("short.zarr", axes="tyx", shape=(20, 32, 32))
    with pytest.raises(DataError, match="has 20 frames and the model takes blocks of 32"):
        sample_movie(short, record)
    path, data = make_image("long.zarr", axes="tczyx", shape=(40, 2, 3, 30, 20))

    movie = sample_movie(path, record)

    np.testing.assert_array_equal(movie, data[:32, 0, 0, 7:23, :])  # x is narrower: whole


def test_missing_bioimageio_is_one_sentence(faults, monkeypatch, capsys):
    monkeypatch.chdir(faults)
    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)  # as if not installed
    before = digests(faults)

    code, _, err = run_cli(capsys, "export", "m16.safetensors", "new.zip")

    assert code == 2 and err.count("\n") == 1
    assert err.startswith("srdvol: error: bioimageio.spec: is not installed")
    assert "pip install 'srdvol[export]'" in err
    assert digests(faults) == before


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


def test_read_only_location_is_refused_before_any_work(faults):
    if not _can_mount():
        pytest.skip("needs unshare and user namespaces to mount a tmpfs")
    (faults / "ro").mkdir(exist_ok=True)
    command = 'mount -t tmpfs -o ro tmpfs ro && exec "$0" -m srdvol.app.cli export "$1" "$2"'
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", command, sys.executable, "m16.safetensors", "ro/p.zip"],
        cwd=faults,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("srdvol: error: ro/p.zip: ")
    assert "cannot be written" in result.stderr and result.stderr.count("\n") == 1
