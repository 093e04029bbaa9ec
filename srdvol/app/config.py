"""Configuration files: every command-line option can also come from a TOML or YAML file given
with ``--config FILE``.

The file's keys are the options' parameter names (``batch_size`` or ``batch-size``). They are
validated by the same option groups the command line fills (:mod:`srdvol.options`), then used as
the command's defaults; options typed on the command line win. A file may hold flat keys, which
apply to every command, and tables named after commands, which apply to that command only::

    patch = [32, 64, 64]
    overlap = 0.25

    [train]
    steps = 2000
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from srdvol.errors import ConfigError, SrdvolError
from srdvol.options import Patch, RunOptions, SimulateOptions

__all__ = ["COMMANDS", "config_defaults", "load_config_file"]

#: Commands whose options a configuration file may set in a table of their own.
COMMANDS = ("denoise", "train", "predict", "simulate", "evaluate", "info", "demo")
#: Keys that are no option group's field: the model file of predict/denoise, the demo's folder.
_PLAIN_KEYS = {"model": str, "workdir": str}


def _check_key(key: str, value: Any) -> Any:
    """Validate one key with the option group that owns it; return the value to use."""
    if key in _PLAIN_KEYS:
        if not isinstance(value, _PLAIN_KEYS[key]):
            raise ConfigError(key, f"{value!r} is not a path", "write it as text")
        return value
    if key in SimulateOptions.model_fields and key not in RunOptions.flat_names():
        return getattr(SimulateOptions.create(**{key: value}), key)
    options = RunOptions.from_flat({key: value})
    group = RunOptions.flat_names()[key][0]
    return getattr(getattr(options, group), key)


def _validate(table: Mapping[str, Any], *, path: Path, where: str) -> dict[str, Any]:
    options = {}
    for key, value in table.items():
        name = str(key).replace("-", "_")
        try:
            options[name] = _check_key(name, value)
        except SrdvolError as exc:
            raise ConfigError(
                path,
                f"{where}key {name!r}: {exc.problem}",
                "fix or remove that key (every key is an option name such as patch or steps)",
            ) from None
    return options


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
        Validated option values keyed by parameter name (``batch_size``).

    Raises
    ------
    ConfigError
        If the file is missing, unreadable, or holds an unknown key or a bad value (naming the
        file and the key).
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(file, "the configuration file does not exist", "check the file's path")
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
            raise ConfigError(file, f"[{command}] is not a table", f"write [{command}] key = value")
        options.update(_validate(section, path=file, where=f"[{command}] "))
    return options


def config_defaults(options: Mapping[str, Any]) -> dict[str, Any]:
    """Turn validated options into command-line defaults, written as the command line writes
    them (``32,64,64`` for a patch, enum values as text)."""
    defaults: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Patch):
            value = value.text()
        elif hasattr(value, "value"):  # an enum
            value = value.value
        elif isinstance(value, tuple) and key == "size":
            value = tuple(value)
        defaults[key] = value
    return defaults
