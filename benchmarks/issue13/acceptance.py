"""Issue 13's acceptance, per seed, from ``benchmarks/quality.py --json`` files.

For each (photons, seed) and each srdvol row (``srdvol``, ``srdvol, --anchor 0`` ...), the four
targets against the baselines of the same movie, each Gaussian picked with the truth for that
score alone:

- SNR at least 3 dB above the best Gaussian's (2D or 3D);
- cell trace r above the noisy input's and the best Gaussian's;
- median transient gain between 0.95 and 1.05;
- pixel trace r inside somata above the best Gaussian's.

Files ending in ``.jsonl`` are ``benchmarks/issue13/inference.py`` output on the models of such
a run: their rows join the movie's baselines (``anchor`` is srdvol's default, ``guide`` is
``--guide``, ``guided-input R`` the guided filter alone on the noisy input, scored as a
reference against the same targets), and so do ``ceiling.py``'s (``oracle ...``: estimators
that know the simulated scene), ``mean_input.py``'s (``mean-input ...``, with their training
seed) and ``restore.py``'s (``srdvol predict --restore``).

Prints one markdown table. Run from the repository root::

    python benchmarks/issue13/acceptance.py benchmarks/issue13/anchor-p4.json [...] [X.jsonl]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quality import markdown


def best(rows: list[dict], key: str) -> float:
    """The best Gaussian baseline's ``key``."""
    return max(r[key] for r in rows if r["method"].startswith("Gaussian"))


def verdicts(rows: list[dict]) -> list[list[str]]:
    """One table row per srdvol row of one movie's rows."""
    noisy = next(r for r in rows if r["method"] == "noisy input")
    snr, trace, pixel = (best(rows, k) for k in ("snr_db", "trace_r", "pixel_r"))
    lines = []
    for r in rows:
        if not r["method"].startswith(("srdvol", "guided filter", "oracle", "mean-input")):
            continue
        checks = {
            "SNR - best Gaussian": (f"{r['snr_db'] - snr:+.2f} dB", r["snr_db"] - snr >= 3),
            "trace r - noisy": (
                f"{r['trace_r'] - noisy['trace_r']:+.4f}",
                r["trace_r"] > noisy["trace_r"],
            ),
            "trace r - best Gaussian": (f"{r['trace_r'] - trace:+.4f}", r["trace_r"] > trace),
            "gain": (f"{r['trace_gain']:.3f}", 0.95 <= r["trace_gain"] <= 1.05),
            "pixel r - best Gaussian": (f"{r['pixel_r'] - pixel:+.3f}", r["pixel_r"] > pixel),
        }
        met = sum(ok for _, ok in checks.values())
        lines.append(
            [f"{r['photons']:g}", str(r["seed"]), r["method"]]
            + [text if ok else f"**{text}**" for text, ok in checks.values()]
            + [f"{met} of {len(checks)}"]
        )
    return lines


#: inference.py's method names as quality.py's rows name them.
INFERENCE_NAMES = {"anchor": "srdvol (inference.py)", "plain": "srdvol, --anchor 0 (inference.py)"}


def inference_rows(path: Path) -> list[dict]:
    """``inference.py`` lines as quality.py rows (photons and seed from the model tag)."""
    rows = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        method = row["method"]
        if method == "noisy":
            continue
        if method.startswith(("oracle", "mean-input", "srdvol")):
            pass  # ceiling.py's, mean_input.py's and restore.py's rows name themselves
        elif method.startswith("guided-input"):
            method = f"guided filter of the input, radius {method.split()[-1]}"
        elif method == "guide":
            method = "srdvol --guide (inference.py)"
        else:
            method = INFERENCE_NAMES.get(method, f"srdvol {method} (inference.py)")
        if "train_seed" in row:  # mean_input.py's: one movie, several trainings
            method = f"{method}, training seed {row['train_seed']}"
        photons, seed = row["model"].split("-")
        rows.append({**row, "photons": float(photons), "seed": int(seed), "method": method})
    return rows


def main() -> None:
    rows = []
    for name in sys.argv[1:]:
        path = Path(name)
        if path.suffix == ".jsonl":
            rows += inference_rows(path)
        else:
            rows += json.loads(path.read_text())["rows"]
    movies: dict[tuple[float, int], list[dict]] = {}
    for r in rows:
        movies.setdefault((r["photons"], r["seed"]), []).append(r)
    header = ["photons", "seed", "method", "SNR - best Gaussian", "trace r - noisy"]
    header += ["trace r - best Gaussian", "gain", "pixel r - best Gaussian", "targets met"]
    table = [line for key in sorted(movies, reverse=True) for line in verdicts(movies[key])]
    print("Bold: target missed.\n")
    print(markdown(header, table))


if __name__ == "__main__":
    main()
