"""The ``srdvol`` command line.

This is the only place that turns a :class:`~srdvol.errors.SrdvolError` into a one-sentence
message and a non-zero exit code; ``srdvol --debug ...`` shows the traceback instead.
Heavy modules are imported inside the commands so ``srdvol --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from srdvol.app.demo import DEMO
from srdvol.app.flags import (
    AllowMissingOpt,
    AnchorOpt,
    AutocastOpt,
    AxesOpt,
    BatchOpt,
    BlockOpt,
    ChannelOpt,
    ChunksOpt,
    CompressionOpt,
    ConfigOpt,
    COpt,
    DashboardOpt,
    DtypeOpt,
    GpusOpt,
    GuideOpt,
    LevelOpt,
    LossOpt,
    LrOpt,
    ModelOpt,
    NgffOpt,
    OverlapOpt,
    OverwriteOpt,
    PatchOpt,
    RenormalizeOpt,
    RestoreOpt,
    ResumeOpt,
    SamplingOpt,
    SchedulerOpt,
    SeedOpt,
    StepsOpt,
    TOpt,
    TrainOverwriteOpt,
    TtaOpt,
    WindowOpt,
    WorkersOpt,
    XOpt,
    YOpt,
    ZOpt,
)
from srdvol.app.say import say
from srdvol.errors import SrdvolError
from srdvol.options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_COMPRESSION,
    DEFAULT_DASHBOARD_ADDRESS,
    DEFAULT_LR,
    DEFAULT_OVERLAP,
    DEFAULT_PHOTONS,
    DEFAULT_STEPS,
    Autocast,
    Loss,
    Ngff,
    OutputDtype,
    RunOptions,
    Sampling,
    SimulateOptions,
    Window,
)
from srdvol.values import DEFAULT_LICENSE

__all__ = ["app", "main"]

app = typer.Typer(
    name="srdvol",
    help="Self-supervised SRDTrans denoising of large OME-Zarr fluorescence time series.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _show_version(value: bool) -> None:
    if value:
        from srdvol import __version__

        typer.echo(f"srdvol {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", is_eager=True, callback=_show_version
        ),
    ] = False,
) -> None:
    """Self-supervised SRDTrans denoising of large OME-Zarr fluorescence time series."""


def _options(ctx: typer.Context, *, overwrite: str = "output") -> RunOptions:
    """The command's options as one validated :class:`~srdvol.options.RunOptions`."""
    names = RunOptions.flat_names()
    return RunOptions.from_flat(
        {k: v for k, v in ctx.params.items() if k in names}, overwrite=overwrite
    )


@app.command()
def info(
    ctx: typer.Context,
    source: Annotated[
        str, typer.Argument(metavar="IN", help="OME-Zarr image, Zarr array, or srdvol model file.")
    ],
    patch: PatchOpt = None,
    overlap: OverlapOpt = DEFAULT_OVERLAP,
    block: BlockOpt = None,
    dtype: DtypeOpt = OutputDtype.float32,
    ngff: NgffOpt = Ngff.v05,
    chunks: ChunksOpt = None,
    compression: CompressionOpt = str(DEFAULT_COMPRESSION),
    level: LevelOpt = 0,
    channel: ChannelOpt = None,
    axes: AxesOpt = None,
    t: TOpt = None,
    z: ZOpt = None,
    c: COpt = None,
    y: YOpt = None,
    x: XOpt = None,
    tta: TtaOpt = False,
    anchor: AnchorOpt = None,
    guide: GuideOpt = 0,
    restore: RestoreOpt = 0,
    config: ConfigOpt = None,
) -> None:
    """Show axes, shape, chunks, size and what `srdvol denoise` would do and write, with its
    cost (or a model's record)."""
    from srdvol.app.info import info_text

    typer.echo(info_text(source, _options(ctx)))


@app.command()
def simulate(
    ctx: typer.Context,
    out: Annotated[str, typer.Argument(metavar="OUT", help="Noisy OME-Zarr to write.")],
    truth: Annotated[
        str | None,
        typer.Option(
            "--truth",
            help="Ground-truth OME-Zarr to write.",
            show_default="beside OUT: in.zarr -> in-truth.zarr",
        ),
    ] = None,
    frames: Annotated[int, typer.Option("--frames", min=16, help="Frames (time points).")] = 128,
    planes: Annotated[
        int | None,
        typer.Option("--planes", min=1, help="z planes.", show_default="none: a T,Y,X movie"),
    ] = None,
    size: Annotated[tuple[int, int], typer.Option("--size", help="Frame size Y X.")] = (128, 128),
    rate_hz: Annotated[float, typer.Option("--rate-hz", help="Volume rate in Hz.")] = 0.3,
    photons: Annotated[
        float,
        typer.Option(
            "--photons", help="Mean photons per pixel and frame at rest (lower: noisier)."
        ),
    ] = DEFAULT_PHOTONS,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Write synthetic two-photon calcium imaging with its ground truth."""
    from srdvol.app.commands import run_simulate

    names = SimulateOptions.model_fields
    options = SimulateOptions.create(**{k: v for k, v in ctx.params.items() if k in names})
    run_simulate(out, truth=truth, options=options)


@app.command()
def evaluate(
    out: Annotated[str, typer.Argument(metavar="OUT", help="Denoised (or any) OME-Zarr image.")],
    truth: Annotated[str, typer.Option("--truth", help="Ground-truth OME-Zarr image.")],
    noisy: Annotated[
        str | None,
        typer.Option("--noisy", help="Noisy input, scored too.", show_default="none"),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Write a PNG figure here.", show_default="none"),
    ] = None,
    gaussian: Annotated[
        str | None,
        typer.Option(
            "--gaussian",
            help="Sigmas (px) of the Gaussian reference filter of --noisy, best picked with the "
            "truth per score; 'none' for no reference.",
            show_default="0.5,0.75,1,1.25,1.5,2,2.5,3,4",
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """SNR, SSIM, cell and pixel trace fidelity of OUT against the ground truth, beside the
    noisy input and the best Gaussian filters of it."""
    from srdvol.app.commands import run_evaluate

    typer.echo(run_evaluate(out, truth=truth, noisy=noisy, report=report, gaussian=gaussian))


@app.command()
def train(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(metavar="IN", help="Noisy OME-Zarr image.")],
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file to write.")],
    patch: PatchOpt = None,
    sampling: SamplingOpt = Sampling.spatial,
    steps: StepsOpt = DEFAULT_STEPS,
    batch_size: BatchOpt = DEFAULT_BATCH_SIZE,
    lr: LrOpt = DEFAULT_LR,
    loss: LossOpt = Loss.mse,
    seed: SeedOpt = 0,
    resume: ResumeOpt = False,
    overwrite: TrainOverwriteOpt = False,
    allow_missing_chunks: AllowMissingOpt = False,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    gpus: GpusOpt = None,
    dashboard_address: DashboardOpt = DEFAULT_DASHBOARD_ADDRESS,
    level: LevelOpt = 0,
    channel: ChannelOpt = None,
    axes: AxesOpt = None,
    t: TOpt = None,
    z: ZOpt = None,
    c: COpt = None,
    y: YOpt = None,
    x: XOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Self-supervised training on IN (no clean data needed)."""
    from srdvol.app.commands import run_train

    run_train(source, model, _options(ctx, overwrite="train"))


@app.command()
def predict(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(metavar="IN", help="Noisy OME-Zarr image.")],
    out: Annotated[str, typer.Argument(metavar="OUT", help="Denoised OME-Zarr to write.")],
    model: Annotated[Path, typer.Option("--model", help="A trained srdvol model file.")],
    patch: PatchOpt = None,
    overlap: OverlapOpt = DEFAULT_OVERLAP,
    block: BlockOpt = None,
    window: WindowOpt = Window.TENT,
    dtype: DtypeOpt = OutputDtype.float32,
    ngff: NgffOpt = Ngff.v05,
    chunks: ChunksOpt = None,
    compression: CompressionOpt = str(DEFAULT_COMPRESSION),
    autocast: AutocastOpt = Autocast.auto,
    tta: TtaOpt = False,
    anchor: AnchorOpt = None,
    guide: GuideOpt = 0,
    restore: RestoreOpt = 0,
    renormalize: RenormalizeOpt = False,
    overwrite: OverwriteOpt = False,
    allow_missing_chunks: AllowMissingOpt = False,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    gpus: GpusOpt = None,
    dashboard_address: DashboardOpt = DEFAULT_DASHBOARD_ADDRESS,
    level: LevelOpt = 0,
    channel: ChannelOpt = None,
    axes: AxesOpt = None,
    t: TOpt = None,
    z: ZOpt = None,
    c: COpt = None,
    y: YOpt = None,
    x: XOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Denoise IN into OUT with a trained model."""
    from srdvol.app.commands import run_predict

    run_predict(source, out, _options(ctx), model=model)


@app.command()
def denoise(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(metavar="IN", help="Noisy OME-Zarr image.")],
    out: Annotated[str, typer.Argument(metavar="OUT", help="Denoised OME-Zarr to write.")],
    model: ModelOpt = None,
    patch: PatchOpt = None,
    overlap: OverlapOpt = DEFAULT_OVERLAP,
    block: BlockOpt = None,
    window: WindowOpt = Window.TENT,
    sampling: SamplingOpt = Sampling.spatial,
    steps: StepsOpt = DEFAULT_STEPS,
    batch_size: BatchOpt = DEFAULT_BATCH_SIZE,
    lr: LrOpt = DEFAULT_LR,
    loss: LossOpt = Loss.mse,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = OutputDtype.float32,
    ngff: NgffOpt = Ngff.v05,
    chunks: ChunksOpt = None,
    compression: CompressionOpt = str(DEFAULT_COMPRESSION),
    autocast: AutocastOpt = Autocast.auto,
    tta: TtaOpt = False,
    anchor: AnchorOpt = None,
    guide: GuideOpt = 0,
    restore: RestoreOpt = 0,
    renormalize: RenormalizeOpt = False,
    overwrite: OverwriteOpt = False,
    allow_missing_chunks: AllowMissingOpt = False,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    gpus: GpusOpt = None,
    dashboard_address: DashboardOpt = DEFAULT_DASHBOARD_ADDRESS,
    level: LevelOpt = 0,
    channel: ChannelOpt = None,
    axes: AxesOpt = None,
    t: TOpt = None,
    z: ZOpt = None,
    c: COpt = None,
    y: YOpt = None,
    x: XOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Train on IN (unless --model is given), then denoise IN into OUT."""
    from srdvol.app.commands import run_denoise

    run_denoise(source, out, _options(ctx), model=model)


@app.command()
def demo(
    workdir: Annotated[
        Path, typer.Option("--workdir", help="Folder for the demo's stores.")
    ] = Path("demo-output"),
    steps: Annotated[
        int | None,
        typer.Option("--steps", min=1, help="Training steps.", show_default=str(DEMO["steps"])),
    ] = None,
    workers: WorkersOpt = None,
    overwrite: OverwriteOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Simulate -> denoise -> evaluate on a small default, in minutes on a laptop CPU."""
    from srdvol.app.demo import run_demo

    run_demo(workdir, steps=steps, workers=workers, overwrite=overwrite)


@app.command()
def export(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="A trained srdvol model file.")],
    out: Annotated[
        str, typer.Argument(metavar="OUT.zip", help="BioImage Model Zoo package to write.")
    ],
    sample: Annotated[
        str | None,
        typer.Option(
            "--sample",
            help="OME-Zarr image whose first patch becomes the package's test input.",
            show_default="noise with the training data's mean and std",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Model name in the zoo.", show_default="from MODEL's name"),
    ] = None,
    author: Annotated[
        list[str] | None,
        typer.Option(
            "--author", help="Author name; repeat for several.", show_default="the login name"
        ),
    ] = None,
    license: Annotated[
        str | None,
        typer.Option(
            "--license", help="SPDX licence of the weights.", show_default=DEFAULT_LICENSE
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing OUT.zip.")
    ] = False,
) -> None:
    """Write MODEL as a BioImage Model Zoo package that bioimageio.core runs (TorchScript
    weights, normalisation as processing steps, a test input and output)."""
    from srdvol.app.export import run_export

    run_export(
        model, out, sample=sample, name=name, authors=author, license=license, overwrite=overwrite
    )


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker told not to warn about leaked semaphores.

    An interrupted run closes its local cluster while workers still hold semaphores; the
    tracker (a process of its own, shared by the workers) would print a warning after srdvol's
    last line saying what was kept and how to resume. It takes its ``-W`` options from
    ``sys.warnoptions`` when it starts, so the option is there only for that moment (worker
    processes started later do not get it).
    """
    from multiprocessing import resource_tracker

    option = "ignore:resource_tracker:UserWarning"
    sys.warnoptions.append(option)
    try:
        resource_tracker.ensure_running()
    except OSError:  # no tracker is no reason to fail a command
        pass
    finally:
        sys.warnoptions.remove(option)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``srdvol`` console script.

    Ctrl-C (SIGINT) and SIGTERM end a command with exit code 130 or 143 and one line saying what
    was kept and the command that resumes; training saves its state first. (typer turns a
    KeyboardInterrupt raised inside a command into an exit code that ``standalone_mode=False``
    *returns*; ignoring that return value made an interrupted run exit 0 without a word, so the
    command is invoked here directly.)
    """
    from srdvol import interrupt

    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    # Dask's INFO logs (worker start/stop, plugins) would bury srdvol's own output; worker
    # processes read this from the environment. An explicit user setting wins.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "info" if debug else "warning")
    if not debug:
        _quiet_resource_tracker()
    try:
        with interrupt.handling():
            _invoke(args)
    except KeyboardInterrupt as exc:
        if debug:
            import traceback

            traceback.print_exc()
        say(interrupt.resume_message(exc, args))
        raise SystemExit(interrupt.exit_code(exc)) from None
    except SrdvolError as exc:
        if debug:
            raise
        say(f"srdvol: error: {exc.command_line_message()}")
        raise SystemExit(exc.exit_code) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        raise SystemExit(1) from None
    except typer.TyperException as exc:  # usage errors: shown like click does
        exc.show()  # type: ignore[attr-defined]
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except Exception as exc:  # an error we did not foresee: still no raw traceback
        if debug:
            raise
        say(
            f"srdvol: internal error: {type(exc).__name__}: {exc}; rerun with srdvol --debug "
            "to see the traceback and report it."
        )
        raise SystemExit(1) from None


def _invoke(args: list[str]) -> None:
    """Parse and run one command, letting a KeyboardInterrupt through (typer's own main would
    turn it into a returned exit code)."""
    command = typer.main.get_command(app)
    with command.make_context("srdvol", list(args)) as ctx:
        command.invoke(ctx)


if __name__ == "__main__":
    main()
