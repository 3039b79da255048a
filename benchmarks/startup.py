"""Benchmark: how long `import veil` and `veil --help` take, against a bare `python -c pass`
(issue 21: `veil --help` under 0.5 s, `import veil` under 1 s on an idle machine).

Each command is a fresh process of this interpreter, timed by wall clock from spawn to exit; the
commands are interleaved run by run, so load from other work falls on all of them alike. The
figures are the median over the runs, and each one's ratio to `python -c pass` of the same run.
Also reported: the load average before and after, and whether a heavy library (torch,
scikit-learn, TenSEAL, transformers) was imported, from `python -X importtime`. With
`--baseline-src DIR` (another checkout's `src`, e.g. `git archive REV src | tar -x -C DIR`) the
Veil commands are timed from there too, in the same interleaved runs, for a before/after.

    python benchmarks/startup.py [--runs 15] [--quick] [--baseline-src DIR]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

#: name → arguments after `python`.
COMMANDS: dict[str, list[str]] = {
    "python -c pass": ["-c", "pass"],
    'python -c "import veil"': ["-c", "import veil"],
    "veil --help": ["-m", "veil.cli", "--help"],
    "veil run --help": ["-m", "veil.cli", "run", "--help"],
    "veil --version": ["-m", "veil.cli", "--version"],
}

HEAVY = ("torch", "sklearn", "tenseal", "transformers")


def _env(src: str | None) -> dict[str, str] | None:
    return None if src is None else {**os.environ, "PYTHONPATH": src}


def _time_once(argv: list[str], src: str | None) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], check=True, stdout=subprocess.DEVNULL, env=_env(src))
    return time.perf_counter() - start


def _heavy_imports(argv: list[str], src: str | None) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        check=True,
        capture_output=True,
        text=True,
        env=_env(src),
    )
    top = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    return sorted(top.intersection(HEAVY))


def measure(runs: int, baseline_src: str | None = None) -> dict[str, Any]:
    """Median wall seconds of each command over `runs` interleaved runs, after one warm-up."""
    cases: dict[str, tuple[list[str], str | None]] = {
        name: (argv, None) for name, argv in COMMANDS.items()
    }
    if baseline_src is not None:
        cases |= {
            f"{name} [baseline]": (argv, baseline_src)
            for name, argv in COMMANDS.items()
            if name != "python -c pass"
        }
    for argv, src in cases.values():  # warm the page cache and .pyc files
        _time_once(argv, src)
    times: dict[str, list[float]] = {name: [] for name in cases}
    load_before = os.getloadavg()
    for _ in range(runs):
        for name, (argv, src) in cases.items():
            times[name].append(_time_once(argv, src))
    load_after = os.getloadavg()
    baseline = statistics.median(times["python -c pass"])
    rows = []
    for name, (argv, src) in cases.items():
        median = statistics.median(times[name])
        rows.append(
            {
                "command": name,
                "median_s": round(median, 4),
                "min_s": round(min(times[name]), 4),
                "max_s": round(max(times[name]), 4),
                "over_python_s": round(median - baseline, 4),
                "ratio_to_python": round(median / baseline, 2),
                "heavy_imports": _heavy_imports(argv, src),
            }
        )
    return {
        "benchmark": "startup",
        "runs": runs,
        "baseline_src": baseline_src,
        "python": sys.version.split()[0],
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "commands": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs of each command")
    parser.add_argument("--quick", action="store_true", help="3 runs each")
    parser.add_argument("--baseline-src", help="also time the Veil commands from this src folder")
    args = parser.parse_args()
    summary = measure(3 if args.quick else args.runs, args.baseline_src)
    print(f"{'command':<40} {'median':>8} {'min':>8} {'max':>8} {'x python':>9}  heavy imports")
    for row in summary["commands"]:
        print(
            f"{row['command']:<40} {row['median_s']:>7.3f}s {row['min_s']:>7.3f}s "
            f"{row['max_s']:>7.3f}s {row['ratio_to_python']:>8.1f}x  "
            f"{', '.join(row['heavy_imports']) or '-'}"
        )
    print(
        f"load average before {summary['load_average_before']}, "
        f"after {summary['load_average_after']}"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
