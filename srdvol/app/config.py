"""Run options shared by the command line and configuration files.

Every command-line option can also come from a TOML or YAML file given with ``--config FILE``.
The file is validated by :class:`ConfigFile` (unknown keys and bad values are errors that name
the key), then used as the defaults of the command; options typed on the command line win.

A file may hold flat keys, which apply to every command, and tables named after commands,
which apply to that command only::

    patch = [32, 64, 64]
    overlap = 0.25

    [train]
    steps = 2000
"""

from __future__ import annotations

import enum
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from srdvol.core.tiling import Window
from srdvol.errors import ConfigError

__all__ = [
    "COMMANDS",
    "DEFAULT_DASHBOARD_ADDRESS",
    "Autocast",
    "ConfigFile",
    "Ngff",
    "OutputDtype",
    "Sampling",
    "Window",
    "config_defaults",
    "load_config_file",
    "parse_triple",
]

#: Where a local cluster serves its dashboard unless the user asks for another address: this
#: machine only (reach it through an SSH tunnel, or pass --dashboard-address 0.0.0.0:8787).
DEFAULT_DASHBOARD_ADDRESS = "127.0.0.1:8787"

#: Commands whose options a configuration file may set in a table of their own.
COMMANDS = ("denoise", "train", "predict", "simulate", "evaluate", "info", "demo")


class Sampling(enum.StrEnum):
    """How training pairs are drawn from noisy data."""

    spatial = "spatial"
    temporal = "temporal"
    auto = "auto"


class OutputDtype(enum.StrEnum):
    """Data type of the denoised output."""

    float32 = "float32"
    input = "input"  # the input's dtype, rounded and clipped


class Ngff(enum.StrEnum):
    """NGFF version of the output: 0.5 on Zarr v3, 0.4 on Zarr v2 for older readers."""

    v05 = "0.5"
    v04 = "0.4"


class Autocast(enum.StrEnum):
    """bf16 autocast during prediction: auto (on for CUDA), on or off."""

    auto = "auto"
    on = "on"
    off = "off"


def parse_triple(value: str | Sequence[int], *, option: str = "--patch") -> tuple[int, int, int]:
    """Parse ``"32,64,64"`` (or a sequence) into a (t, y, x) triple of positive integers.

    Parameters
    ----------
    value
        Comma-separated text or a sequence of three integers.
    option
        The option named in an error message.

    Raises
    ------
    ConfigError
        If there are not exactly three positive integers.
    """
    parts: Sequence[Any] = value.replace(" ", "").split(",") if isinstance(value, str) else value
    try:
        numbers = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 3 or min(numbers) < 1:
        raise ConfigError(
            option,
            f"{value!r} is not three positive integers T,Y,X",
            f"write it as {option} 32,64,64",
        )
    return numbers  # type: ignore[return-value]


class ConfigFile(BaseModel):
    """Options a configuration file may set; each key is the option name without dashes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    patch: tuple[int, int, int] | None = Field(None, description="Patch size T,Y,X.")
    overlap: float | None = Field(None, ge=0.0, lt=1.0, description="Patch overlap in [0, 1).")
    block: tuple[int, int, int] | None = Field(None, description="Processing block T,Y,X.")
    window: Window | None = Field(None, description="Blending window.")
    sampling: Sampling | None = Field(None, description="Training-pair sampler.")
    steps: int | None = Field(None, ge=1, description="Training steps.")
    batch_size: int | None = Field(None, ge=1, description="Patches per training step.")
    lr: float | None = Field(None, gt=0, description="Learning rate.")
    scheduler: str | None = Field(None, description="Address of a running Dask scheduler.")
    workers: int | None = Field(None, ge=1, description="Local CPU worker processes.")
    gpus: str | None = Field(
        None,
        description="GPUs to use: all, none, or a list of positions among the visible GPUs "
        "(0,1) or ids (GPU-<uuid>).",
    )
    dashboard_address: str | None = Field(
        None, description="Dashboard address, e.g. 127.0.0.1:8787."
    )
    level: int | None = Field(None, ge=0, description="Multiscale level to read.")
    channel: int | None = Field(None, ge=0, description="Only this channel.")
    axes: str | None = Field(None, description="Axes of a plain Zarr array, e.g. tzyx.")
    dtype: OutputDtype | None = Field(None, description="Output dtype: float32 or input.")
    ngff: Ngff | None = Field(None, description="Output NGFF version: 0.5 or 0.4.")
    autocast: Autocast | None = Field(None, description="bf16 autocast: auto, on or off.")
    allow_missing_chunks: bool | None = Field(
        None, description="Read chunks missing from the input as the fill value."
    )
    overwrite: bool | None = Field(None, description="Replace an output of another run.")
    seed: int | None = Field(None, description="Random seed.")
    model: str | None = Field(None, description="Model file.")
    frames: int | None = Field(None, ge=16, description="Simulated frames.")
    planes: int | None = Field(None, ge=1, description="Simulated z planes.")
    size: tuple[int, int] | None = Field(None, description="Simulated frame size Y,X.")
    rate_hz: float | None = Field(None, gt=0, description="Simulated volume rate (Hz).")
    photons: float | None = Field(None, gt=0, description="Simulated photon budget.")

    @field_validator("patch", "block", "size", mode="before")
    @classmethod
    def _split_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part for part in value.replace(" ", "").split(","))
        return value

    @field_validator("ngff", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        # TOML and YAML read `ngff = 0.5` as a number
        return str(value) if isinstance(value, float) else value


def _validate(table: Mapping[str, Any], *, path: Path, where: str) -> dict[str, Any]:
    keys = {key.replace("-", "_"): value for key, value in table.items()}
    try:
        parsed = ConfigFile(**keys)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "?"
        raise ConfigError(
            path,
            f"{where}key {key!r}: {first['msg']}",
            "fix or remove that key (every key is an option name such as patch or steps)",
        ) from None
    options = parsed.model_dump(exclude_none=True)
    return {k: v.value if isinstance(v, enum.Enum) else v for k, v in options.items()}


def load_config_file(path: str | os.PathLike[str], *, command: str) -> dict[str, Any]:
    """Read a TOML or YAML configuration file and return the options for ``command``.

    Parameters
    ----------
    path
        A ``.toml``, ``.yaml`` or ``.yml`` file.
    command
        The command being run; its table (if any) overrides the flat keys.

    Returns
    -------
    dict
        Option values keyed by parameter name (``batch_size``, not ``--batch-size``).

    Raises
    ------
    ConfigError
        If the file is missing, unreadable, or holds an unknown key or a bad value.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(file, "the configuration file does not exist", "check the --config path")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif file.suffix.lower() in {".yaml", ".yml"}:
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(file, "unknown configuration format", "use a .toml or .yaml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        problem = str(exc).splitlines()[0]
        raise ConfigError(file, f"cannot be parsed ({problem})", "fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(file, "does not hold a table of options", "write key = value lines")
    flat = {k: v for k, v in data.items() if k not in COMMANDS}
    options = _validate(flat, path=file, where="")
    section = data.get(command)
    if section is not None:
        if not isinstance(section, dict):
            raise ConfigError(file, f"[{command}] is not a table", "write [{command}] key = value")
        options.update(_validate(section, path=file, where=f"[{command}] "))
    return options


def config_defaults(options: Mapping[str, Any]) -> dict[str, Any]:
    """Turn validated options into command-line defaults (``patch``/``block`` become text)."""
    defaults: dict[str, Any] = {}
    for key, value in options.items():
        if key in {"patch", "block"}:
            value = ",".join(str(v) for v in value)
        defaults[key] = value
    return defaults
