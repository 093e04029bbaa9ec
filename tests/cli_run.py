"""Run the ``srdvol`` command line in the test process (shared by the CLI test modules)."""

from __future__ import annotations

from srdvol.app.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``srdvol ARGS`` in-process; return (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
