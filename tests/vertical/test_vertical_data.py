"""German credit split between a bank and a payment company: disjoint columns, overlapping
rows, labels only at the bank, pseudonymous ids."""

from __future__ import annotations

import pytest

from veil.errors import DataError
from veil.vertical.data import BANK_COLUMNS, align, german_credit_parties


def test_columns_split_and_rows_overlap() -> None:
    bank, payment = german_credit_parties(seed=3)
    assert set(bank.feature_names).isdisjoint(payment.feature_names)
    assert len(bank.feature_names) + len(payment.feature_names) == 26
    assert all(n.split("=")[0] in BANK_COLUMNS for n in bank.feature_names)
    assert bank.labels is not None and payment.labels is None
    common = set(bank.ids) & set(payment.ids)
    assert 0 < len(common) < min(len(bank.ids), len(payment.ids))  # PSI has work to do
    assert all(i.startswith("cust-") and len(i) == 21 for i in bank.ids)
    ids = sorted(common)
    b, p = align(bank, ids), align(payment, ids)
    assert b.ids == p.ids == tuple(ids)
    assert b.features.shape[0] == p.features.shape[0] == len(ids)


def test_missing_ids_and_bad_fractions_are_refused() -> None:
    bank, _ = german_credit_parties()
    with pytest.raises(DataError, match="holds no row"):
        align(bank, ["cust-nobody"])
    with pytest.raises(DataError, match="bank_fraction"):
        german_credit_parties(bank_fraction=0)
