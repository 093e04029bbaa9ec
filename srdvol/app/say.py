"""srdvol's own lines on stderr (notes, warnings, what was written): one console, soft-wrapped,
with options shown as command-line flags."""

from __future__ import annotations

from rich.console import Console

from srdvol.errors import as_flags

__all__ = ["console", "say"]

console = Console(stderr=True, highlight=False)


def say(text: str) -> None:
    """Print one message line to stderr."""
    console.print(as_flags(text), soft_wrap=True, markup=False)
