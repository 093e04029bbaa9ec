"""``srdvol export``: a trained model as a BioImage Model Zoo package.

The package itself is built by :mod:`srdvol.model.zoo`; this face checks the output location
first, reads the optional ``--sample`` image (an OME-Zarr image whose first patch becomes the
package's test input) and says what was written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from srdvol.app.say import say
from srdvol.errors import DataError

__all__ = ["run_export", "sample_movie"]


def sample_movie(source: str | os.PathLike[str], record: Any) -> np.ndarray:
    """The first ``patch_t`` frames of an image's first (channel, z) plane, cropped in y and x
    around the centre to the model's training patch.

    Parameters
    ----------
    source
        An OME-Zarr image (or anything :func:`srdvol.ngff.read.open_image` opens).
    record
        The model's :class:`~srdvol.model.checkpoint.ModelRecord`.

    Returns
    -------
    numpy.ndarray
        ``(patch_t, y, x)`` in the image's dtype.

    Raises
    ------
    DataError
        If the image has fewer frames than the model's ``patch_t``.
    """
    from srdvol.ngff.read import open_image

    image = open_image(source)
    image = image.isel({dim: 0 for dim in image.dims if dim not in ("t", "y", "x")})
    t, y, x = record.patch
    frames = int(image.sizes["t"])
    if frames < t:
        raise DataError(
            source,
            f"has {frames} frames and the model takes blocks of {t}",
            f"give an image with at least {t} frames as the sample",
        )
    side = int(record.network.window)
    crop = {}
    for dim, size in (("y", y), ("x", x)):
        length = int(image.sizes[dim])
        want = min(length, max(size, side))
        start = (length - want) // 2
        crop[dim] = slice(start, start + want)
    return np.asarray(image.transpose("t", "y", "x").isel(t=slice(0, t), **crop).values)


def run_export(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    sample: str | os.PathLike[str] | None = None,
    name: str | None = None,
    authors: Sequence[str] | None = None,
    license: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Check, build and write the package; say where it went and how to check it.

    Raises
    ------
    SrdvolError
        One sentence for a bad model, output path, option or sample (nothing is written).
    """
    from srdvol.model.checkpoint import read_record
    from srdvol.model.zoo import check_package_path, export_package
    from srdvol.ngff.storecheck import probe_writable
    from srdvol.values import DEFAULT_LICENSE

    check_package_path(out, model_path=model, overwrite=overwrite)
    record = read_record(model)
    probe_writable(out)
    movie = sample_movie(sample, record) if sample is not None else None
    written = export_package(
        model,
        out,
        name=name,
        authors=authors,
        license=license or DEFAULT_LICENSE,
        sample=movie,
        overwrite=overwrite,
    )
    test = "a patch of " + os.fspath(sample) if sample is not None else "noise"
    say(
        f"BioImage Model Zoo package written to {written} (TorchScript weights, "
        f"{record.network.patch_t} frames per block, test input: {test}); check it with: "
        f"bioimageio test {os.fspath(out)}"
    )
    return written
