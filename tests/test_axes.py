"""Axis parsing and validation."""

from __future__ import annotations

import pytest

from srdvol.axes import parse_axes
from srdvol.errors import InputError


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("tzyx", ("t", "z", "y", "x")),
        ("T,Y,X", ("t", "y", "x")),
        (["time", "c", "y", "x"], ("t", "c", "y", "x")),
    ],
)
def test_parse_axes(spec, expected):
    assert parse_axes(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [("zyx", "no time axis"), ("tyy", "repeat"), ("tqyx", "unknown axis"), ("tzy", "no x axis")],
)
def test_bad_axes(spec, message):
    with pytest.raises(InputError, match=message) as info:
        parse_axes(spec)
    assert "--axes" in info.value.command_line_message()
    assert "axes" in str(info.value) and "--axes" not in str(info.value)
