"""What a BioImage Model Zoo package says about its model: the description (``rdf.yaml``) as
plain data, its one-paragraph summary and its README.

All are written from the model's record, so a package says how its model was made: patch,
sampling, normalisation, training data, steps and seed (the whole record is also in the
package's ``config.srdvol``). The files it names are written by :mod:`srdvol.model.zoo`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from srdvol.model.checkpoint import ModelRecord

__all__ = [
    "INPUT_ID",
    "OUTPUT_ID",
    "describe",
    "documentation",
    "min_frame_size",
    "package_content",
]

#: Tensor ids in the package.
INPUT_ID = "raw"
OUTPUT_ID = "denoised"
#: The SRDTrans paper, cited by every package.
_CITATION = {
    "text": "Li et al., Spatial redundancy transformer for self-supervised fluorescence image "
    "denoising, Nature Computational Science (2023)",
    "doi": "10.1038/s43588-023-00568-2",
}
_TAGS = [
    "denoising",
    "self-supervised",
    "fluorescence-light-microscopy",
    "calcium-imaging",
    "time-series",
    "transformer",
    "srdtrans",
    "srdvol",
    "pytorch",
    "torchscript",
]


def min_frame_size(record: ModelRecord) -> int:
    """Smallest y and x the package declares: one Swin attention window."""
    return int(record.network.window)


def _patch(record: ModelRecord) -> str:
    return ",".join(str(v) for v in record.patch)


def _data(record: ModelRecord) -> str:
    """The training data in a few words: dims, shape and dtype when recorded."""
    data = record.training_data
    dims, shape, dtype = data.get("dims"), data.get("shape"), data.get("dtype")
    if not shape:
        return "unrecorded data"
    size = "x".join(str(n) for n in shape)
    return f"{dtype or ''} {dims or ''} {size}".replace("  ", " ").strip()


def describe(record: ModelRecord) -> str:
    """The package's ``description``: one paragraph, under the zoo's 512 characters."""
    stats = record.normalization
    text = (
        f"Self-supervised SRDTrans denoiser for fluorescence time series, trained by srdvol "
        f"{record.srdvol_version} on {_data(record)} ({record.sampling} redundancy sampling, "
        f"{record.steps} steps, patch t,y,x {_patch(record)}). Takes raw intensities in "
        f"blocks of {record.network.patch_t} frames of any frame size and returns denoised "
        f"intensities in the same units (normalised inside with the training data's mean "
        f"{stats.mean:.6g} and std {stats.std:.6g})."
    )
    return text[:512]


def _row(key: str, value: Any) -> str:
    return f"| {key} | {value} |"


def _training_rows(record: ModelRecord) -> list[str]:
    data = record.training_data
    stats = record.normalization
    rows = [
        _row("method", "SRDTrans (Li et al. 2023), self-supervised: no clean data"),
        _row("sampling", f"{record.sampling} redundancy"),
        _row("patch (t, y, x)", _patch(record)),
        _row("steps", record.steps),
        _row("seed", record.seed),
        _row("normalisation", f"global mean {stats.mean:.8g}, std {stats.std:.8g}"),
        _row("training data", f"`{data.get('source', 'not recorded')}`"),
        _row("data dims, shape, dtype", _data(record)),
    ]
    for key in ("level", "batch_size", "lr", "final_loss"):
        if data.get(key) is not None:
            rows.append(_row(key.replace("_", " "), data[key]))
    rows += [
        _row("network", record.network.model_dump(mode="json")),
        _row("written", f"{record.created} by srdvol {record.srdvol_version}"),
        _row("weights SHA-256 (srdvol file)", f"`{record.weights_sha256}`"),
    ]
    return rows


def documentation(record: ModelRecord, *, name: str) -> str:
    """The package's ``README.md``: what the model is, how it was trained, how to run it and
    how it was validated."""
    t = record.network.patch_t
    side = record.network.window
    stats = record.normalization
    lines = [
        f"# {name}",
        "",
        "A self-supervised SRDTrans denoiser for fluorescence time series (calcium imaging and",
        "similar recordings), trained and exported by srdvol. It learns from the noisy",
        "recording itself, without clean ground truth.",
        "",
        "## Input and output",
        "",
        f"- `raw`: axes (batch, channel, time, y, x), one channel, exactly {t} frames, frames",
        f"  of any size from {side}x{side} pixels (step 1), raw intensities in any units.",
        "- `denoised`: the same shape, denoised intensities in the units of the input.",
        "- Preprocessing: `fixed_zero_mean_unit_variance` with the global mean",
        f"  {stats.mean:.8g} and standard deviation {stats.std:.8g} of the training data;",
        "  postprocessing: `scale_linear` with gain = that std and offset = that mean, back to",
        "  input units. These are srdvol's own statistics, computed once from the training",
        "  data (never per block, which would make the baseline jump between blocks).",
        "  A recording with another intensity range is denoised off-scale: retrain on it.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        *_training_rows(record),
        "",
        "## Running it",
        "",
        f"The network denoises blocks of {t} frames. A movie of a multiple of {t} frames",
        f"runs whole (each block of {t} frames on its own); any other length runs in blocks.",
        "With bioimageio.core in Python, for a movie `movie` of shape (t, y, x):",
        "",
        "```python",
        "import xarray as xr",
        "from bioimageio.core import predict",
        "",
        'raw = xr.DataArray(movie[None, None], dims=("batch", "channel", "time", "y", "x"))',
        "result = predict(",
        '    model="this-package.zip",',
        '    inputs={"raw": raw},',
        "    input_block_shape={",
        f'        "raw": {{"batch": 1, "channel": 1, "time": {t}, "y": movie.shape[1],',
        '                "x": movie.shape[2]}',
        "    },",
        ")",
        'denoised = result.members["denoised"].data.values[0, 0]',
        "```",
        "",
        "Name the axes (a bare array whose shape does not fit may have its axes reordered by",
        "bioimageio.core to make it fit). Blocks are not overlapped or blended here, so frames",
        "near block borders differ slightly from srdvol's own `srdvol predict`, which overlaps",
        "patches and blends them (and runs out of core on OME-Zarr). Whole frames in y and x",
        "give srdvol's network output for each block; tiles in y and x show seams.",
        "",
        "The package holds the network alone, the output of `srdvol predict --anchor 0`.",
        "srdvol's default, `--anchor 4`, also keeps the recording's own intensities at",
        "scales above a Gaussian of 4 pixels, which keeps cell-trace amplitudes after short",
        "trainings; the same on the result above (srdvol anchors each patch before blending",
        "them; the two differ by under 0.01 dB):",
        "",
        "```python",
        "from scipy.ndimage import gaussian_filter",
        "",
        'denoised += gaussian_filter(movie - denoised, sigma=(0, 4, 4), mode="mirror")',
        "```",
        "",
        "On the command line, `bioimageio test this-package.zip` checks the package and",
        "`bioimageio predict --inputs movie.tif --outputs denoised.tif this-package.zip` runs",
        f"it on a (t, y, x) TIFF of a multiple of {t} frames; add `--blockwise N` for blocks of",
        f"{t} frames and {side}+N pixels in y and x.",
        "",
        "## Validation",
        "",
        "The test input (`test_input.npy`) with the test output (`test_output.npy`) that",
        "srdvol's own network computed before the export: the package's TorchScript weights",
        "and processing steps reproduce it (`bioimageio test`). The export also checked the",
        "TorchScript weights against srdvol's network on another batch and frame size.",
        "Denoising quality is not measured by this test: without clean ground truth, judge",
        "it on data of the same kind with known truth, for example `srdvol simulate` with",
        "`srdvol evaluate` (SNR, PSNR, SSIM, trace correlation), or by eye against the raw",
        "recording.",
        "",
    ]
    return "\n".join(lines)


def _tensor_axes(record: ModelRecord, *, output: bool) -> list[dict[str, Any]]:
    t = record.network.patch_t
    space = {"min": min_frame_size(record), "step": 1}
    axes: list[dict[str, Any]] = [
        {"type": "batch"},
        {"type": "channel", "channel_names": ["fluorescence"]},
        {"type": "time", "size": t},
        {"type": "space", "id": "y", "size": space},
        {"type": "space", "id": "x", "size": space},
    ]
    if output:  # same size as the input on every axis
        for axis in axes[2:]:
            axis["size"] = {"tensor_id": INPUT_ID, "axis_id": axis.get("id", axis["type"])}
    return axes


def package_content(
    record: ModelRecord, *, name: str, authors: Sequence[str], license: str
) -> dict[str, Any]:
    """The model description (the package's ``rdf.yaml``) as plain data."""
    from bioimageio.spec.model.v0_5 import ModelDescr

    stats = record.normalization
    return {
        "type": "model",
        "format_version": ModelDescr.implemented_format_version,
        "name": name,
        "description": describe(record),
        "authors": [{"name": a} for a in authors],
        "cite": [_CITATION],
        "license": license,
        "tags": _TAGS,
        "documentation": {"source": "README.md"},
        "inputs": [
            {
                "id": INPUT_ID,
                "description": "raw fluorescence intensities, one (t, y, x) movie per sample",
                "axes": _tensor_axes(record, output=False),
                "data": {"type": "float32"},
                "test_tensor": {"source": "test_input.npy"},
                "sample_tensor": {"source": "sample_input.tif"},
                "preprocessing": [
                    {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
                    {
                        "id": "fixed_zero_mean_unit_variance",
                        "kwargs": {"mean": stats.mean, "std": stats.std},
                    },
                ],
            }
        ],
        "outputs": [
            {
                "id": OUTPUT_ID,
                "description": "denoised intensities in the input's units",
                "axes": _tensor_axes(record, output=True),
                "data": {"type": "float32"},
                "test_tensor": {"source": "test_output.npy"},
                "sample_tensor": {"source": "sample_output.tif"},
                "postprocessing": [
                    {"id": "scale_linear", "kwargs": {"gain": stats.std, "offset": stats.mean}}
                ],
            }
        ],
        "weights": {
            "torchscript": {
                "source": "weights.pt",
                "pytorch_version": torch.__version__.split("+")[0],
                "comment": "traced from srdvol's SRDTrans network; any batch and frame size",
            }
        },
        "config": {"srdvol": record.model_dump(mode="json")},
    }
