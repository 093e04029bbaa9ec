"""``srdvol info``: what an image is, what ``srdvol denoise`` would do with it and what that
costs and writes; or a model file's record."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from srdvol.core.cast import cast_to
from srdvol.errors import as_flags, flag
from srdvol.ngff.formats import format_for
from srdvol.ngff.write import output_chunks, output_dtype
from srdvol.options import RunOptions

__all__ = ["info_text"]


def info_text(source: str | os.PathLike[str], options: RunOptions | None = None) -> str:
    """Describe an image and what ``srdvol denoise`` would do with it, or, for a model file, its
    record (network, patch, sampling, normalisation, training data).

    For an image: the training patch (and any padding), the block plan and what it costs (model
    voxels per output voxel, bytes read per input byte, blocks, dask tasks), the workers, and
    what will be written: dtype, NGFF version, chunks, compression, every pyramid level, size.
    ``options`` gives the patch, overlap, block, output dtype and NGFF version, and which array
    of the input to read.
    """
    options = options or RunOptions()
    read, predict = options.read, options.predict
    ngff = options.output.ngff.value
    if os.fspath(source).endswith(".safetensors"):
        return _model_text(source)
    from srdvol.ngff.read import describe_image

    facts = describe_image(source, **read.open_options())
    dims = tuple(facts["axes"])
    shape = tuple(facts["shape"][a] for a in dims)
    chunks = tuple(facts["chunks"][a] for a in dims)
    lines = [
        f"image      {facts['source']}",
        f"format     NGFF {facts.get('ngff_version') or '- (plain Zarr array)'}, "
        f"level {facts['level']} of {facts['levels']}",
        f"axes       {''.join(dims)}   shape {shape}   dtype {facts['dtype']}",
        f"chunks     {chunks}",
        f"scale      {_format_axes(facts.get('scale'), facts.get('axes_units'))}",
        f"size       {_bytes(facts['nbytes'])} in memory, {_bytes(facts['bytes_on_disk'])} on disk",
        f"movies     {facts['movies']} independent (t, y, x) movie(s) (one per c, z plane)",
    ]
    missing = facts.get("missing_chunks")
    if missing is None:
        lines.append("chunks     the store cannot list its chunks (missing ones are not detected)")
    elif missing.count:
        lines.append(
            f"missing    {missing.describe()}: read as the fill value {missing.fill_value}; "
            f"train, predict and denoise stop unless {flag('allow_missing_chunks')}"
        )
    for problem in facts.get("problems") or []:
        lines.append(f"problem    {problem}")
    if facts.get("problems"):
        return as_flags("\n".join(lines))
    from srdvol.ngff.read import open_image

    # describe_image has listed the chunks already (and reported missing ones above).
    image = open_image(source, **read.open_options())
    out_dtype = output_dtype(options.output.dtype, image)
    shape = dict(zip((str(d) for d in image.dims), image.shape, strict=True))
    out_chunks = output_chunks(shape, dtype=out_dtype, chunks=options.output.chunk_map())
    patch = predict.patch or options.train.patch_or_default()
    lines += _denoise_lines(
        image,
        patch=patch,
        block=predict.block,
        overlap=predict.overlap,
        chunks=out_chunks,
        tta=predict.tta,
        anchor=predict.anchor,
        guide=predict.guide,
        restore=predict.restore,
    )
    lines += _output_lines(
        image, dtype=out_dtype, ngff=ngff, chunks=out_chunks, compression=options.output.compression
    )
    return as_flags("\n".join(lines))


def _denoise_lines(
    image: Any,
    *,
    patch: tuple[int, int, int],
    block: tuple[int, int, int] | None,
    overlap: float,
    chunks: dict[str, int],
    tta: bool = False,
    anchor: float = 0.0,
    guide: int = 0,
    restore: int = 0,
) -> list[str]:
    """Training patch and padding, block plan, its cost, workers."""
    from srdvol.core.cost import plan_cost
    from srdvol.dask.gpus import visible_gpus

    sizes = dict(zip(("t", "y", "x"), patch, strict=True))
    plan = _block_plan(image, sizes=sizes, block=block, overlap=overlap, chunks=chunks)
    cost = plan_cost(plan)
    tasks, exact = _task_count(image, plan, overlap=overlap)
    lines = [
        "denoise would:",
        f"  train      patch {tuple(sizes.values())} (t, y, x), spatial-redundancy sampling",
    ]
    lines += _padding_lines(image, sizes)
    blocks = math.prod(plan.nblocks)
    passes, tta_note = (8, ", each run 8 times") if tta else (1, "")
    about = "" if exact else "about "
    sized = ""
    if not block:
        from srdvol.dask.budget import local_budget

        budget = local_budget()
        sized = (
            f", sized for {_bytes(budget.host)} of block memory per worker (of "
            f"{_bytes(budget.worker_host)})"
        )
    lines += [
        f"  predict    overlap {overlap:g}, lattice stride {tuple(plan.stride.values())} (t, y, x)",
        f"             blocks: {blocks} of {''.join(plan.dims)} {plan.block_shape} plus a halo "
        f"{plan.depth} on the high side{sized}",
        f"             {about}{tasks} dask tasks in the graph, plus one write task per block",
        "             output: "
        + (
            f"the network's fine detail on the input's own levels above a Gaussian of "
            f"{anchor:g} px (--anchor{', shaped like the mean image' if guide else ''})"
            if anchor
            else _restore_text(image, restore, chunks)
            if restore
            else "the network's own output (--anchor 0)"
        )
        + ("; --tta: every patch in the 8 turns and mirrors of (y, x)" if tta else "")
        + (
            f"; --guide: each frame's activity filtered in windows of radius {guide} px with "
            f"the mean image of {_guide_frame_count(image)} input frames, read first"
            if guide
            else ""
        ),
        f"  cost       {passes * cost.lattice_ratio:.2f} model voxels per output voxel in one "
        f"whole-array pass (lattice patches: {cost.lattice_patches}{tta_note})",
        f"             {passes * cost.computed_ratio:.2f} as computed now: each lattice patch "
        f"once, by the block its start falls in (patches run: {cost.computed_patches})",
        f"             {cost.read_ratio:.2f} bytes read per input byte (a block's halo is its "
        "neighbours' input, kept until they run)",
        f"             {cost.region_ratio:.2f} input voxels per output voxel in block regions, "
        f"{cost.spill_ratio:.2f} passed between blocks as float64 sums",
    ]
    gpus = visible_gpus()
    lines.append(
        f"  workers    {len(gpus)} GPU worker(s): {', '.join(gpus)}"
        if gpus
        else "  workers    CPU workers (no GPU visible)"
    )
    return lines


def _block_plan(
    image: Any,
    *,
    sizes: dict[str, int],
    block: tuple[int, int, int] | None,
    overlap: float,
    chunks: dict[str, int],
) -> Any:
    """The block plan ``srdvol predict`` will use: blocks aligned to the output's chunks, sized
    to a local worker's memory unless ``block`` is given."""
    from srdvol.core.tiling import BlockMemory, plan_blocks
    from srdvol.dask.budget import local_budget

    dims = tuple(str(d) for d in image.dims)
    budget = local_budget()
    return plan_blocks(
        image.shape,
        dims=dims,
        patch=sizes,
        overlap=overlap,
        chunks=tuple(chunks[d] for d in dims),
        block=dict(zip(("t", "y", "x"), block, strict=True)) if block else None,
        memory=BlockMemory(budget.host, budget.device),
        itemsize=image.dtype.itemsize,
    )


#: Above this many blocks, ``info`` counts the dask tasks of a corner of the image and scales
#: them (building a terabyte's whole graph takes tens of seconds); the corner's edge blocks have
#: fewer neighbours, so the figure is a slight underestimate.
_EXACT_TASK_BLOCKS = 4096


def _task_count(image: Any, plan: Any, *, overlap: float) -> tuple[int, bool]:
    """Tasks of the lazy denoise graph (exact, or scaled from a corner of the image)."""
    import dask.array as da

    from srdvol.dask.graph import denoise
    from srdvol.predict.predictors import AffineModel

    blocks = math.prod(plan.nblocks)
    data = image.data
    exact = blocks <= _EXACT_TASK_BLOCKS
    if not exact:
        # The first four blocks along every axis, cut as in the full plan, over a stand-in with
        # the input's storage chunks (slicing the real array would keep its whole read layer).
        corner = tuple(sum(c[:4]) for c in plan.chunks)
        data = da.zeros(corner, chunks=data.chunksize, dtype=data.dtype)
    movie_block = {a: n for a, n in zip(plan.dims, plan.block_shape, strict=True) if a in "tyx"}
    lazy = denoise(
        data,
        AffineModel(),
        patch=tuple(plan.patch.values()),
        overlap=overlap,
        block=movie_block,
        dims="".join(plan.dims),
        chunks=tuple(c[0] for c in plan.chunks),
    )
    tasks = len(lazy.__dask_graph__())
    if exact:
        return tasks, True
    return round(tasks / math.prod(lazy.numblocks) * blocks), False


def _padding_lines(image: Any, sizes: dict[str, int]) -> list[str]:
    """Say which axes are shorter than the patch (reflect-padded, or too few frames to train)."""
    lines = []
    short = [a for a in ("y", "x") if image.sizes[a] < sizes[a]]
    if short:
        grown = ", ".join(f"{a} {image.sizes[a]} -> {sizes[a]}" for a in short)
        lines += [
            f"  padding    {grown} (reflect): the frame is smaller than the patch; training and",
            "             prediction run on padded patches, and model voxels count the padding",
        ]
    frames = int(image.sizes["t"])
    if frames < sizes["t"]:
        fit = frames // 16 * 16
        lines += [
            f"  problem    the movie has {frames} frames, fewer than patch_t {sizes['t']}, so "
            "training would stop;",
            f"             use {flag('patch')} {fit},{sizes['y']},{sizes['x']} (patch_t a "
            f"multiple of 16, at most {frames}); prediction pads t",
        ]
    return lines


def _output_lines(
    image: Any, *, dtype: Any, ngff: str, chunks: dict[str, int], compression: int
) -> list[str]:
    """What ``srdvol predict`` will write: dtype, format, chunks, codec, levels and size."""
    from srdvol.ngff.write import pyramid_shapes

    dims = tuple(str(d) for d in image.dims)
    shape = tuple(int(n) for n in image.shape)
    fmt = format_for(ngff)
    codec = _codec_text(fmt.compressor(compression) if compression else None)
    chunks = tuple(chunks[d] for d in dims)
    # write_pyramid gives every level the chunks of s0, cut to the level's shape.
    levels = [(shape, chunks)] + [
        (level, tuple(min(c, n) for c, n in zip(chunks, level, strict=True)))
        for level in pyramid_shapes(shape, dims)
    ]
    raw = sum(math.prod(level) for level, _ in levels) * dtype.itemsize
    fraction = _stored_fraction(image, dtype=dtype, chunks=chunks, fmt=fmt, compression=compression)
    lines = [f"  write      {dtype} OME-Zarr, NGFF {ngff} (Zarr v{fmt.zarr_format}), {codec}"]
    for k, (level, level_chunks) in enumerate(levels):
        label = "levels" if k == 0 else ""
        lines.append(f"  {label:<10} s{k} {level} in chunks {level_chunks}")
    lines += [
        f"  size       {_bytes(raw)} uncompressed (all levels), about {_bytes(raw * fraction)} "
        "on disk",
        "             (estimate: one input chunk, smoothed like denoised data, compressed as "
        "written)",
    ]
    return lines


def _codec_text(codec: Any) -> str:
    """The output's compressor (its format object's) in words."""
    if codec is None:
        return "uncompressed"
    cname = getattr(codec.cname, "value", codec.cname)
    shuffle = getattr(codec.shuffle, "value", codec.shuffle)
    shuffle = {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}.get(shuffle, shuffle)
    return f"blosc-{cname} level {codec.clevel}, {shuffle}"


def _stored_fraction(
    image: Any, *, dtype: Any, chunks: tuple[int, ...], fmt: Any, compression: int
) -> float:
    """Stored bytes per raw byte for one output chunk of stand-in data.

    Denoised data is smooth, so a Gaussian-smoothed chunk from the middle of the recording,
    cast to the output dtype and written with the output's codec, stands in for it.
    """
    import tempfile
    from pathlib import Path

    import numpy as np
    import zarr
    from scipy import ndimage

    dims = tuple(str(d) for d in image.dims)
    middle = tuple(
        slice(n // 2 // c * c, min(n // 2 // c * c + c, n)) if a == "t" else slice(0, c)
        for a, n, c in zip(dims, image.shape, chunks, strict=True)
    )
    sample = np.asarray(image.data[middle], dtype=np.float64)
    sigma = [1.0 if a in ("t", "y", "x") else 0.0 for a in dims]
    smooth = cast_to(ndimage.gaussian_filter(sample, sigma), dtype)
    with tempfile.TemporaryDirectory() as folder:
        array = zarr.create_array(
            Path(folder) / "sample.zarr",
            shape=smooth.shape,
            chunks=smooth.shape,
            dtype=dtype,
            fill_value=0,
            zarr_format=fmt.zarr_format,
            **fmt.array_kwargs(dims, compression=compression),
        )
        array[...] = smooth
        stored = array.nbytes_stored() - _metadata_bytes(Path(folder) / "sample.zarr")
    return stored / (smooth.size * dtype.itemsize)


def _metadata_bytes(root: Any) -> int:
    names = {"zarr.json", ".zarray", ".zattrs", ".zgroup"}
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and f.name in names)


def _model_text(path: str | os.PathLike[str]) -> str:
    import json

    from srdvol.model.checkpoint import model_checksum, read_record

    record = read_record(path).model_dump(mode="json")
    lines = [f"model      {os.fspath(path)}", f"sha256     {model_checksum(path)}"]
    lines += [f"{key:<10} {json.dumps(value)}" for key, value in record.items()]
    return "\n".join(lines)


def _format_axes(values: Mapping[str, Any] | None, units: Mapping[str, Any] | None) -> str:
    if not values:
        return "-"
    units = units or {}
    return ", ".join(
        f"{a}={v:g}{' ' + units[a] if units.get(a) else ''}" for a, v in values.items()
    )


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _restore_text(image: Any, restore: int, chunks: dict[str, int]) -> str:
    from srdvol.dask.restoring import stretches
    from srdvol.predict.restore import RESTORE_TILE

    lengths = stretches(int(image.sizes["t"]), int(chunks.get("t", 1)))
    span = f"{lengths[0]}" if len(set(lengths)) == 1 else f"{min(lengths)}-{max(lengths)}"
    return (
        f"the network's output with the transients' amplitude put back (--restore: "
        f"{restore} activity patterns per {RESTORE_TILE}-px tile, fitted to the input over "
        f"{len(lengths)} stretch(es) of {span} frames)"
    )


def _guide_frame_count(image: Any) -> int:
    from srdvol.predict.guide import guide_frames

    chunks = image.chunksizes.get("t") if image.chunks else None
    return len(guide_frames(int(image.sizes["t"]), chunks))
