"""What each command does, end to end: validate, then train and/or predict, then report.

The command line (:mod:`srdvol.app.cli`) only parses options and calls these functions; examples and
notebooks may call them too. Everything is validated before anything is written: the input is
opened and checked, the output path is checked against the input and against an existing output
of another run, and only then does training or writing start.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distributed import WorkerPlugin
from rich.console import Console

__all__ = [
    "DEFAULT_OVERLAP",
    "default_model_path",
    "info_text",
    "run_demo",
    "run_denoise",
    "run_evaluate",
    "run_predict",
    "run_simulate",
    "run_train",
]

console = Console(stderr=True, highlight=False)

DEFAULT_OVERLAP = 0.25
#: The demo: a small 0.3 Hz recording that trains and denoises in minutes on a laptop CPU
#: (photons 2: noisy about 5 dB, the best oracle-tuned Gaussian filter about 15.6 dB). 200 steps
#: of 2 patches gained 11.5 dB on 2 CPU cores (300 steps of 4 gained 11.7 dB in 2.7x the time;
#: batch 1 is no cheaper, it falls off oneDNN's convolution path); see benchmarks/RESULTS.md.
#: One torch thread in the worker: two threads on two busy cores ran a step 5x slower.
DEMO: dict[str, Any] = {
    "frames": 96,
    "size": (96, 96),
    "photons": 2.0,
    "patch": (16, 64, 64),
    "steps": 200,
    "batch_size": 2,
    "threads": 1,
}


def _say(text: str) -> None:
    console.print(text, soft_wrap=True)


def _open_input(
    source: str | os.PathLike[str], read: Mapping[str, Any], *, allow_missing_chunks: bool = False
) -> Any:
    """Open and check the input, including one listing of its chunks (missing chunks are an
    error unless allowed; then a warning with their count and positions)."""
    from srdvol.ngff.read import open_image
    from srdvol.ngff.storecheck import check_chunks

    image = open_image(
        source, level=read.get("level", 0), axes=read.get("axes"), channel=read.get("channel")
    )
    found = check_chunks(image, allow_missing=allow_missing_chunks)
    if found is None:
        _say(
            f"srdvol: note: {os.fspath(source)}: the store cannot list its chunks, so missing "
            "chunks (read as the fill value) cannot be detected"
        )
    elif found.count:
        _say(
            f"srdvol: warning: {found.array}: {found.describe()}; --allow-missing-chunks reads "
            f"{'it' if found.count == 1 else 'them'} as the fill value {found.fill_value}"
        )
    return image


def default_model_path(out: str | os.PathLike[str]) -> Path:
    """Where ``srdvol denoise`` keeps the model it trains: beside OUT (or in the working folder
    when OUT is a URL), named ``<OUT name>.model.safetensors``."""
    text = os.fspath(out).rstrip("/")
    name = text.rsplit("/", 1)[-1]
    stem = name[: -len(".zarr")] if name.endswith(".zarr") else name
    folder = Path(text).parent if "://" not in text else Path.cwd()
    return folder / f"{stem}.model.safetensors"


# ---------------------------------------------------------------------------------------------
# info, simulate, evaluate


def info_text(
    source: str | os.PathLike[str],
    *,
    patch: tuple[int, int, int] | None = None,
    block: tuple[int, int, int] | None = None,
    overlap: float = DEFAULT_OVERLAP,
    dtype: str = "float32",
    ngff: str = "0.5",
    level: int = 0,
    channel: int | None = None,
    axes: str | None = None,
) -> str:
    """Describe an image and what ``srdvol denoise`` would do with it, or, for a model file, its
    record (network, patch, sampling, normalisation, training data).

    For an image: the training patch (and any padding), the block plan and what it costs (model
    voxels per output voxel, bytes read per input byte, blocks, dask tasks), the workers, and
    what will be written: dtype, NGFF version, chunks, compression, every pyramid level, size.
    """
    if os.fspath(source).endswith(".safetensors"):
        return _model_text(source)
    from srdvol.ngff.read import describe_image

    facts = describe_image(source, level=level, axes=axes, channel=channel)
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
            "train, predict and denoise stop unless --allow-missing-chunks"
        )
    for problem in facts.get("problems") or []:
        lines.append(f"problem    {problem}")
    if facts.get("problems"):
        return "\n".join(lines)
    from srdvol.ngff.read import open_image

    # describe_image has listed the chunks already (and reported missing ones above).
    image = open_image(source, level=level, axes=axes, channel=channel)
    out_dtype = _check_output_options(image, dtype=dtype, ngff=ngff)
    lines += _denoise_lines(image, patch=patch, block=block, overlap=overlap, dtype=out_dtype)
    lines += _output_lines(image, dtype=out_dtype, ngff=ngff)
    return "\n".join(lines)


def _check_output_options(image: Any, *, dtype: str, ngff: str) -> Any:
    """Refuse what create_output would refuse; return the output dtype ``--dtype`` asks for."""
    import numpy as np

    from srdvol.errors import ConfigError
    from srdvol.ngff.write import NGFF_VERSIONS

    if ngff not in NGFF_VERSIONS:
        raise ConfigError(
            "--ngff", f"NGFF version {ngff!r} is not supported", "use --ngff 0.5 or --ngff 0.4"
        )
    try:
        out = np.dtype(image.dtype if dtype == "input" else dtype)
    except TypeError:
        out = np.dtype("c8")  # refused just below, with the same message
    if out.kind not in "iuf":
        raise ConfigError(
            "--dtype",
            f"output dtype {dtype!r} is not an integer or real float",
            "use --dtype float32 or --dtype input",
        )
    return out


def _denoise_lines(
    image: Any,
    *,
    patch: tuple[int, int, int] | None,
    block: tuple[int, int, int] | None,
    overlap: float,
    dtype: Any,
) -> list[str]:
    """Training patch and padding, block plan, its cost, workers."""
    from srdvol.core.tiling import plan_cost
    from srdvol.dask.cluster import visible_gpus
    from srdvol.training.loop import DEFAULT_PATCH

    sizes = dict(zip(("t", "y", "x"), patch or DEFAULT_PATCH, strict=True))
    plan = _block_plan(image, sizes=sizes, block=block, overlap=overlap, dtype=dtype)
    cost = plan_cost(plan)
    tasks, exact = _task_count(image, plan, overlap=overlap)
    lines = [
        "denoise would:",
        f"  train      patch {tuple(sizes.values())} (t, y, x), spatial-redundancy sampling",
    ]
    lines += _padding_lines(image, sizes)
    blocks = math.prod(plan.nblocks)
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
        f"  cost       {cost.lattice_ratio:.2f} model voxels per output voxel in one whole-array "
        f"pass (lattice patches: {cost.lattice_patches})",
        f"             {cost.computed_ratio:.2f} as computed now: each lattice patch once, by the "
        f"block its start falls in (patches run: {cost.computed_patches})",
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
    dtype: Any,
) -> Any:
    """The block plan ``srdvol predict`` will use: blocks aligned to the output's chunks, sized
    to a local worker's memory unless ``block`` is given."""
    from srdvol.core.tiling import plan_blocks
    from srdvol.dask.budget import local_budget
    from srdvol.ngff.write import output_chunks

    dims = tuple(str(d) for d in image.dims)
    out_chunks = output_chunks(dict(zip(dims, image.shape, strict=True)), dtype=dtype)
    budget = local_budget()
    return plan_blocks(
        image.shape,
        dims=dims,
        patch=sizes,
        overlap=overlap,
        chunks=tuple(out_chunks.values()),
        block=dict(zip(("t", "y", "x"), block, strict=True)) if block else None,
        memory=budget.host,
        device_memory=budget.device,
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
            f"             use --patch {fit},{sizes['y']},{sizes['x']} (patch_t a multiple of 16, "
            f"at most {frames}); prediction pads t",
        ]
    return lines


def _output_lines(image: Any, *, dtype: Any, ngff: str) -> list[str]:
    """What ``srdvol predict`` will write: dtype, format, chunks, codec, levels and size."""
    from srdvol.ngff.write import output_chunks, pyramid_shapes

    dims = tuple(str(d) for d in image.dims)
    shape = tuple(int(n) for n in image.shape)
    chunks = tuple(output_chunks(dict(zip(dims, shape, strict=True)), dtype=dtype).values())
    zarr_format = 3 if ngff == "0.5" else 2
    codec = _codec_text(zarr_format, dims)
    # write_pyramid gives every level the chunks of s0, cut to the level's shape.
    levels = [(shape, chunks)] + [
        (level, tuple(min(c, n) for c, n in zip(chunks, level, strict=True)))
        for level in pyramid_shapes(shape, dims)
    ]
    raw = sum(math.prod(level) for level, _ in levels) * dtype.itemsize
    fraction = _stored_fraction(image, dtype=dtype, chunks=chunks, zarr_format=zarr_format)
    lines = [f"  write      {dtype} OME-Zarr, NGFF {ngff} (Zarr v{zarr_format}), {codec}"]
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


def _codec_text(zarr_format: int, dims: tuple[str, ...]) -> str:
    """The output's compressor in words, from the settings srdvol.ngff.write writes with."""
    from srdvol.ngff.write import _array_kwargs

    codec = _array_kwargs(zarr_format, dims)["compressors"]
    cname = getattr(codec.cname, "value", codec.cname)
    shuffle = getattr(codec.shuffle, "value", codec.shuffle)
    shuffle = {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}.get(shuffle, shuffle)
    return f"blosc-{cname} level {codec.clevel}, {shuffle}"


def _stored_fraction(image: Any, *, dtype: Any, chunks: tuple[int, ...], zarr_format: int) -> float:
    """Stored bytes per raw byte for one output chunk of stand-in data.

    Denoised data is smooth, so a Gaussian-smoothed chunk from the middle of the recording,
    cast to the output dtype and written with the output's codec, stands in for it.
    """
    import tempfile
    from pathlib import Path

    import numpy as np
    import zarr
    from scipy import ndimage

    from srdvol.ngff.write import _array_kwargs

    dims = tuple(str(d) for d in image.dims)
    middle = tuple(
        slice(n // 2 // c * c, min(n // 2 // c * c + c, n)) if a == "t" else slice(0, c)
        for a, n, c in zip(dims, image.shape, chunks, strict=True)
    )
    sample = np.asarray(image.data[middle], dtype=np.float64)
    sigma = [1.0 if a in ("t", "y", "x") else 0.0 for a in dims]
    smooth = ndimage.gaussian_filter(sample, sigma)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        smooth = np.clip(np.rint(smooth), info.min, info.max)
    with tempfile.TemporaryDirectory() as folder:
        array = zarr.create_array(
            Path(folder) / "sample.zarr",
            shape=smooth.shape,
            chunks=smooth.shape,
            dtype=dtype,
            fill_value=0,
            zarr_format=zarr_format,
            **_array_kwargs(zarr_format, dims),
        )
        array[...] = smooth.astype(dtype)
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


def run_simulate(out: str, *, truth: str, **options: Any) -> Any:
    """``srdvol simulate``: write a noisy recording and its ground truth; print a summary."""
    from srdvol.simulate.scene import simulate

    info = simulate(out, truth=truth, **options)
    _say(
        f"wrote {info.out} (noisy, {info.dims} {info.shape}) and {info.truth} (truth, "
        f"{info.n_cells} cells), {info.rate_hz:g} Hz, {info.photons:g} photons"
    )
    return info


def run_evaluate(
    out: str, *, truth: str, noisy: str | None = None, report: str | os.PathLike[str] | None = None
) -> str:
    """``srdvol evaluate``: metrics of OUT (and of the noisy input) against the truth."""
    from srdvol.core.metrics import evaluate_stores, format_metrics

    result = evaluate_stores(out, truth=truth, noisy=noisy)
    if report is not None:
        from srdvol.app.report import write_report

        write_report(report, estimate=out, truth=truth, noisy=noisy, metrics=result)
        _say(f"report written to {report}")
    return format_metrics(result)


# ---------------------------------------------------------------------------------------------
# train, predict, denoise


@contextmanager
def _cluster(cluster: Mapping[str, Any] | None, client: Any = None) -> Iterator[Any]:
    """Yield ``client`` if given, else open the cluster the options ask for and print the
    dashboard link first thing, so users can watch from the start."""
    if client is not None:
        yield client
        return
    from srdvol.dask.cluster import dashboard_link, open_cluster

    with open_cluster(**dict(cluster or {})) as opened:
        if not (cluster or {}).get("scheduler"):  # our own workers only
            opened.register_plugin(_QuietTaskErrors())
        link = dashboard_link(opened)
        if link:
            _say(f"dashboard: {link}")
        yield opened


class _QuietTaskErrors(WorkerPlugin):
    """Worker plugin: drop distributed's "Compute Failed" log of a failed task.

    srdvol receives every task error on the client and reports it in one sentence (with the
    worker's traceback under ``--debug``), so the worker's own multi-line log of the same error
    only buries that sentence. Other worker logs (memory, lost connections) are kept.
    """

    name = "srdvol-quiet-task-errors"
    idempotent = True

    def setup(self, worker: Any) -> None:
        """Install the filter in the worker process (called by distributed)."""
        import logging

        logging.getLogger("distributed.worker").addFilter(_drop_compute_failed)

    def teardown(self, worker: Any) -> None:
        """Nothing to release."""


def _drop_compute_failed(record: Any) -> bool:
    return not str(record.msg).startswith("Compute Failed")


def _wants_cluster_training(cluster: Mapping[str, Any]) -> bool:
    """Distributed training when a scheduler, several workers or several GPUs are asked for."""
    from srdvol.dask.cluster import visible_gpus

    if cluster.get("scheduler"):
        return True
    if (cluster.get("workers") or 1) > 1:
        return True
    gpus = cluster.get("gpus")
    if isinstance(gpus, list):
        return len(gpus) > 1
    if gpus == "none":
        return False
    return len(visible_gpus()) > 1


def run_train(
    source: str | os.PathLike[str],
    model: str | os.PathLike[str],
    *,
    cluster: Mapping[str, Any] | None = None,
    read: Mapping[str, Any] | None = None,
    client: Any = None,
    allow_missing_chunks: bool = False,
    validated: bool = False,
    **options: Any,
) -> Any:
    """``srdvol train``: in this process, or one rank per Dask worker when a cluster is asked
    for (``--scheduler``, ``--workers`` > 1, several GPUs) or ``client`` is given.

    ``validated`` skips the checks of the input and the model path when the caller (``denoise``)
    has just run them.
    """
    read = dict(read or {})
    cluster = dict(cluster or {})
    if not validated:  # before a cluster is started or anything is trained
        _open_input(source, read, allow_missing_chunks=allow_missing_chunks)
        _check_model_path(model, source)
    from srdvol.ngff.storecheck import storage_errors

    resume = (
        "run the same command again (srdvol train with --resume) to continue from the last "
        "checkpoint"
    )
    with storage_errors(model, resume=resume):
        if client is not None or _wants_cluster_training(cluster):
            from srdvol.dask.ddp import train_distributed

            with _cluster(cluster, client) as active:
                record = train_distributed(active, source, model, **read, **options)
        else:
            from srdvol.training.loop import train

            record = train(source, model, **read, **options)
    _say(f"model written to {model} ({record.steps} steps, patch {tuple(record.patch)})")
    return record


def _check_model_path(model: str | os.PathLike[str], source: str | os.PathLike[str]) -> None:
    """A model file is never written inside the input, and is a file (not a folder)."""
    from srdvol.errors import OutputPathError
    from srdvol.ngff.write import check_output_path

    check_output_path(model, source)
    if Path(model).is_dir():
        raise OutputPathError(
            model, "is a folder, not a model file", "give the path of a .safetensors file"
        )


def _ledger_path(out: str | os.PathLike[str]) -> str:
    """The resume ledger lives inside the level-0 array's folder: a Zarr group listing would
    warn about a foreign file at the group level, and ``--overwrite`` removes it with the data."""
    return os.fspath(out).rstrip("/") + "/s0/.srdvol-ledger.json"


def _check_output_location(out: str | os.PathLike[str], *, image: Any, dtype: str) -> None:
    """Before any work: the output location is writable and its disk has room."""
    import numpy as np

    from srdvol.ngff.storecheck import check_free_space, probe_writable
    from srdvol.ngff.write import output_nbytes

    probe_writable(out)
    out_dtype = image.dtype if dtype == "input" else np.dtype(dtype)
    warning = check_free_space(out, needed=output_nbytes(image.shape, image.dims, out_dtype))
    if warning:
        _say(f"srdvol: warning: {warning}")


def _check_intensities(source: Any, image: Any, record: Any) -> None:
    """Sample the input (NaN/Inf stop the run here) and warn when its intensities are far
    from the model's training data."""
    from srdvol.core.normalize import Statistics, compare_statistics, sample_statistics

    sample = sample_statistics(image)
    trained = Statistics(mean=record.normalization.mean, std=record.normalization.std)
    warning = compare_statistics(sample, trained, subject=os.fspath(source))
    if warning:
        _say(f"srdvol: warning: {warning}")


def run_predict(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str],
    patch: tuple[int, int, int] | None = None,
    overlap: float = DEFAULT_OVERLAP,
    block: tuple[int, int, int] | None = None,
    window: str = "tent",
    dtype: str = "float32",
    ngff: str = "0.5",
    autocast: str = "auto",
    overwrite: bool = False,
    allow_missing_chunks: bool = False,
    cluster: Mapping[str, Any] | None = None,
    read: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    image: Any = None,
    client: Any = None,
    data_checked: bool = False,
    validated: bool = False,
) -> Any:
    """``srdvol predict``: denoise IN into OUT with a model, resumably, on a Dask cluster
    (``client``, or the one the ``cluster`` options describe).

    Order: the input (structure, missing chunks), the output path against the input and the
    model, the model's record and patch, the output location (writable, room), the input's
    statistics sample (NaN/Inf; intensities far from the model's), the model's weights
    (checksum, a finite forward pass); then the output lock, the existing output (resume or
    refuse), the cluster, and only then is anything written.

    ``data_checked`` skips the statistics sample when the caller has just run it (training
    samples the same chunks); ``validated`` skips the input and output-location checks that
    ``denoise`` ran before training. Returns the writer's :class:`~srdvol.dask.graph.WriteReport`.
    """
    from srdvol import progress
    from srdvol.dask.cluster import ModelPlugin
    from srdvol.dask.graph import denoise, write
    from srdvol.model.checkpoint import check_compatible, model_checksum, read_record
    from srdvol.ngff.lock import hold
    from srdvol.ngff.storecheck import storage_errors
    from srdvol.ngff.write import check_output, check_output_path, create_output, write_pyramid
    from srdvol.predict.predictors import ModelPredictor, check_model

    read = dict(read or {})
    if image is None:
        image = _open_input(source, read, allow_missing_chunks=allow_missing_chunks)
    check_output_path(out, source, keep=[model])
    record = read_record(model)
    check_compatible(record, patch=patch, subject=os.fspath(model))
    patch = patch or tuple(record.patch)
    out_dtype = str(image.dtype) if dtype == "input" else dtype
    if not validated:
        _check_output_location(out, image=image, dtype=out_dtype)
    if not data_checked:
        _check_intensities(source, image, record)
    check_model(model)
    params = {
        "patch": list(patch),
        "overlap": overlap,
        "block": list(block) if block else None,
        "window": window,
        "dtype": dtype,
        "ngff": ngff,
        **read,
    }
    record_of_run = {
        "command": "predict",
        "input": os.fspath(source),
        "parameters": params,
        "model": os.path.abspath(os.fspath(model)),
        "model_sha256": model_checksum(model),
        **dict(provenance or {}),
    }
    output = {
        "like": image,
        "dtype": out_dtype,
        "ngff": ngff,
        "provenance": record_of_run,
        "overwrite": overwrite,
        "keep": [model],
    }
    with hold(out, note=_say):
        check_output(out, **output)
        # The cluster starts (or is reached) before the output is created, so an unreachable
        # scheduler or a missing GPU leaves nothing behind.
        with _cluster(cluster, client) as client, storage_errors(out, resume=_RESUME):
            target = create_output(out, **output)
            run_id = str(target.attrs.get("srdvol", {}).get("run_id", ""))
            predictor = ModelPredictor(model, patch=patch, autocast=_autocast(autocast))
            lazy = denoise(
                image,
                predictor,
                patch=patch,
                overlap=overlap,
                block=block,
                window=window,
                chunks=getattr(target, "shards", None) or target.chunks,
            )
            client.register_plugin(ModelPlugin(os.fspath(model)))
            with progress.denoising() as bar:
                report = write(
                    lazy,
                    target,
                    ledger=_ledger_path(out),
                    run_id=run_id,
                    client=client,
                    progress=bar,
                )
            write_pyramid(out, client=client)
    _say(
        f"wrote {out}: {report.computed} block(s) computed, {report.skipped} already done, "
        f"{report.seconds:.1f} s"
    )
    return report


_RESUME = "run the same command again to resume"


def _autocast(value: str | bool) -> str | bool:
    text = str(value).lower()
    return True if text in {"on", "true", "bf16"} else False if text in {"off", "false"} else "auto"


def run_denoise(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    patch: tuple[int, int, int] | None = None,
    sampling: str = "spatial",
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
    allow_missing_chunks: bool = False,
    cluster: Mapping[str, Any] | None = None,
    read: Mapping[str, Any] | None = None,
    **predict_options: Any,
) -> Any:
    """``srdvol denoise``: train on IN unless a model is given, then predict into OUT.

    The trained model is kept beside OUT (:func:`default_model_path`); a rerun of the same
    command resumes training and then the output where they stopped. Everything that can be
    checked before training is: the input, the output path against the input and the model,
    the output location, the GPUs, the output lock and an existing output.
    """
    from srdvol.ngff.lock import hold
    from srdvol.ngff.write import check_output, check_output_path, make_run_id
    from srdvol.training.loop import state_path

    read = dict(read or {})
    image = _open_input(source, read, allow_missing_chunks=allow_missing_chunks)
    model_given = model is not None
    model = model if model is not None else default_model_path(out)
    check_output_path(out, source, keep=[model, state_path(model)])
    if not model_given:
        _check_model_path(model, source)
    _check_cluster_options(cluster or {})
    dtype = predict_options.get("dtype", "float32")
    out_dtype = str(image.dtype) if dtype == "input" else dtype
    _check_output_location(out, image=image, dtype=out_dtype)
    training = {
        "sampling": sampling,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "patch": list(patch) if patch else None,
    }
    provenance: dict[str, Any] = {"command": "denoise", "training": training}
    with hold(out, note=_say):
        if not model_given:
            run_id = make_run_id(
                {
                    "input": os.fspath(source),
                    "read": read,
                    **provenance,
                    "predict": {k: str(v) for k, v in predict_options.items()},
                }
            )
            check_output(
                out,
                like=image,
                dtype=out_dtype,
                ngff=predict_options.get("ngff", "0.5"),
                provenance={"run_id": run_id},
                overwrite=overwrite,
                keep=[model, state_path(model)],
            )
            provenance["run_id"] = run_id
        with _cluster(cluster) as client:  # one cluster, started first, trains and predicts
            if not model_given:
                resume = Path(model).exists() or state_path(model).exists()
                run_train(
                    source,
                    model,
                    client=client,
                    read=read,
                    validated=True,
                    patch=patch,
                    sampling=sampling,
                    steps=steps,
                    batch_size=batch_size,
                    lr=lr,
                    seed=seed,
                    resume=resume,
                    overwrite=resume,
                )
            return run_predict(
                source,
                out,
                model=model,
                patch=patch,
                overwrite=overwrite,
                read=read,
                provenance=provenance,
                image=image,
                client=client,
                data_checked=not model_given,  # training sampled the same chunks and checked them
                validated=True,
                **predict_options,
            )


def _check_cluster_options(cluster: Mapping[str, Any]) -> None:
    """Fail on GPUs that are not there before hours of training, not after."""
    from srdvol.dask.cluster import resolve_gpus

    if not cluster.get("scheduler"):
        resolve_gpus(cluster.get("gpus"))


# ---------------------------------------------------------------------------------------------
# demo


def run_demo(
    workdir: str | os.PathLike[str],
    *,
    steps: int | None = None,
    workers: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """``srdvol demo``: simulate a small 0.3 Hz recording, denoise it, evaluate it.

    Uses the GPU when one is visible, else one CPU worker. Running it again resumes (or, after
    a finished run, only evaluates again); ``overwrite`` starts the denoising afresh.
    """
    from srdvol.core.metrics import evaluate_stores, format_metrics

    folder = Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    noisy, truth = folder / "noisy.zarr", folder / "truth.zarr"
    denoised, report = folder / "denoised.zarr", folder / "report.png"
    if not (noisy.exists() and truth.exists()):
        run_simulate(
            os.fspath(noisy),
            truth=os.fspath(truth),
            frames=DEMO["frames"],
            size=DEMO["size"],
            photons=DEMO["photons"],
            rate_hz=0.3,
            seed=0,
        )
    _say(info_text(noisy, patch=DEMO["patch"]))
    run_denoise(
        noisy,
        denoised,
        patch=DEMO["patch"],
        steps=steps or DEMO["steps"],
        batch_size=DEMO["batch_size"],
        seed=0,
        overwrite=overwrite,
        cluster={
            "workers": workers,
            "threads_per_worker": DEMO["threads"],
            "dashboard_address": "127.0.0.1:0",
        },
        read={},
    )
    result = evaluate_stores(denoised, truth=truth, noisy=noisy)
    from srdvol.app.report import write_report

    write_report(report, estimate=denoised, truth=truth, noisy=noisy, metrics=result)
    gain = result["estimate"]["snr_db"] - result["noisy"]["snr_db"]
    _say(format_metrics(result))
    _say(
        f"SNR gain: {gain:+.1f} dB (noisy {result['noisy']['snr_db']:.1f} dB -> denoised "
        f"{result['estimate']['snr_db']:.1f} dB); report: {report}"
    )
    return result
