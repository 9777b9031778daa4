"""Median of several login_benchmark.py runs: one table, one JSON and one PNG.

Figures on a shared 2-core machine are noisy, so README.rst reports the
median of each cell over several runs, made with::

    for run in 1 2 3 4 5; do
        .venv/bin/python benchmarks/login_benchmark.py --logins 500 --seconds 20 --workers 1 2 --rounds 2 \\
            --json /tmp/login-$run.json --png /tmp/login-$run.png
    done
    .venv/bin/python benchmarks/median_of_runs.py /tmp/login-*.json

Each numeric field of a cell (bind type, kind, workers, concurrency) is the
median of that field over the runs; failures are summed. The workers
ratios are given twice: of the median cells, and the median of each run's
own ratio with the range (a run measures the two cells over the same
minutes, in rounds, so its ratio does not suffer from the machine's drift
between runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import benchlib as lib
import login_benchmark as bench

KEY = ("bind_type", "kind", "workers", "concurrency")


def combine(reports: list[dict]) -> list[dict]:
    cells: dict[tuple, list[dict]] = {}
    for report in reports:
        for cell in report["cells"]:
            cells.setdefault(tuple(cell.get(name, 1) for name in KEY), []).append(cell)
    rows = []
    for key, runs in cells.items():
        row = dict(zip(KEY, key))
        for name in runs[0]:
            values = [run[name] for run in runs if isinstance(run.get(name), (int, float))]
            if name in KEY or not values:
                continue
            row[name] = sum(values) if name == "failures" else round(statistics.median(values), 2)
        row["runs"] = len(runs)
        row.setdefault("errors", {})
        rows.append(row)
    return rows


def run_ratios(reports: list[dict]) -> dict[tuple, list[float]]:
    """Per (bind type, kind, concurrency, workers > 1): each run's logins/s against its own workers = 1 cell."""
    ratios: dict[tuple, list[float]] = {}
    for report in reports:
        single = {(c["bind_type"], c["kind"], c["concurrency"]): c for c in report["cells"] if c.get("workers", 1) == 1}
        for cell in report["cells"]:
            base = single.get((cell["bind_type"], cell["kind"], cell["concurrency"]))
            if cell.get("workers", 1) > 1 and base is not None and base["logins_per_s"]:
                key = (cell["bind_type"], cell["kind"], cell["concurrency"], cell["workers"])
                ratios.setdefault(key, []).append(cell["logins_per_s"] / base["logins_per_s"])
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by login_benchmark.py")
    parser.add_argument("--json", type=Path, default=lib.REPOSITORY / "benchmarks/results/login.json")
    parser.add_argument("--png", type=Path, default=lib.REPOSITORY / "benchmarks/results/login.png")
    args = parser.parse_args()
    reports = [json.loads(path.read_text(encoding="utf-8")) for path in args.runs]
    rows = combine(reports)
    print(f"median of {len(reports)} runs")
    print(bench.HEADER)
    for row in rows:
        bench.print_row(row)
    bench.print_worker_ratios(rows, reports[0].get("machine", {}).get("cpus", 0))
    ratios = run_ratios(reports)
    if ratios:
        print("each run's own workers ratio: median (range)")
    for (bind_type, kind, concurrency, workers), values in ratios.items():
        print(f"{bind_type:<7} {kind:<5} concurrency {concurrency:>3}: workers={workers} / workers=1 = "
              f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})", flush=True)
    report = dict(reports[0], cells=rows, runs=[report["when"] for report in reports])
    report["run_ratios"] = [
        {"bind_type": key[0], "kind": key[1], "concurrency": key[2], "workers": key[3],
         "median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}
        for key, values in ratios.items()
    ]
    report["note"] = f"each cell is the median of {len(reports)} runs (benchmarks/median_of_runs.py)"
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    bench.draw(rows, args.png, bench.PEERS)


if __name__ == "__main__":
    main()
