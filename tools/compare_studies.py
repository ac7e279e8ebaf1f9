"""Compare two finished studies table by table: for each Parquet file of one model's folder, the
largest absolute difference of its KL and loss columns and the largest relative difference of its
other float columns (relative to ``max(|value|, 1e-3)``), and any differing text or integer column.

    python tools/compare_studies.py STUDY_A/smollm2-135m STUDY_B/smollm2-135m

Used to check that a study on one backend (or precision, or machine) gives the numbers of another.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd


def _is_kl_or_loss(column: str) -> bool:
    return ("kl" in column or "loss" in column) and not column.endswith("_sem")


def compare(a: pd.DataFrame, b: pd.DataFrame) -> tuple[float | None, float | None, list[str]]:
    """(largest KL/loss difference, largest relative difference of the other floats, columns that differ)."""
    if a.shape != b.shape or list(a.columns) != list(b.columns):
        return None, None, [f"shape {a.shape} against {b.shape}"]
    floats = [c for c in a.columns if a[c].dtype.kind == "f"]
    kl = [c for c in floats if _is_kl_or_loss(c)]
    differing = [c for c in a.columns if c not in floats and not a[c].reset_index(drop=True).equals(b[c].reset_index(drop=True))]

    def gap(column: str, relative: bool) -> float:
        x, y = a[column].to_numpy(float), b[column].to_numpy(float)
        if (np.isnan(x) != np.isnan(y)).any():
            return float("inf")
        d = np.abs(x - y)
        if relative:
            d = d / np.maximum(1e-3, np.abs(x))
        return float(np.nanmax(d)) if len(d) and not np.isnan(d).all() else 0.0

    worst_kl = max((gap(c, False) for c in kl), default=None)
    worst_rel = max((gap(c, True) for c in floats if c not in kl), default=None)
    return worst_kl, worst_rel, differing


def main(argv: list[str]) -> int:
    """Print one line per table of the first study's folder."""
    if len(argv) != 2:
        print(__doc__)
        return 2
    root_a, root_b = map(Path, argv)
    for file_a in sorted(root_a.rglob("*.parquet")):
        rel = file_a.relative_to(root_a)
        file_b = root_b / rel
        if not file_b.is_file():
            print(f"{rel}: missing in {root_b}")
            continue
        kl, other, differing = compare(pd.read_parquet(file_a), pd.read_parquet(file_b))
        fmt = (lambda v: "-" if v is None else f"{v:.1e}")  # noqa: E731
        print(f"{str(rel):48s} KL/loss abs {fmt(kl):8s} other rel {fmt(other):8s}"
              + (f" differ: {', '.join(differing)}" if differing else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
