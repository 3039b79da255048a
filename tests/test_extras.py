"""A missing test extra fails the run under CI and skips elsewhere (tests/extras.py)."""

from __future__ import annotations

import pytest

from extras import require


def test_a_missing_extra_fails_under_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must have it"):
        require("veil_no_such_package")
    assert require("numpy").__name__ == "numpy"
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require("veil_no_such_package")
