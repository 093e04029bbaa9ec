"""Axis names and orders: what srdvol accepts and how it reads them.

srdvol works on the NGFF axis names ``t``, ``c``, ``z``, ``y`` and ``x``. Time, y and x are
required (the method denoises (t, y, x) movies); ``c`` and ``z`` only partition the work.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from srdvol.errors import InputError, flag

__all__ = [
    "CANONICAL_ORDER",
    "MOVIE_AXES",
    "PARTITION_AXES",
    "axis_type",
    "parse_axes",
    "validate_axes",
]

#: The order NGFF 0.4/0.5 prescribes: time, channel, then space (z, y, x).
CANONICAL_ORDER: tuple[str, ...] = ("t", "c", "z", "y", "x")
#: Axes the network sees together: each (c, z) plane is one (t, y, x) movie.
MOVIE_AXES: tuple[str, ...] = ("t", "y", "x")
#: Axes that only split the work into independent movies.
PARTITION_AXES: tuple[str, ...] = ("c", "z")

_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
_TIME_ALIASES = {"time", "t"}
_CHANNEL_ALIASES = {"c", "channel", "ch"}


def axis_type(name: str) -> str:
    """Return the NGFF axis type (``time``, ``channel`` or ``space``) of a canonical axis name."""
    return _TYPES[name]


def parse_axes(spec: str | Sequence[str], *, subject: str | None = None) -> tuple[str, ...]:
    """Turn ``"tzyx"``, ``"t,z,y,x"`` or ``["t", "z", "y", "x"]`` into a validated axis tuple.

    Parameters
    ----------
    spec
        Axis letters as one string (with or without commas) or a sequence of names.
    subject
        What to name in an error message (the store path or the ``--axes`` option).

    Returns
    -------
    tuple of str
        Lower-case canonical axis names in the given order.

    Raises
    ------
    InputError
        If a name is unknown, repeated, or t, y or x is missing.
    """
    if isinstance(spec, str):
        text = spec.replace(",", "").replace(" ", "").lower()
        names: list[str] = list(text)
    else:
        names = [str(name).lower() for name in spec]
    names = ["t" if n in _TIME_ALIASES else "c" if n in _CHANNEL_ALIASES else n for n in names]
    return validate_axes(names, subject=subject or flag("axes"))


def validate_axes(names: Iterable[str], *, subject: str | None) -> tuple[str, ...]:
    """Check that ``names`` are distinct canonical axes that include t, y and x."""
    axes = tuple(names)
    unknown = [n for n in axes if n not in _TYPES]
    if unknown:
        raise InputError(
            subject,
            f"unknown axis name(s) {', '.join(map(repr, unknown))} (srdvol knows t, c, z, y, x)",
            f"name the axes with those letters, for example {flag('axes')} tzyx",
        )
    if len(set(axes)) != len(axes):
        raise InputError(subject, f"axis names {axes} repeat a name", "give each axis once")
    missing = [n for n in MOVIE_AXES if n not in axes]
    if missing:
        what = "no time axis" if "t" in missing else f"no {' or '.join(missing)} axis"
        raise InputError(
            subject,
            f"the image has {what} (axes {''.join(axes)})",
            "srdvol denoises time series with t, y and x axes; for a plain Zarr array pass "
            f"{flag('axes')} (for example {flag('axes')} tzyx)",
        )
    return axes
