"""What each command does, end to end: validate, then train and/or predict, then report.

The command line (:mod:`srdvol.cli`) only parses options and calls these functions; examples and
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
#: The demo: a small 0.3 Hz recording that trains and denoises in minutes on a laptop CPU. These
#: are the settings of benchmarks/quality.py (photons 2: noisy about 5 dB, the best Gaussian
#: filter about 15.6 dB, srdvol about 16.9 dB after 300 steps; see benchmarks/RESULTS.md).
DEMO: dict[str, Any] = {
    "frames": 96,
    "size": (96, 96),
    "photons": 2.0,
    "patch": (16, 64, 64),
    "steps": 300,
    "batch_size": 4,
}


def _say(text: str) -> None:
    console.print(text, soft_wrap=True)


def _open_input(source: str | os.PathLike[str], read: Mapping[str, Any]) -> Any:
    from srdvol.io import open_image

    return open_image(
        source, level=read.get("level", 0), axes=read.get("axes"), channel=read.get("channel")
    )


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
    level: int = 0,
    channel: int | None = None,
    axes: str | None = None,
) -> str:
    """Describe an image and what ``srdvol denoise`` would do with it (blocks, tasks, workers),
    or, for a model file, its record (network, patch, sampling, normalisation, training data)."""
    if os.fspath(source).endswith(".safetensors"):
        return _model_text(source)
    from srdvol.io import describe_image
    from srdvol.training import DEFAULT_PATCH

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
    for problem in facts.get("problems") or []:
        lines.append(f"problem    {problem}")
    if facts.get("problems"):
        return "\n".join(lines)
    from srdvol.cluster import visible_gpus
    from srdvol.tiling import plan_blocks

    sizes = dict(zip(("t", "y", "x"), patch or DEFAULT_PATCH, strict=True))
    plan = plan_blocks(
        shape,
        dims=dims,
        patch=sizes,
        overlap=DEFAULT_OVERLAP,
        chunks=chunks,
        block=dict(zip(("t", "y", "x"), block, strict=True)) if block else None,
    )
    gpus = visible_gpus()
    lines += [
        "denoise would:",
        f"  train      patch {tuple(sizes.values())} (t, y, x), spatial-redundancy sampling",
        f"  predict    blocks {plan.block_shape} on lattice stride {tuple(plan.stride.values())}, "
        f"halo {plan.depth}: {math.prod(plan.nblocks)} blocks",
        f"  workers    {len(gpus)} GPU worker(s) {gpus}"
        if gpus
        else "  workers    CPU workers (no GPU visible)",
        f"  write      float32 OME-Zarr {_bytes(4 * math.prod(shape))} at level 0, plus a pyramid",
    ]
    return "\n".join(lines)


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
    from srdvol.simulate import simulate

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
    from srdvol.metrics import evaluate_stores, format_metrics

    result = evaluate_stores(out, truth=truth, noisy=noisy)
    if report is not None:
        from srdvol.report import write_report

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
    from srdvol.cluster import dashboard_link, open_cluster

    with open_cluster(**dict(cluster or {})) as opened:
        link = dashboard_link(opened)
        if link:
            _say(f"dashboard: {link}")
        yield opened


def _wants_cluster_training(cluster: Mapping[str, Any]) -> bool:
    """Distributed training when a scheduler, several workers or several GPUs are asked for."""
    from srdvol.cluster import visible_gpus

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
    **options: Any,
) -> Any:
    """``srdvol train``: in this process, or one rank per Dask worker when a cluster is asked
    for (``--scheduler``, ``--workers`` > 1, several GPUs) or ``client`` is given."""
    read = dict(read or {})
    cluster = dict(cluster or {})
    if client is not None or _wants_cluster_training(cluster):
        from srdvol.ddp import train_distributed

        _open_input(source, read)  # validate before a cluster is started
        with _cluster(cluster, client) as active:
            record = train_distributed(active, source, model, **read, **options)
    else:
        from srdvol.training import train

        record = train(source, model, **read, **options)
    _say(f"model written to {model} ({record.steps} steps, patch {tuple(record.patch)})")
    return record


def _ledger_path(out: str | os.PathLike[str]) -> str:
    """The resume ledger lives inside the level-0 array's folder: a Zarr group listing would
    warn about a foreign file at the group level, and ``--overwrite`` removes it with the data."""
    return os.fspath(out).rstrip("/") + "/s0/.srdvol-ledger.json"


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
    cluster: Mapping[str, Any] | None = None,
    read: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    image: Any = None,
    client: Any = None,
    data_checked: bool = False,
) -> Any:
    """``srdvol predict``: denoise IN into OUT with a model, resumably, on a Dask cluster
    (``client``, or the one the ``cluster`` options describe).

    ``data_checked`` skips the NaN/Inf sample of the input when the caller has just run it
    (training samples the same chunks). Returns the writer's :class:`~srdvol.engine.WriteReport`.
    """
    from srdvol import progress
    from srdvol.cluster import ModelPlugin
    from srdvol.engine import denoise, write
    from srdvol.model.checkpoint import check_compatible, model_checksum, read_record
    from srdvol.normalize import sample_statistics
    from srdvol.output import check_output, check_output_path, create_output, write_pyramid
    from srdvol.predict import ModelPredictor

    read = dict(read or {})
    image = image if image is not None else _open_input(source, read)
    check_output_path(out, source)
    record = read_record(model)
    check_compatible(record, patch=patch, subject=os.fspath(model))
    patch = patch or tuple(record.patch)
    if not data_checked:  # NaN/Inf in the data stop the run before anything is written
        sample_statistics(image)
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
    out_dtype = str(image.dtype) if dtype == "input" else dtype
    check_output(
        out, like=image, dtype=out_dtype, ngff=ngff, provenance=record_of_run, overwrite=overwrite
    )
    # The cluster starts (or is reached) before the output is created, so an unreachable
    # scheduler or a missing GPU leaves nothing behind.
    with _cluster(cluster, client) as client:
        target = create_output(
            out,
            like=image,
            dtype=out_dtype,
            ngff=ngff,
            provenance=record_of_run,
            overwrite=overwrite,
        )
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
                lazy, target, ledger=_ledger_path(out), run_id=run_id, client=client, progress=bar
            )
        write_pyramid(out, client=client)
    _say(
        f"wrote {out}: {report.computed} block(s) computed, {report.skipped} already done, "
        f"{report.seconds:.1f} s"
    )
    return report


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
    cluster: Mapping[str, Any] | None = None,
    read: Mapping[str, Any] | None = None,
    **predict_options: Any,
) -> Any:
    """``srdvol denoise``: train on IN unless a model is given, then predict into OUT.

    The trained model is kept beside OUT (:func:`default_model_path`); a rerun of the same
    command resumes training and then the output where they stopped.
    """
    from srdvol.output import check_output, check_output_path, make_run_id

    read = dict(read or {})
    image = _open_input(source, read)
    check_output_path(out, source)
    _check_cluster_options(cluster or {})
    training = {
        "sampling": sampling,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "patch": list(patch) if patch else None,
    }
    provenance: dict[str, Any] = {"command": "denoise", "training": training}
    model_given = model is not None
    if model is None:
        model = default_model_path(out)
        run_id = make_run_id(
            {
                "input": os.fspath(source),
                "read": read,
                **provenance,
                "predict": {k: str(v) for k, v in predict_options.items()},
            }
        )
        dtype = predict_options.get("dtype", "float32")
        check_output(
            out,
            like=image,
            dtype=str(image.dtype) if dtype == "input" else dtype,
            ngff=predict_options.get("ngff", "0.5"),
            provenance={"run_id": run_id},
            overwrite=overwrite,
        )
        provenance["run_id"] = run_id
    with _cluster(cluster) as client:  # one cluster, started first, trains and predicts
        if not model_given:
            resume = Path(model).exists() or _state_exists(model)
            run_train(
                source,
                model,
                client=client,
                read=read,
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
            **predict_options,
        )


def _check_cluster_options(cluster: Mapping[str, Any]) -> None:
    """Fail on GPUs that are not there before hours of training, not after."""
    from srdvol.cluster import resolve_gpus

    if not cluster.get("scheduler"):
        resolve_gpus(cluster.get("gpus"))


def _state_exists(model: str | os.PathLike[str]) -> bool:
    from srdvol.training import state_path

    return state_path(model).exists()


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
    from srdvol.metrics import evaluate_stores, format_metrics

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
        cluster={"workers": workers, "dashboard_address": "127.0.0.1:0"},
        read={},
    )
    result = evaluate_stores(denoised, truth=truth, noisy=noisy)
    from srdvol.report import write_report

    write_report(report, estimate=denoised, truth=truth, noisy=noisy, metrics=result)
    gain = result["estimate"]["snr_db"] - result["noisy"]["snr_db"]
    _say(format_metrics(result))
    _say(
        f"SNR gain: {gain:+.1f} dB (noisy {result['noisy']['snr_db']:.1f} dB -> denoised "
        f"{result['estimate']['snr_db']:.1f} dB); report: {report}"
    )
    return result
