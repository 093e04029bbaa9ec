"""Break each promise on purpose once, run the test meant to guard it, restore; print a table.

Issue 12: a promise counts as proved when a test fails once it is broken. Each row patches one
line of srdvol (the exact text must still be there: a row whose text moved says so), runs the
guarding tests, and writes the file back, whatever happened.

Run: ``python benchmarks/break_on_purpose.py`` (about 5 minutes on 2 cores).
"""

import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
BREAKS = [
    (
        "overlap-add: a block drops its neighbours' spills",
        "srdvol/dask/graph.py",
        "        num[place] += piece  # exact",
        "        pass  # num[place] += piece  # exact",
        ["tests/test_engine.py", "-k", "known_answer or each_patch_once"],
    ),
    (
        "halo: blocks read no halo (depth 0)",
        "srdvol/core/tiling.py",
        "depth.append(p - 1 if a in steps and n > p else 0)",
        "depth.append(0)",
        ["tests/test_tiling.py", "tests/test_engine.py", "-k", "known_answer or plan"],
    ),
    (
        "resume: the writer starts again from block 0",
        "srdvol/dask/writer.py",
        "order = units.order(i for i in range(total) if book is None or not book.is_done(i))",
        "order = units.order(i for i in range(total))",
        ["tests/test_engine.py", "-k", "resume"],
    ),
    (
        "wave: the writer ignores the bound",
        "srdvol/dask/writer.py",
        "    if wave is None:\n        wave = _default_wave(",
        "    if True:\n        wave = _default_wave(",
        ["tests/test_engine.py", "-k", "writer_on_local_cluster"],
    ),
    (
        "DDP: no gradient all-reduce (the network is not wrapped)",
        "srdvol/dask/ranks.py",
        "        return DistributedDataParallel(module)\n",
        "        return module\n",
        ["tests/test_ddp_promises.py"],
    ),
    (
        "GPUs: UUIDs in CUDA_VISIBLE_DEVICES dropped",
        "srdvol/dask/gpus.py",
        "if not (item.isdigit() or item.startswith(DEVICE_PREFIXES)):",
        "if not item.isdigit():",
        ["tests/test_cluster.py", "-k", "uuid or UUID or visible"],
    ),
    (
        "false deaths: one missing sighting is a death",
        "srdvol/dask/workers.py",
        "if a in self._missing_since and moment - self._missing_since[a] >= self.confirm",
        "if a in self._missing_since",
        ["tests/test_cluster.py", "-k", "lost_only_when"],
    ),
    (
        "NaN outside the sample: the rerun advice is lost",
        "srdvol/app/commands.py",
        "            except BlockInputError as exc:",
        "            except ZeroDivisionError as exc:",
        ["tests/test_cli_errors.py", "-k", "nan_outside"],
    ),
    (
        "resumed training: the log's first line is a later step",
        "srdvol/progress.py",
        "            if self.done:\n",
        "            if False:\n",
        ["tests/test_progress.py"],
    ),
]


def run_tests(test: list[str]) -> tuple[bool, str]:
    """Run pytest on ``test``; (failed, the failing tests or pytest's last line)."""
    command = [str(ROOT / ".venv/bin/python"), "-m", "pytest", "-q", "-x"]
    done = subprocess.run(
        [*command, "-p", "no:cacheprovider", *test],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = done.stdout.splitlines()
    failed = [x.split(" - ")[0].removeprefix("FAILED ") for x in lines if x.startswith("FAILED")]
    return bool(done.returncode), ", ".join(failed) or (lines[-1] if lines else "")


def main() -> None:
    rows = []
    for what, path, old, new, test in BREAKS:
        file = ROOT / path
        text = file.read_text()
        if old not in text:
            rows.append((what, path, "patch text not found", ""))
            continue
        file.write_text(text.replace(old, new, 1))
        try:
            failed, detail = run_tests(test)
        finally:
            file.write_text(text)
        rows.append((what, path, "caught" if failed else "NOT caught", detail))
        print(rows[-1], flush=True)
    print("\n| broken on purpose | file | result | test that failed |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
