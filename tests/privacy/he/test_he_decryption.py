"""CKKS decryptors release only genuine sums: the real participant objects, driven as a
malicious coordinator would drive them (it holds every upload and the public context, can add
ciphertexts, and writes every request), never release a self-added, scaled, replayed, forged,
too small or overlapping sum; the honest path decrypts the right sum; and nothing per client
travels beside the ciphertexts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from veil.crypto.identity import IdentityKey, signing_payload
from veil.federation.messages import FitResult, ProtocolInstruction
from veil.federation.pipeline import AggregationFailed, RoundContext
from veil.privacy.he import keys as he_keys
from veil.privacy.he.aggregator import ENCRYPTED, CkksAggregator
from veil.privacy.he.ckks import (
    CkksError,
    add_frames,
    decrypt_frames,
    encrypt_frames,
    read_frames,
    write_frames,
)
from veil.privacy.he.participant import CkksParticipant
from veil.privacy.he.seal_io import save_bytes
from veil.privacy.he.settings import CkksSettings
from veil.privacy.he.wire import (
    CONFIRM,
    DECRYPT,
    Confirmation,
    ConfirmRequest,
    DecryptReply,
    DecryptRequest,
    Member,
    SignedMember,
    upload_digest,
)
from veil.privacy.secagg.layout import UpdateLayout
from veil.privacy.secagg.roster import StaticRoster

SHAPES = {"w": (3, 5), "b": (3,)}
LAYOUT = UpdateLayout.of({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
RUN = "run"


class Federation:
    """A CKKS federation's key set, clients and the server's aggregator, in one process."""

    def __init__(
        self,
        n: int,
        settings: CkksSettings | None = None,
        *,
        member_settings: Mapping[str, CkksSettings] | None = None,
    ) -> None:
        self.settings = settings or CkksSettings()
        secret, public = he_keys.generate(self.settings.params)
        self.identities = {f"c{i}": IdentityKey.generate() for i in range(n)}
        roster = StaticRoster({c: k.public_key() for c, k in self.identities.items()})
        own = member_settings or {}
        self.parts = {
            c: CkksParticipant(c, secret, own.get(c, self.settings), LAYOUT, k, roster)
            for c, k in self.identities.items()
        }
        self.aggregator = CkksAggregator(self.settings, LAYOUT, public)
        self.key_id = public.key_id
        self.rng = np.random.default_rng(3)
        self.updates: dict[tuple[int, str], dict[str, np.ndarray]] = {}

    def seal(self, rnd: int, names: Sequence[str] | None = None) -> dict[str, bytes]:
        """Every named client's upload of round `rnd` (random updates of weight 10)."""
        out = {}
        for c in names or list(self.parts):
            update = {k: self.rng.uniform(-1, 1, s).astype(np.float32) for k, s in SHAPES.items()}
            self.updates[(rnd, c)] = update
            fit = FitResult(c, rnd, update, weight=10.0, num_examples=10)
            sealed = self.parts[c].seal(fit, RoundContext(RUN, rnd))
            out[c] = sealed.update[ENCRYPTED].tobytes()
        return out

    def ask(self, client: str, rnd: int, stage: str, body: bytes) -> bytes:
        return self.parts[client].handle(ProtocolInstruction(RUN, rnd, stage, body))

    def confirm(self, client: str, rnd: int, uploads: Mapping[str, bytes]) -> Confirmation:
        """Ask `client` to confirm the member set of `uploads` (name -> upload)."""
        request = ConfirmRequest(RUN, rnd, self.key_id, members(uploads))
        return Confirmation.from_bytes(self.ask(client, rnd, CONFIRM, request.to_bytes()))

    def decrypt(
        self,
        client: str,
        rnd: int,
        uploads: Mapping[str, bytes],
        signatures: Mapping[str, bytes],
        *,
        digests: Mapping[str, bytes] | None = None,
    ) -> DecryptReply:
        """Ask `client` to decrypt `uploads` with the given signatures (and, if given, the
        digests the server claims for them instead of their real ones)."""
        names = sorted(uploads)
        claimed = {n: upload_digest(uploads[n]) for n in names} | dict(digests or {})
        signed = tuple(
            SignedMember(n, claimed[n], signatures.get(n, bytes(64)), b"") for n in names
        )
        request = DecryptRequest(RUN, rnd, self.key_id, signed, b"".join(uploads[n] for n in names))
        return DecryptReply.from_bytes(self.ask(client, rnd, DECRYPT, request.to_bytes()))

    def confirm_all(self, rnd: int, uploads: Mapping[str, bytes]) -> dict[str, bytes]:
        """Every member's signature of the member set of `uploads` (an honest server's step)."""
        return {c: self.confirm(c, rnd, uploads).signature for c in uploads}

    def add(self, *uploads: bytes) -> bytes:
        """The sum of uploads as a well-formed upload (fresh ciphertexts of the summed values):
        the strongest fake, which takes a key holder colluding with the server. The server
        alone can add ciphertexts but cannot lay their sum out as an upload
        (`test_a_sum_made_by_the_server_does_not_fit_an_upload`)."""
        packing = self.aggregator.packing
        context = self.parts["c0"].context
        values = sum(
            decrypt_frames(
                context, read_frames(context, np.frombuffer(u, np.uint8), packing), packing
            )
            for u in uploads
        )
        return write_frames(encrypt_frames(context, values), packing).tobytes()  # type: ignore[arg-type]

    def server_sum(self, *uploads: bytes) -> list[bytes]:
        """What the server can compute with its public context: the sum of uploads, frame by
        frame, serialised."""
        packing, context = self.aggregator.packing, self.aggregator.context
        total = read_frames(context, np.frombuffer(uploads[0], np.uint8), packing)
        for u in uploads[1:]:
            add_frames(context, total, read_frames(context, np.frombuffer(u, np.uint8), packing))
        return [save_bytes(c) for c in total]  # type: ignore[arg-type]

    def plain(self, rnd: int, names: Sequence[str]) -> np.ndarray:
        """Σ w·Δ of the named clients' round-`rnd` updates, flattened (no clipping needed)."""
        return sum(10.0 * LAYOUT.flatten(self.updates[(rnd, c)]) for c in names)  # type: ignore[return-value]


def members(uploads: Mapping[str, bytes]) -> tuple[Member, ...]:
    return tuple(Member(n, upload_digest(uploads[n])) for n in sorted(uploads))


def test_a_sum_made_by_the_server_does_not_fit_an_upload() -> None:
    """Uploads are seeded ciphertexts (c1 regenerated from a seed); a sum of ciphertexts has a
    c1 that is no PRNG output, so it serialises at full size and cannot take an upload's
    place: the slot refuses it before any signature is checked."""
    fed = Federation(3)
    up = fed.seal(1)
    packing = fed.aggregator.packing
    for summed in (fed.server_sum(up["c0"], up["c0"]), fed.server_sum(up["c0"], up["c1"])):
        assert all(len(f) > packing.frame_bytes for f in summed)
        with pytest.raises(CkksError, match="exceeds its slot"):
            write_frames(summed, packing)


def test_a_ciphertext_added_to_itself_is_refused_and_reveals_nothing() -> None:
    fed = Federation(3)
    up = fed.seal(1)
    x = up["c0"]
    doubled = fed.add(x, x)  # Enc(x) + Enc(x): its count slot reads 2
    # The old attack: the doubled ciphertext as a member's upload. Its owner does not confirm
    # it, and no other member's signature can stand in for the owner's.
    attack = {"c0": doubled, "c2": up["c2"]}
    with pytest.raises(CkksError, match="own upload"):
        fed.confirm("c0", 1, attack)
    signed_by_c2 = fed.confirm("c2", 1, attack).signature
    forged = {"c0": signed_by_c2, "c2": signed_by_c2}
    with pytest.raises(CkksError, match="'c0' did not sign"):
        fed.decrypt("c2", 1, attack, forged)
    # The same upload under two names, or one name twice.
    fed2 = Federation(3)
    up2 = fed2.seal(1)
    with pytest.raises(CkksError, match="same ciphertext twice"):
        fed2.confirm("c1", 1, {"c0": up2["c0"], "c1": up2["c0"]})
    with pytest.raises(CkksError, match="same ciphertext twice"):
        fed2.decrypt("c2", 1, {"c0": up2["c0"], "c1": up2["c0"], "c2": up2["c2"]}, {})
    body = DecryptRequest(
        RUN,
        1,
        fed2.key_id,
        tuple(SignedMember("c0", upload_digest(up2["c0"]), bytes(64), b"") for _ in range(2)),
        up2["c0"] * 2,
    ).to_bytes()
    with pytest.raises(CkksError, match="names a member twice"):
        fed2.ask("c0", 1, DECRYPT, body)
    # With every genuine signature of the real set, but c1's upload swapped for c0's: the sum
    # would hold x twice.
    fed3 = Federation(3)
    up3 = fed3.seal(1)
    signatures = fed3.confirm_all(1, up3)
    swapped = {**up3, "c1": up3["c0"]}
    with pytest.raises(CkksError, match="not the one it signed"):
        fed3.decrypt("c2", 1, swapped, signatures, digests={"c1": upload_digest(up3["c1"])})


def test_a_scaled_or_otherwise_non_genuine_sum_is_refused() -> None:
    fed = Federation(3)
    up = fed.seal(1)
    signatures = fed.confirm_all(1, up)
    x = up["c0"]
    fakes = (fed.add(x, x), fed.add(x, x, x), fed.add(x, up["c1"]))
    for decryptor, fake in zip(("c1", "c2", "c0"), fakes, strict=True):
        # In place of c0's upload, under the digest c0 signed ...
        with pytest.raises(CkksError, match="not the one it signed"):
            fed.decrypt(
                decryptor, 1, {**up, "c0": fake}, signatures, digests={"c0": upload_digest(x)}
            )
    # ... or under its own digest: the decryptor never confirmed that set, and once it has,
    # c0's signature (made for the genuine set) does not verify for it.
    fed = Federation(4)
    up = fed.seal(1)
    signatures = fed.confirm_all(1, {c: up[c] for c in ("c0", "c1", "c2")})
    x = up["c0"]
    with pytest.raises(CkksError, match="not the member set this client confirmed"):
        fed.decrypt("c1", 1, {**up, "c0": fed.add(x, x)}, signatures)
    scaled = {"c0": fed.add(x, x), "c3": up["c3"]}
    c3 = fed.confirm("c3", 1, scaled).signature
    with pytest.raises(CkksError, match="'c0' did not sign"):
        fed.decrypt("c3", 1, scaled, {"c0": signatures["c0"], "c3": c3})
    # The sum of c0 and c1 presented as one member's upload (c0 and c1 left out).
    fed = Federation(4)
    up = fed.seal(1)
    fake_set = {"c0": fed.add(up["c0"], up["c1"]), "c2": up["c2"], "c3": up["c3"]}
    sigs = {c: fed.confirm(c, 1, fake_set).signature for c in ("c2", "c3")}
    with pytest.raises(CkksError, match="'c0' did not sign"):
        fed.decrypt("c2", 1, fake_set, {**sigs, "c0": sigs["c2"]})


def test_fewer_members_than_the_decryptors_own_quorum_are_refused() -> None:
    fed = Federation(2)
    up = fed.seal(1)
    alone = {"c0": up["c0"]}
    with pytest.raises(CkksError, match="at least 2 distinct members"):
        fed.confirm("c0", 1, alone)
    with pytest.raises(CkksError, match="at least 2 distinct members"):
        fed.decrypt("c0", 1, alone, {"c0": bytes(64)})
    # The quorum is the decryptor's own setting, whatever the server's is: c2 requires 3
    # members; c0 and c1 confirm a set of 2, and c2 still refuses to decrypt one.
    strict = CkksSettings(min_members=3)
    fed = Federation(3, member_settings={"c2": strict})
    up = fed.seal(1)
    pair = {"c0": up["c0"], "c2": up["c2"]}
    with pytest.raises(CkksError, match="at least 3 distinct members"):
        fed.confirm("c2", 1, pair)
    signature = fed.confirm("c0", 1, pair).signature
    with pytest.raises(CkksError, match="at least 3 distinct members"):
        fed.decrypt("c2", 1, pair, {"c0": signature, "c2": signature})
    assert strict.quorum == 3 and CkksSettings(decryptors=4).quorum == 4
    # No setting makes a single member a quorum.
    with pytest.raises(ValueError, match="at least 2"):
        CkksSettings(min_members=1)


def test_a_replayed_upload_or_a_forged_signature_is_refused() -> None:
    fed = Federation(3)
    round1 = fed.seal(1)
    signatures1 = fed.confirm_all(1, round1)
    fed.decrypt("c0", 1, round1, signatures1)  # round 1 is released honestly
    round2 = fed.seal(2)
    # c0's round-1 upload in round 2: c0 does not confirm it ...
    replay = {**round2, "c0": round1["c0"]}
    with pytest.raises(CkksError, match="own upload of round 2"):
        fed.confirm("c0", 2, replay)
    # ... and its round-1 signature does not verify for round 2.
    sigs = {c: fed.confirm(c, 2, replay).signature for c in ("c1", "c2")}
    with pytest.raises(CkksError, match="'c0' did not sign"):
        fed.decrypt("c1", 2, replay, {**sigs, "c0": signatures1["c0"]})
    # The whole round-1 request replayed in round 2 is refused as well.
    with pytest.raises(CkksError):
        fed.decrypt("c2", 2, round1, signatures1)

    fed = Federation(3)
    up = fed.seal(1)
    genuine = fed.confirm_all(1, up)
    digest_forgery = {**genuine, "c1": bytes(64)}
    with pytest.raises(CkksError, match="'c1' did not sign"):
        fed.decrypt("c0", 1, up, digest_forgery)
    # A key outside the decryptor's roster signing in c1's name.
    mallory = IdentityKey.generate()
    payload = signing_payload("veil-ckks-confirm", RUN, 1, fed.key_id, "c1", b"\0" * 32)
    with pytest.raises(CkksError, match="'c1' did not sign"):
        fed.decrypt("c2", 1, up, {**genuine, "c1": mallory.sign(payload)})
    # A member the roster does not know at all.
    fed = Federation(3)
    up = fed.seal(1)
    stranger = {**up, "mallory": fed.add(up["c0"], up["c0"])}
    sigs = {c: fed.confirm(c, 1, stranger).signature for c in up}
    with pytest.raises(CkksError, match="mallory"):
        fed.decrypt("c0", 1, stranger, {**sigs, "mallory": mallory.sign(b"x")})


def test_overlapping_sets_are_never_both_released() -> None:
    """A member confirms one set per round: the server cannot have {c0, c1, c2} and
    {c0, c1, c2, c3} both decrypted and take c3's update as their difference."""
    fed = Federation(4)
    up = fed.seal(1)
    small = {c: up[c] for c in ("c0", "c1", "c2")}
    signatures = fed.confirm_all(1, small)
    for c in ("c0", "c1", "c2"):
        with pytest.raises(CkksError, match="second, different member set"):
            fed.confirm(c, 1, up)
    # Asking again for the same set is harmless: the same set, nothing new.
    assert fed.confirm("c0", 1, small).signature == signatures["c0"]
    c3 = fed.confirm("c3", 1, up).signature
    with pytest.raises(CkksError, match="not the member set this client confirmed"):
        fed.decrypt("c0", 1, up, {**signatures, "c3": c3})
    with pytest.raises(CkksError, match="did not sign"):
        fed.decrypt("c3", 1, up, {**signatures, "c3": c3})
    released = fed.decrypt("c1", 1, small, signatures).values
    # Once per round per decryptor.
    with pytest.raises(CkksError, match="second decryption request"):
        fed.decrypt("c1", 1, small, signatures)
    expected = fed.plain(1, ["c0", "c1", "c2"])
    s = fed.settings
    assert np.max(np.abs(released[: expected.size] - expected)) <= s.tolerance(3)
    assert released[-1] == pytest.approx(3, abs=s.tolerance(3))


def test_a_second_upload_in_one_round_is_refused() -> None:
    fed = Federation(2)
    fed.seal(1, ["c0"])
    with pytest.raises(CkksError, match="second CKKS upload"):
        fed.seal(1, ["c0"])


class Channel:
    """An honest transport to the in-process participants; `drop` lose their answers."""

    def __init__(self, fed: Federation, rnd: int, drop: frozenset[str] = frozenset()) -> None:
        self.fed, self.round, self.drop = fed, rnd, drop
        self.stages: list[str] = []

    def exchange(self, stage: str, bodies: Mapping[str, bytes]) -> dict[str, bytes]:
        self.stages.append(stage)
        return {
            c: self.fed.ask(c, self.round, stage, b)
            for c, b in bodies.items()
            if c not in self.drop
        }


def test_the_honest_path_decrypts_the_sum_and_only_the_sums_of_the_metrics() -> None:
    settings = CkksSettings(clip_range=1.0, max_weight=50.0, decryptors=2)
    fed = Federation(4, settings)
    context = RoundContext(RUN, 1, clients=tuple(fed.parts))
    channel = Channel(fed, 1)
    accumulator = fed.aggregator.start(LAYOUT.reference_view(), context, channel)  # type: ignore[arg-type]
    rng = np.random.default_rng(11)
    expected = np.zeros(LAYOUT.parameter_count)
    clipped_total, capped_total, weight_total = 0, 0, 0.0
    for i, c in enumerate(fed.parts):
        update = {k: rng.uniform(-0.5, 0.5, s).astype(np.float32) for k, s in SHAPES.items()}
        update["w"].reshape(-1)[: i + 1] = 3.0  # i + 1 values above clip_range
        weight = [10.0, 80.0, 20.0, 500.0][i]  # two above max_weight
        fit = FitResult(c, 1, update, weight=weight, num_examples=int(weight))
        sealed = fed.parts[c].seal(fit, context)
        # Nothing per client in the clear: one ciphertext tensor, no metric, weight or sum.
        assert set(sealed.update) == {ENCRYPTED}
        assert sealed.metrics == {} and sealed.sums == {}
        assert sealed.weight == 0.0 and sealed.num_examples == 0
        accumulator.add(sealed)
        w = min(weight, settings.max_weight)
        expected += w * np.clip(LAYOUT.flatten(update), -1.0, 1.0)
        clipped_total += i + 1
        capped_total += weight > settings.max_weight
        weight_total += w
    aggregate = accumulator.finish()
    assert channel.stages == [CONFIRM, DECRYPT]
    got = np.concatenate([aggregate.total[k].reshape(-1) for k in LAYOUT.names])
    assert np.max(np.abs(got - expected)) <= settings.tolerance(4) + 1e-4
    assert aggregate.weight == pytest.approx(weight_total, abs=settings.tolerance(4))
    assert aggregate.count == 4
    assert aggregate.report["clipped"] == clipped_total == 10
    assert aggregate.report["weights_capped"] == capped_total == 2
    assert aggregate.report["count_slot_error"] <= aggregate.report["tolerance"]
    assert aggregate.report["quorum"] == 2


def test_a_member_that_does_not_confirm_fails_the_round_before_any_decryption() -> None:
    fed = Federation(3)
    context = RoundContext(RUN, 1, clients=tuple(fed.parts))
    channel = Channel(fed, 1, drop=frozenset({"c1"}))
    accumulator = fed.aggregator.start(LAYOUT.reference_view(), context, channel)  # type: ignore[arg-type]
    for c in fed.parts:
        update = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
        accumulator.add(fed.parts[c].seal(FitResult(c, 1, update, 1.0, 1), context))
    with pytest.raises(AggregationFailed, match=r"\['c1'\] did not confirm"):
        accumulator.finish()
    assert channel.stages == [CONFIRM]


class LyingDecryptors(Channel):
    """An honest transport, but the decryptors named in `liars` return `lie(values)` instead of
    the sum they decrypted (a faulty decryptor, or one that wants to steer the model)."""

    def __init__(self, fed: Federation, rnd: int, liars: frozenset[str], lie: Any) -> None:
        super().__init__(fed, rnd)
        self.liars, self.lie = liars, lie

    def exchange(self, stage: str, bodies: Mapping[str, bytes]) -> dict[str, bytes]:
        replies = super().exchange(stage, bodies)
        if stage != DECRYPT:
            return replies
        for client in self.liars & set(replies):
            honest = DecryptReply.from_bytes(replies[client])
            lied = DecryptReply(honest.client, honest.key_id, self.lie(honest.values.copy()))
            replies[client] = lied.to_bytes()
        return replies


def _round_through(channel: Channel, fed: Federation) -> Any:
    context = RoundContext(RUN, 1, clients=tuple(fed.parts))
    accumulator = fed.aggregator.start(LAYOUT.reference_view(), context, channel)  # type: ignore[arg-type]
    for c in fed.parts:
        update = {k: np.full(s, 0.25, np.float32) for k, s in SHAPES.items()}
        accumulator.add(fed.parts[c].seal(FitResult(c, 1, update, 1.0, 1), context))
    return accumulator.finish()


def _shift(values: np.ndarray) -> np.ndarray:
    values[0] += 1.0  # one coordinate of the model's sum, far outside the tolerance
    return values


def _recount(values: np.ndarray) -> np.ndarray:
    values[:-1] *= 2.0  # a doubled sum, and a count slot that says so
    values[-1] *= 2.0
    return values


def test_one_decryptor_returning_a_wrong_sum_fails_the_round() -> None:
    """Two decryptors (the default) decrypt the same sum: when one returns another one, the
    server refuses both instead of stepping with either."""
    fed = Federation(3, CkksSettings(decryptors=2))
    tolerance = fed.settings.tolerance(3)
    assert 100 * tolerance < 1.0  # the lie is not within a correct decryption's error
    honest = _round_through(Channel(fed, 1), fed)  # the same round, no liar: released
    assert honest.count == 3
    for name in SHAPES:
        np.testing.assert_allclose(honest.total[name], 0.75, atol=tolerance)
    for liar in ("c0", "c1", "c2"):
        fed = Federation(3, CkksSettings(decryptors=3))
        channel = LyingDecryptors(fed, 1, frozenset({liar}), _shift)
        with pytest.raises(AggregationFailed, match="answers differ"):
            _round_through(channel, fed)


def test_decryptors_agreeing_on_a_wrong_count_fail_the_precision_check() -> None:
    """Every decryptor returns the same wrong sum (a wrapped sum, or another key): the count
    slot, which must decrypt to the number of members, gives it away."""
    fed = Federation(3, CkksSettings(decryptors=2))
    channel = LyingDecryptors(fed, 1, frozenset(fed.parts), _recount)
    with pytest.raises(AggregationFailed, match="precision check failed"):
        _round_through(channel, fed)
