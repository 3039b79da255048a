"""CKKS aggregation: the encrypted sum equals the plain sum, the overflow guard, the server's
refusal of a secret key, the decryptors' rules, and what the server receives."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import tenseal as ts
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.crypto.identity import IdentityKey
from veil.errors import UserError
from veil.federation.messages import FitResult, ProtocolInstruction
from veil.federation.pipeline import AggregationFailed, RoundContext, UpdateRejected
from veil.privacy.he import keys as he_keys
from veil.privacy.he.aggregator import ENCRYPTED, CkksAggregator
from veil.privacy.he.ckks import (
    CkksParams,
    OverflowRisk,
    Packing,
    SecretKeyRefused,
    load_public_context,
    new_secret_context,
    secret_context_bytes,
)
from veil.privacy.he.keys import PublicKeySet
from veil.privacy.he.participant import CkksParticipant
from veil.privacy.he.settings import CkksSettings
from veil.privacy.he.wire import CONFIRM, DECRYPT
from veil.privacy.secagg.layout import UpdateLayout
from veil.privacy.secagg.roster import StaticRoster

PARAMS = CkksParams()
SHAPES = {"w": (3, 5), "b": (3,)}
LAYOUT = UpdateLayout.of({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})


class Channel:
    """Carries the decryption step to in-process participants (what a transport does)."""

    def __init__(self, participants: Mapping[str, CkksParticipant], run_id: str, rnd: int) -> None:
        self.participants = participants
        self.run_id, self.round = run_id, rnd
        self.requests: list[tuple[str, bytes]] = []

    def exchange(self, stage: str, bodies: Mapping[str, bytes]) -> dict[str, bytes]:
        self.requests += [(stage, b) for b in bodies.values()]
        return {
            c: self.participants[c].handle(ProtocolInstruction(self.run_id, self.round, stage, b))
            for c, b in bodies.items()
        }


def federation(n: int, settings: CkksSettings) -> tuple[CkksAggregator, dict[str, CkksParticipant]]:
    secret, public = he_keys.generate(settings.params)
    identities = {f"c{i}": IdentityKey.generate() for i in range(n)}
    roster = StaticRoster({c: k.public_key() for c, k in identities.items()})
    return CkksAggregator(settings, LAYOUT, public), {
        c: CkksParticipant(c, secret, settings, LAYOUT, k, roster) for c, k in identities.items()
    }


def aggregate_round(
    updates: Mapping[str, tuple[dict[str, np.ndarray], float]], settings: CkksSettings
) -> tuple[object, Channel, list[FitResult]]:
    aggregator, parts = federation(len(updates), settings)
    context = RoundContext("run", 1, clients=tuple(parts))
    channel = Channel(parts, "run", 1)
    accumulator = aggregator.start(LAYOUT.reference_view(), context, channel)  # type: ignore[arg-type]
    sealed = []
    for name, (update, weight) in zip(parts, updates.values(), strict=True):
        fit = FitResult(name, 1, update, weight=weight, num_examples=int(weight))
        sealed.append(parts[name].seal(fit, context))
        accumulator.add(sealed[-1])
    return accumulator.finish(), channel, sealed


@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(2, 6),
    scale=st.floats(1e-3, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_encrypted_sum_equals_plain_sum(n: int, scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    updates = {
        f"c{i}": (
            {k: (scale * rng.uniform(-1, 1, s)).astype(np.float32) for k, s in SHAPES.items()},
            float(rng.integers(1, 1000)),
        )
        for i in range(n)
    }
    s = CkksSettings(clip_range=1.0, max_weight=1000.0)
    aggregate, _, _ = aggregate_round(updates, s)
    expected = {k: sum(w * u[k].astype(np.float64) for u, w in updates.values()) for k in SHAPES}
    weight = sum(w for _, w in updates.values())
    largest = max(float(np.max(np.abs(v))) for v in expected.values())
    for k, v in expected.items():
        # Within 1e-4 relative to the largest entry, and within the stated tolerance.
        error = np.max(np.abs(aggregate.total[k] - v))  # type: ignore[attr-defined]
        assert error <= 1e-4 * largest
        assert error <= s.tolerance(n) + largest * 2**-22  # float32 of the result
    assert aggregate.weight == pytest.approx(weight, abs=s.tolerance(n))  # type: ignore[attr-defined]
    assert aggregate.count == n  # type: ignore[attr-defined]


def test_the_server_sees_ciphertexts_of_a_fixed_size_only() -> None:
    rng = np.random.default_rng(0)
    updates = {
        f"c{i}": ({k: rng.uniform(-1, 1, s).astype(np.float32) for k, s in SHAPES.items()}, 10.0)
        for i in range(3)
    }
    aggregate, channel, sealed = aggregate_round(updates, CkksSettings())
    size = Packing(PARAMS, LAYOUT.length + 3).nbytes
    for r in sealed:
        assert set(r.update) == {ENCRYPTED} and r.update[ENCRYPTED].shape == (size,)
        assert r.weight == 0.0 and r.num_examples == 0 and not r.sums and not r.metrics
        raw = r.update[ENCRYPTED].tobytes()
        for u, _ in updates.values():
            assert u["w"].tobytes()[:16] not in raw
    # Every member confirmed the member set; two decryptors were asked once each, with the
    # same request (every member's upload and signature).
    assert [stage for stage, _ in channel.requests].count(CONFIRM) == 3
    decrypts = [body for stage, body in channel.requests if stage == DECRYPT]
    assert len(decrypts) == 2 and len(set(decrypts)) == 1
    assert aggregate.report["count_slot_error"] <= aggregate.report["tolerance"]  # type: ignore[attr-defined]


def test_overflow_guard_refuses_a_configuration_designed_to_wrap() -> None:
    # Ten clients whose weighted updates reach 2e5 each: 2e6 · 2^40 passes q/2 of a 60-bit
    # prime. The guard refuses the settings ...
    s = CkksSettings(clip_range=1.0, max_weight=2e5)
    with pytest.raises(OverflowRisk, match="wraps around"):
        s.check_capacity(10)
    CkksSettings(clip_range=1.0, max_weight=1e4).check_capacity(10)
    # ... and it is right to: without it the sum silently wraps.
    context = new_secret_context(PARAMS)
    total = ts.ckks_vector(context, [2e5])
    for _ in range(9):
        total += ts.ckks_vector(context, [2e5])
    assert abs(total.decrypt()[0] - 2e6) > 1e3


def test_overflow_guard_stops_a_run_before_it_starts(tmp_path: object) -> None:
    import veil
    from veil.config import RunConfig

    cfg = RunConfig.from_dict(
        {
            "secure_aggregation": "ckks",
            "data": {"dataset": "breast_cancer", "scaling": "local"},
            "model": {"name": "logistic"},
            "federation": {"clients": 10, "rounds": 1},
            "ckks": {"max_weight": 1e6, "clip_range": 1.0},
        }
    )
    with pytest.raises(UserError, match="overflow"):
        veil.run(cfg)


def test_server_refuses_a_context_with_a_secret_key() -> None:
    secret, public = he_keys.generate(PARAMS)
    leaked = PublicKeySet(public.key_id, PARAMS, secret.context)
    with pytest.raises(SecretKeyRefused, match="secret key"):
        CkksAggregator(CkksSettings(), LAYOUT, leaked)
    with pytest.raises(SecretKeyRefused):
        load_public_context(secret_context_bytes(new_secret_context(PARAMS)), PARAMS)
    assert not load_public_context(public.context, PARAMS).has_secret_key()


def test_an_upload_of_the_wrong_size_or_bytes_is_rejected() -> None:
    aggregator, parts = federation(2, CkksSettings())
    context = RoundContext("run", 1, clients=tuple(parts))
    accumulator = aggregator.start(LAYOUT.reference_view(), context, Channel(parts, "run", 1))  # type: ignore[arg-type]
    good = parts["c0"].seal(
        FitResult("c0", 1, {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}, 1.0, 1),
        context,
    )
    blob = good.update[ENCRYPTED]
    for bad in (blob[:-1], np.zeros_like(blob), np.full_like(blob, 7)):
        with pytest.raises(UpdateRejected):
            accumulator.add(FitResult("c0", 1, {ENCRYPTED: bad}, 0.0, 0))


def test_a_single_upload_is_never_decrypted() -> None:
    s = CkksSettings()
    aggregator, parts = federation(2, s)
    context = RoundContext("run", 1, clients=tuple(parts))
    update = {k: np.ones(sh, np.float32) * 0.1 for k, sh in SHAPES.items()}
    channel = Channel(parts, "run", 1)
    accumulator = aggregator.start(LAYOUT.reference_view(), context, channel)  # type: ignore[arg-type]
    accumulator.add(parts["c0"].seal(FitResult("c0", 1, update, 3.0, 3), context))
    with pytest.raises(AggregationFailed, match="at least 2 members"):
        accumulator.finish()
    assert channel.requests == []


def test_decryptors_release_the_same_flooded_values() -> None:
    rng = np.random.default_rng(5)
    updates = {
        f"c{i}": ({k: rng.uniform(-1, 1, sh).astype(np.float32) for k, sh in SHAPES.items()}, 5.0)
        for i in range(4)
    }
    s = CkksSettings(decryptors=3)
    aggregate, _, _ = aggregate_round(updates, s)
    report = aggregate.report  # type: ignore[attr-defined]
    assert len(report["decryptors_answered"]) == 3
    # Flooded: the released weight is off by noise on the order of flood_std, on the grid.
    step = report["release_step"]
    w = aggregate.weight  # type: ignore[attr-defined]
    assert w / step == pytest.approx(round(w / step), abs=1e-6)
    assert 0 < report["flood_std"] < report["tolerance"]
