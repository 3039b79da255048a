"""How many clients a fraction selects: one rule shared by config validation and strategies."""

from __future__ import annotations

import math
from fractions import Fraction


def sample_size(fraction: float, n_clients: int) -> int:
    """ceil(fraction · n_clients), at least 1, computed on the decimal value of `fraction`.

    Plain floating point would give ceil(0.07 · 100) = ceil(7.000000000000001) = 8.
    """
    exact = Fraction(str(fraction)) * n_clients
    return max(1, math.ceil(exact))


def count_of(fraction: float, n_clients: int) -> int:
    """⌊fraction · n_clients⌋ (possibly 0), computed on the decimal value of `fraction`."""
    return math.floor(Fraction(str(fraction)) * n_clients)
