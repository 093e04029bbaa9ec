"""The command line's options, each defined once (their names, help, defaults and guides),
shared by every command that takes them; :mod:`srdvol.app.cli` declares the commands.

These lists are declarative on purpose: typer reads each command's parameters from its
signature, so every command names the options it takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from srdvol.app.config import config_defaults, load_config_file
from srdvol.options import MAX_OVERLAP, Autocast, Loss, Ngff, OutputDtype, Sampling, Window
from srdvol.values import DEFAULT_ANCHOR, GUIDED_ANCHOR

__all__ = [
    "AllowMissingOpt",
    "AnchorOpt",
    "AutocastOpt",
    "AxesOpt",
    "BatchOpt",
    "BlockOpt",
    "COpt",
    "ChannelOpt",
    "ChunksOpt",
    "CompressionOpt",
    "ConfigOpt",
    "DashboardOpt",
    "DtypeOpt",
    "GpusOpt",
    "LevelOpt",
    "LossOpt",
    "LrOpt",
    "ModelOpt",
    "NgffOpt",
    "OverlapOpt",
    "OverwriteOpt",
    "PatchOpt",
    "RenormalizeOpt",
    "ResumeOpt",
    "SamplingOpt",
    "SchedulerOpt",
    "SeedOpt",
    "StepsOpt",
    "TOpt",
    "TrainOverwriteOpt",
    "TtaOpt",
    "WindowOpt",
    "WorkersOpt",
    "XOpt",
    "YOpt",
    "ZOpt",
]


def _load_config(
    ctx: typer.Context, _param: typer.CallbackParam, value: Path | None
) -> Path | None:
    """Eager ``--config`` callback: the file's values become this command's defaults."""
    if value is not None:
        options = load_config_file(value, command=ctx.info_name or "")
        defaults = config_defaults(options)
        known = {p.name for p in ctx.command.params}
        ctx.default_map = {
            **(ctx.default_map or {}),
            **{k: v for k, v in defaults.items() if k in known},
        }
    return value


# Options shared by several commands keep one definition, so names and help never drift.
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML or YAML file whose keys set this command's options.",
        show_default="none",
        is_eager=True,
        callback=_load_config,
    ),
]
PatchOpt = Annotated[
    str | None,
    typer.Option(
        "--patch",
        help="Patch size T,Y,X (T a multiple of 16), one size for training and prediction; "
        "larger patches see more context and cost more per step.",
        show_default="64,128,128 to train; the model's to predict",
    ),
]
OverlapOpt = Annotated[
    float,
    typer.Option(
        "--overlap",
        min=0.0,
        max=MAX_OVERLAP,
        help="Overlap of neighbouring patches: 0.25 runs the model on 2.4 voxels per output "
        "voxel, 0.5 on 8 (smoother seams, 3.4x the time); srdvol info shows the cost.",
    ),
]
BlockOpt = Annotated[
    str | None,
    typer.Option(
        "--block",
        help="Processing block T,Y,X (multiples of the output chunks).",
        show_default="from the output chunks and the workers' memory",
    ),
]
WindowOpt = Annotated[
    Window,
    typer.Option(
        "--window",
        help="How overlapping patches are blended: tent (linear weights) or cos2 (Hann, "
        "weights that fall off faster near patch edges).",
    ),
]
SamplingOpt = Annotated[
    Sampling,
    typer.Option(
        "--sampling",
        help="Training pairs: spatial (SRDTrans: neighbouring pixels of one frame; right for "
        "slow volume rates, where frames are nearly independent), temporal (neighbouring "
        "frames; fast recordings) or auto (measures both on a sample and says which it picks).",
    ),
]
StepsOpt = Annotated[
    int,
    typer.Option("--steps", min=1, help="Training steps (more: better, longer; see the README)."),
]
BatchOpt = Annotated[
    int, typer.Option("--batch-size", min=1, help="Patches per step (per worker).")
]
LrOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate.")]
LossOpt = Annotated[
    Loss,
    typer.Option(
        "--loss",
        help="Training loss: mse (the mean; keeps dim transients) or l1mse (upstream SRDTrans's "
        "0.5 L1 + 0.5 MSE).",
    ),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        help="Address of a running Dask scheduler (tcp://HOST:8786 or a scheduler file).",
        show_default="start a local cluster",
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        min=1,
        help="Local worker processes (with GPUs: use the first N of them).",
        show_default="one per GPU; else one per 2 cores, at most 4",
    ),
]
GpusOpt = Annotated[
    str | None,
    typer.Option(
        "--gpus",
        help="GPUs: all, none, or a list: positions among the visible GPUs (0,1 = the "
        "first two CUDA_VISIBLE_DEVICES shows) or ids like GPU-<uuid>.",
        show_default="every visible GPU, else CPU workers",
    ),
]
DashboardOpt = Annotated[
    str,
    typer.Option(
        "--dashboard-address",
        help="Dask dashboard address (this machine only unless you give e.g. 0.0.0.0:8787).",
    ),
]
LevelOpt = Annotated[int, typer.Option("--level", min=0, help="Multiscale level to read.")]
ChannelOpt = Annotated[
    int | None,
    typer.Option("--channel", min=0, help="Only this channel (as --c N).", show_default="all"),
]
AxesOpt = Annotated[
    str | None,
    typer.Option(
        "--axes",
        help="Axes of a plain Zarr array, e.g. tzyx.",
        show_default="from the OME-Zarr metadata",
    ),
]


def _span_option(axis: str, what: str) -> Any:
    return Annotated[
        str | None,
        typer.Option(
            f"--{axis}",
            help=f"Only {what} START:STOP (STOP excluded; one index, or an open end, also "
            "works); the output lines up with the input.",
            show_default="all",
        ),
    ]


TOpt = _span_option("t", "frames")
ZOpt = _span_option("z", "z planes")
COpt = _span_option("c", "channels")
YOpt = _span_option("y", "rows (y)")
XOpt = _span_option("x", "columns (x)")
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace an output of another run.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
DtypeOpt = Annotated[
    OutputDtype,
    typer.Option("--dtype", help="Output dtype: float32, or input (round and clip)."),
]
NgffOpt = Annotated[
    Ngff, typer.Option("--ngff", help="Output NGFF version: 0.5 (Zarr v3) or 0.4 (Zarr v2).")
]
ChunksOpt = Annotated[
    str | None,
    typer.Option(
        "--chunks",
        help="Output chunks T,Y,X (small t suits viewers and per-frame analysis; c and z "
        "chunks are one plane).",
        show_default="up to 16 frames within 4 MiB, planes up to 512x512",
    ),
]
CompressionOpt = Annotated[
    str,
    typer.Option(
        "--compression",
        help="Output compression: a blosc-zstd level from 1 (fast) to 9 (small), or none.",
    ),
]
ModelOpt = Annotated[
    Path | None,
    typer.Option(
        "--model",
        help="A trained srdvol model file.",
        show_default="train one, kept beside OUT as OUT.model.safetensors",
    ),
]
AutocastOpt = Annotated[
    Autocast,
    typer.Option(
        "--autocast",
        help="bf16 on the GPU: auto (on for CUDA, off on the CPU), on or off; bf16 is faster "
        "and differs from float32 by less than 2^-6 of the intensity range.",
    ),
]
TtaOpt = Annotated[
    bool,
    typer.Option(
        "--tta",
        help="Test-time augmentation: predict every patch in the 8 symmetries of the (y, x) "
        "plane (turns and mirrors) and average them: about 0.5-0.7 dB higher SNR and cleaner "
        "pixel traces, at 8x the prediction time.",
    ),
]
AnchorOpt = Annotated[
    float | None,
    typer.Option(
        "--anchor",
        min=0.0,
        metavar="SIGMA",
        show_default=f"{DEFAULT_ANCHOR:g}, {GUIDED_ANCHOR:g} with --guide, 0 with --restore",
        help="Keep the input's own intensities at scales above a Gaussian of SIGMA pixels: the "
        "output is the network's fine detail plus the measurement's coarse levels, so cell "
        "traces keep their amplitudes even after a short training, for a little coarse noise "
        "(with --guide the correction follows the mean image's cells). 0 turns it off (the "
        "network's output as it is).",
    ),
]
GuideOpt = Annotated[
    int,
    typer.Option(
        "--guide",
        min=0,
        max=16,
        metavar="PIXELS",
        help="Filter each denoised frame's activity (its difference from the recording's mean "
        "image) with that mean image as guide, in windows of this radius: activity shaped like "
        "the cells stays, fine noise goes (cleaner pixel traces inside cells, higher SNR). For "
        "still or registered recordings (a moving one gets a warning); 2 is a good start, 0 "
        "(default) turns it off.",
    ),
]
RestoreOpt = Annotated[
    int,
    typer.Option(
        "--restore",
        min=0,
        max=16,
        metavar="PATTERNS",
        help="Put back the transient amplitudes the network flattens, from the input itself: "
        "over stretches of 256 frames, in every 44-pixel tile, the PATTERNS strongest "
        "activity patterns of the denoised movie (where cells light up) are fitted to the "
        "input, frame by frame. For dim, still or registered recordings: at 0.5 photons per "
        "pixel it kept 0.965-0.974 of the transients' amplitude at about 3 dB above the best "
        "Gaussian filter. It filters the activity with the mean image itself and replaces "
        "--anchor and --guide; 6 is the setting measured, 0 (default) turns it off.",
    ),
]
RenormalizeOpt = Annotated[
    bool,
    typer.Option(
        "--renormalize",
        help="Normalise the input with its own sampled mean and std instead of the model's "
        "training data's: for a recording brighter or dimmer than the one the model was "
        "trained on (predict warns when it is); retraining on it is more faithful.",
    ),
]
AllowMissingOpt = Annotated[
    bool,
    typer.Option(
        "--allow-missing-chunks",
        help="Read chunks missing from the input as its fill value (a warning, not an error).",
    ),
]
TrainOverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing model and its training state.")
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted training.")]
