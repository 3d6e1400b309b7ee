"""Print the model-integration table (tests/models_table.py): every family × column, with its
figures — max relative eval difference, loss first→last, layers converted — or the error.

    python benchmarks/models_table.py [--family NAME] [--column NAME] [--markdown]

One process, one thread is the reference setting (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import models_table as mt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", action="append")
    ap.add_argument("--column", action="append")
    ap.add_argument("--markdown", action="store_true", help="a markdown table at the end")
    args = ap.parse_args()
    grid: dict[str, dict[str, str]] = {}
    t0 = time.perf_counter()
    for fam, col in mt.cells():
        if (args.family and fam not in args.family) or (args.column and col not in args.column):
            continue
        t = time.perf_counter()
        try:
            r = mt.run_cell(fam, col)
            cell = f"{r.kind}: {r.figures()}"
        except Exception as e:  # noqa: BLE001 — a table of outcomes, failures included
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            cell = f"FAIL {type(e).__name__}: {msg[:110]}"
            if "-v" in sys.argv:
                traceback.print_exc()
        cell += f" [{time.perf_counter() - t:.1f}s]"
        grid.setdefault(fam, {})[col] = cell
        print(f"{fam:22} {col:11} {cell}", flush=True)
    print(f"total {time.perf_counter() - t0:.1f} s")
    if args.markdown:
        cols = [c for c in mt.COLUMNS if any(c in row for row in grid.values())]
        print("| family | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        for fam, row in grid.items():
            print(f"| {fam} | " + " | ".join(row.get(c, "n/a") for c in cols) + " |")


if __name__ == "__main__":
    main()
