"""What each command does, end to end: validate, then train and/or predict, then report.

The command line (:mod:`srdvol.app.cli`) only parses options into one
:class:`~srdvol.options.RunOptions` and calls these functions; examples and notebooks may call
them too. Everything is validated before anything is written: the input is opened and checked,
the output path is checked against the input and against an existing output of another run, and
only then does training or writing start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srdvol.app.checks import (
    check_cluster_options,
    check_intensities,
    check_model_path,
    check_output_location,
    check_still,
    default_model_path,
    ledger_path,
    open_input,
)
from srdvol.app.say import say
from srdvol.app.session import cluster_session, wants_cluster_training
from srdvol.options import Autocast, RunOptions, SimulateOptions

__all__ = ["run_denoise", "run_evaluate", "run_predict", "run_simulate", "run_train"]

#: Said when a run that wrote part of its output stops.
_RESUME = "run the same command again to resume"


def run_simulate(
    out: str, *, truth: str | None = None, options: SimulateOptions | None = None
) -> Any:
    """``srdvol simulate``: write a noisy recording and its ground truth (default: beside it,
    ``in.zarr`` -> ``in-truth.zarr``); print a summary."""
    from srdvol.simulate import simulate

    if truth is None:
        truth = truth_beside(out)
    info = simulate(out, truth=truth, **(options or SimulateOptions()).model_dump())
    say(
        f"wrote {info.out} (noisy, {info.dims} {info.shape}) and {info.truth} (truth, "
        f"{info.n_cells} cells), {info.rate_hz:g} Hz, {info.photons:g} photons"
    )
    return info


def truth_beside(out: str) -> str:
    """The default ground-truth path of ``srdvol simulate OUT``: OUT's name with ``-truth``
    before its ``.zarr`` (local paths and URLs alike)."""
    base = out.rstrip("/")
    stem = base[: -len(".zarr")] if base.endswith(".zarr") else base
    return f"{stem}-truth.zarr"


def run_evaluate(
    out: str,
    *,
    truth: str,
    noisy: str | None = None,
    report: str | os.PathLike[str] | None = None,
    gaussian: str | None = None,
) -> str:
    """``srdvol evaluate``: metrics of OUT, of the noisy input and of the best Gaussian filters
    of it (``gaussian``: sigmas to try, or "none") against the truth."""
    from srdvol.app.evaluate import evaluate_stores, format_metrics, parse_sigmas

    result = evaluate_stores(out, truth=truth, noisy=noisy, sigmas=parse_sigmas(gaussian))
    if report is not None:
        from srdvol.app.report import write_report

        write_report(report, denoised=out, truth=truth, noisy=noisy, metrics=result)
        say(f"report written to {report}")
    return format_metrics(result)


# ---------------------------------------------------------------------------------------------
# train


def cpu_patch_hint(options: RunOptions) -> str | None:
    """A line for whoever is about to train on this machine's CPU with the default patch, which
    is sized for a GPU (a step takes seconds to minutes on a CPU); ``None`` otherwise."""
    from srdvol.dask.gpus import resolve_gpus
    from srdvol.errors import SrdvolError, as_flags, flag

    if options.train.patch is not None or options.cluster.scheduler is not None:
        return None
    try:
        if resolve_gpus(options.cluster.gpus):
            return None
    except SrdvolError:  # asked-for GPUs that are absent: reported with the cluster's start
        return None
    patch = ",".join(str(n) for n in options.train.patch_or_default())
    return as_flags(
        f"note: training on the CPU with the default patch {patch}, sized for a GPU: each "
        f"step can take a minute; for a first result in minutes pass {flag('patch')} 16,64,64 "
        f"{flag('steps')} 300 (README, Choosing options)"
    )


def run_train(
    source: str | os.PathLike[str],
    model: str | os.PathLike[str],
    options: RunOptions,
    *,
    client: Any = None,
    checked: bool = False,
) -> Any:
    """``srdvol train``: in this process, or one rank per Dask worker when a cluster is asked
    for (a scheduler, several workers, several GPUs) or ``client`` is given.

    ``checked`` skips the checks of the input and the model path when the caller
    (``denoise``) has just run them.
    """
    if not checked:  # before a cluster is started or anything is trained
        open_input(source, options.read)
        check_model_path(model, source)
    from srdvol.ngff.storecheck import storage_errors

    if hint := cpu_patch_hint(options):
        say(hint)
    resume = (
        "run the same command again (srdvol train with [[resume]]) to continue from the last "
        "checkpoint"
    )
    with storage_errors(model, resume=resume):
        if client is not None or wants_cluster_training(options.cluster):
            from srdvol.dask.ddp_train import train_distributed

            with cluster_session(options.cluster, client) as active:
                record = train_distributed(active, source, model, options.train, read=options.read)
        else:
            from srdvol.training.loop import train

            record = train(source, model, options.train, read=options.read)
    say(f"model written to {model} ({record.steps} steps, patch {tuple(record.patch)})")
    return record


# ---------------------------------------------------------------------------------------------
# predict


@dataclass(frozen=True)
class _Checked:
    """What ``denoise`` checked before training, so prediction does not check it again."""

    image: Any
    data_sampled: bool  # training sampled the same chunks for NaN/Inf
    provenance: dict[str, Any]


def run_predict(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: RunOptions,
    *,
    model: str | os.PathLike[str],
    client: Any = None,
) -> Any:
    """``srdvol predict``: denoise IN into OUT with a model, resumably, on a Dask cluster
    (``client``'s, or the one ``options.cluster`` describes).

    Order: the input (structure, missing chunks), the output path against the input and the
    model, the model's record and patch, the output location (writable, room), the input's
    statistics sample (NaN/Inf; intensities far from the model's), the model's weights
    (checksum, a finite forward pass); then the output lock, the existing output (resume or
    refuse), the cluster, and only then is anything written. Returns the writer's report.
    """
    return _predict(source, out, options, model=model, client=client)


def _predict(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: RunOptions,
    *,
    model: str | os.PathLike[str],
    checked: _Checked | None = None,
    client: Any = None,
) -> Any:
    from srdvol.model.checkpoint import check_compatible, model_checksum, read_record
    from srdvol.ngff.lock import hold
    from srdvol.ngff.write import check_output, check_output_path, output_dtype
    from srdvol.predict.predictors import check_model

    image = checked.image if checked else open_input(source, options.read)
    check_output_path(out, source, keep=[model])
    record = read_record(model)
    predict = options.predict
    check_compatible(record, patch=predict.patch, subject=os.fspath(model))
    out_dtype = str(output_dtype(options.output.dtype, image))
    if checked is None:
        check_output_location(out, image=image, dtype=out_dtype)
    own_statistics = None
    if checked is None or not checked.data_sampled:
        own_statistics = check_intensities(source, image, record, renormalize=predict.renormalize)
    if checked is None and (predict.guide or predict.restore):
        check_still(source, image, predict)
    check_model(model)
    run_record = {
        "command": "predict",
        "input": os.fspath(source),
        "parameters": _parameters(options, patch=predict.patch or tuple(record.patch)),
        "model": os.path.abspath(os.fspath(model)),
        "model_sha256": model_checksum(model),
        **(checked.provenance if checked else {}),
    }
    output = {
        "like": image,
        "options": options.output,
        "provenance": run_record,
        "keep": [model],
    }
    with hold(out, note=say):
        check_output(out, **output)
        # The cluster starts (or is reached) before the output is created, so an unreachable
        # scheduler or a missing GPU leaves nothing behind.
        with cluster_session(options.cluster, client) as active:
            report = _write(
                image,
                out,
                options,
                model=model,
                output=output,
                client=active,
                normalization=own_statistics,
            )
    say(
        f"wrote {out}: {report.computed} block(s) computed, {report.skipped} already done, "
        f"{report.seconds:.1f} s"
    )
    return report


def _say_lost_worker(address: str, tasks: int) -> None:
    say(
        f"srdvol: warning: lost worker {address} (it died or stopped answering) while it ran "
        f"{tasks} task(s); they run again on the other workers, so this takes longer and the "
        "output is the same"
    )


def _write(
    image: Any,
    out: str | os.PathLike[str],
    options: RunOptions,
    *,
    model: str | os.PathLike[str],
    output: dict[str, Any],
    client: Any,
    normalization: Any = None,
) -> Any:
    """Create (or reopen) the output, write every block, then the pyramid (``normalization``:
    the input's own statistics, for ``--renormalize``)."""
    from srdvol import progress
    from srdvol.dask.graph import BlockInputError, denoise, write
    from srdvol.dask.workers import ModelPlugin, lost_workers_reported
    from srdvol.ngff.storecheck import storage_errors
    from srdvol.ngff.write import create_output, write_pyramid
    from srdvol.predict.predictors import ModelPredictor

    predict = options.predict
    with storage_errors(out, resume=_RESUME):
        target = create_output(out, **output)
        run_id = str(target.attrs.get("srdvol", {}).get("run_id", ""))
        predictor = ModelPredictor(
            model,
            patch=predict.patch,
            autocast=_autocast(predict.autocast),
            normalization=normalization,
            tta=predict.tta,
            anchor=predict.anchor,
            guide=predict.guide,
        )
        lazy = denoise(
            image,
            predictor,
            patch=predict.patch,
            overlap=predict.overlap,
            block=predict.block,
            window=predict.window,
            chunks=getattr(target, "shards", None) or target.chunks,
        )
        if predict.restore:
            lazy = _restored(image, lazy, predictor, predict.restore, target)
        client.register_plugin(ModelPlugin(os.fspath(model)))
        with (
            progress.denoising() as bar,
            lost_workers_reported(
                client, _say_lost_worker, ours="srdvol-" if options.cluster.scheduler else None
            ),
        ):
            try:
                report = write(
                    lazy,
                    target,
                    ledger=ledger_path(out),
                    run_id=run_id,
                    client=client,
                    progress=bar,
                )
            except BlockInputError as exc:
                # NaN/Inf outside the statistics sample: the output keeps the blocks finished
                # before this one (recorded in its ledger) for the rerun.
                raise BlockInputError(
                    f"{image.attrs.get('source', 'the input')}, {exc.subject}",
                    exc.problem,
                    "replace them (e.g. with the local median) in place and run the same "
                    f"command again: it keeps the blocks already written to {os.fspath(out)} "
                    "and computes the rest",
                ) from exc
        write_pyramid(out, client=client)
    return report


def _restored(image: Any, lazy: Any, predictor: Any, rank: int, target: Any) -> Any:
    """``--restore`` on the lazy denoised image: the network's output and the input, stretch
    by stretch (:mod:`srdvol.dask.restoring`), in the model's units."""
    from srdvol.dask.restoring import restored

    own = predictor.normalization
    stats = own if own is not None else predictor.record.normalization
    data = restored(
        image.data,
        lazy.data,
        dims=[str(d) for d in image.dims],
        scale=float(stats.std),
        chunks=getattr(target, "shards", None) or target.chunks,
        rank=rank,
    )
    return lazy.copy(data=data)


def _autocast(value: Autocast) -> str | bool:
    return {Autocast.on: True, Autocast.off: False}.get(value, "auto")


def _parameters(options: RunOptions, *, patch: Any) -> dict[str, Any]:
    """The prediction's parameters as the output's provenance records them."""
    predict, read = options.predict, options.read
    return {
        "patch": list(patch),
        "overlap": predict.overlap,
        "block": list(predict.block) if predict.block else None,
        "window": predict.window.value,
        "dtype": options.output.dtype.value,
        "ngff": options.output.ngff.value,
        "chunks": list(options.output.chunks) if options.output.chunks else None,
        "compression": options.output.compression,
        "level": read.level,
        "channel": read.channel,
        "axes": read.axes,
        **(
            {"select": {a: s.text() for a, s in read.selection().items()}}
            if read.selection()
            else {}
        ),
        # recorded only when set, so outputs of earlier versions keep their run id
        **({"renormalize": True} if predict.renormalize else {}),
        **({"tta": True} if predict.tta else {}),
        **({"anchor": predict.anchor} if predict.anchor else {}),
        **({"guide": predict.guide} if predict.guide else {}),
        **({"restore": predict.restore} if predict.restore else {}),
    }


# ---------------------------------------------------------------------------------------------
# denoise


def run_denoise(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: RunOptions,
    *,
    model: str | os.PathLike[str] | None = None,
) -> Any:
    """``srdvol denoise``: train on IN unless a model is given, then predict into OUT.

    The trained model is kept beside OUT (:func:`~srdvol.app.checks.default_model_path`); a
    rerun of the same command resumes training and then the output where they stopped.
    Everything that can be checked before training is: the input, the output path against the
    input and the model, the output location, the GPUs, the output lock and an existing output.
    """
    from srdvol.ngff.lock import hold
    from srdvol.ngff.write import check_output, check_output_path, make_run_id, output_dtype
    from srdvol.training.state import state_path

    image = open_input(source, options.read)
    model_given = model is not None
    model = model if model is not None else default_model_path(out)
    keep = [model, state_path(model)]
    check_output_path(out, source, keep=keep)
    if not model_given:
        check_model_path(model, source)
    check_cluster_options(options.cluster)
    out_dtype = str(output_dtype(options.output.dtype, image))
    check_output_location(out, image=image, dtype=out_dtype)
    if options.predict.guide or options.predict.restore:  # before hours of training
        check_still(source, image, options.predict)
    provenance: dict[str, Any] = {"command": "denoise", "training": _training_record(options)}
    with hold(out, note=say):
        if not model_given:
            run_id = make_run_id(
                {
                    "input": os.fspath(source),
                    "read": options.read.model_dump(mode="json", exclude={"allow_missing_chunks"}),
                    **provenance,
                    "predict": _predict_record(options),
                }
            )
            check_output(
                out,
                like=image,
                options=options.output,
                # the training record lets a refusal name what differs from an earlier run
                provenance={**provenance, "run_id": run_id},
                keep=keep,
            )
            provenance["run_id"] = run_id
        with cluster_session(options.cluster) as client:  # one cluster trains and predicts
            if not model_given:
                resume = Path(model).exists() or state_path(model).exists()
                training = options.train.replace(resume=resume, overwrite=resume)
                run_train(
                    source, model, options.replace(train=training), client=client, checked=True
                )
            checked = _Checked(image, data_sampled=not model_given, provenance=provenance)
            return _predict(source, out, options, model=model, checked=checked, client=client)


def _training_record(options: RunOptions) -> dict[str, Any]:
    """The training options as a denoise output's provenance records them."""
    train = options.train
    return {
        "sampling": train.sampling.value,
        "steps": train.steps,
        "batch_size": train.batch_size,
        "lr": train.lr,
        "seed": train.seed,
        "patch": list(train.patch) if train.patch else None,
    }


def _predict_record(options: RunOptions) -> dict[str, str]:
    """The prediction options that make a denoise output a run of its own (the run id)."""
    predict, output = options.predict, options.output
    values = {
        "overlap": predict.overlap,
        "block": tuple(predict.block) if predict.block else None,
        "window": predict.window.value,
        "dtype": output.dtype.value,
        "ngff": output.ngff.value,
        "autocast": predict.autocast.value,
        "chunks": tuple(output.chunks) if output.chunks else None,
        "compression": output.compression,
        # only when set, so outputs of earlier versions keep their run id
        **({"tta": True} if predict.tta else {}),
        **({"anchor": predict.anchor} if predict.anchor else {}),
        **({"guide": predict.guide} if predict.guide else {}),
        **({"restore": predict.restore} if predict.restore else {}),
    }
    return {k: str(v) for k, v in values.items()}
