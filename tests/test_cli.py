"""The command line: help, option parsing, one-line errors and exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from srdvol.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``srdvol ARGS`` in-process; return (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_console_script_help_lists_every_command():
    result = subprocess.run(
        [sys.executable, "-m", "srdvol.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("denoise", "train", "predict", "simulate", "evaluate", "info", "demo"):
        assert command in result.stdout


def test_unknown_option_is_a_usage_error(capsys):
    code, _, err = run_cli(capsys, "info", "x.zarr", "--pach", "16,32,32")
    assert code == 2
    assert "--pach" in err
    assert "Traceback" not in err


def test_bad_config_file_is_one_line_error(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("overlap = 2\n")
    code, _, err = run_cli(capsys, "info", "x.zarr", "--config", str(config))
    assert code == 2
    assert err.count("\n") == 1
    assert "run.toml" in err and "'overlap'" in err
    assert "Traceback" not in err


def test_bad_patch_option_names_the_fix(tmp_path, capsys):
    code, _, err = run_cli(capsys, "info", str(tmp_path / "x.zarr"), "--patch", "16,32")
    assert code == 2
    assert "--patch 32,64,64" in err


@pytest.mark.parametrize("debug", [False, True])
def test_debug_shows_traceback(tmp_path, capsys, debug):
    config = tmp_path / "run.toml"
    config.write_text("overlap = 2\n")
    args = (["--debug"] if debug else []) + ["info", "x.zarr", "--config", str(config)]
    if debug:
        from srdvol.errors import ConfigError

        with pytest.raises(ConfigError):
            main(args)
    else:
        code, _, _ = run_cli(capsys, *args)
        assert code == 2
