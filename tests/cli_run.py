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


def assert_one_clear_sentence(code: int, out: str, err: str, *, subject: str, words: str) -> None:
    """A refused command: exit 2, one line ``srdvol: error: SUBJECT: ...`` holding ``words``,
    no traceback (SUBJECT as given, or an absolute path ending in it)."""
    message = err.strip()
    assert code == 2, message
    assert message.count("\n") == 0, message
    assert message.startswith("srdvol: error: "), message
    named = message.removeprefix("srdvol: error: ").split(": ")[0]
    assert named == subject or named.endswith(f"/{subject}"), message
    assert words in message
    assert "Traceback" not in err + out
