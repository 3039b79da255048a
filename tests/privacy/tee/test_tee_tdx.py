"""TDX quotes (EXPERIMENTAL parser): well-formed and tampered quotes under a test chain."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from tee_chains import chain, pem

from veil.privacy.tee.attestation import AttestationRefused, Evidence, Policy, report_data, verify
from veil.privacy.tee.tdx import TdxVerifier, parse

TLS = b"server-tls-spki"
MRTD = bytes(range(100, 148))
POLICY = Policy(frozenset({MRTD.hex()}), 2)


def raw_sig(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def tdx_quote(
    pck_key: ec.EllipticCurvePrivateKey,
    pck_chain: str,
    data: bytes,
    *,
    attributes: int = 0,
    bind: bool = True,
) -> bytes:
    header = struct.pack("<HHIHH", 4, 2, 0x81, 0, 0) + b"\x93" * 16 + b"\0" * 20
    body = bytearray(584)
    body[0] = 2  # TEE TCB SVN
    body[120:128] = attributes.to_bytes(8, "little")
    body[136:184] = MRTD
    body[520:584] = data
    att = ec.generate_private_key(ec.SECP256R1())
    att_pub = att.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )[1:]
    auth = b"qe-auth-data"
    qe_report = bytearray(384)
    if bind:
        qe_report[320:352] = hashlib.sha256(att_pub + auth).digest()
    pem_bytes = pck_chain.encode()
    inner = (
        bytes(qe_report)
        + raw_sig(pck_key, bytes(qe_report))
        + struct.pack("<H", len(auth))
        + auth
        + struct.pack("<HI", 5, len(pem_bytes))
        + pem_bytes
    )
    signed = header + bytes(body)
    sig = raw_sig(att, signed) + att_pub + struct.pack("<HI", 6, len(inner)) + inner
    return signed + struct.pack("<I", len(sig)) + sig


@pytest.fixture(scope="module")
def intel() -> tuple:  # type: ignore[type-arg]
    return chain(ec.SECP256R1(), ("SGX Root (test)", "PCK Platform (test)", "PCK (test)"))


def check(quote: bytes, root: object, nonce: bytes) -> object:
    return verify(Evidence("tdx", quote, TLS, 1), POLICY, nonce, verifiers=[TdxVerifier(root)])  # type: ignore[arg-type]


def test_well_formed_quote_parses_and_verifies(intel: tuple) -> None:  # type: ignore[type-arg]
    root, platform, pck, key = intel
    nonce = os.urandom(32)
    quote = tdx_quote(key, pem(pck, platform), report_data(TLS, nonce, 1))
    assert parse(quote).mrtd == MRTD
    claims = check(quote, root, nonce)
    assert claims.measurement == MRTD.hex() and claims.security_version == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize("offset", [10, 48 + 140, 48 + 530])
def test_tampered_quote_is_refused(intel: tuple, offset: int) -> None:  # type: ignore[type-arg]
    root, platform, pck, key = intel
    nonce = os.urandom(32)
    quote = bytearray(tdx_quote(key, pem(pck, platform), report_data(TLS, nonce, 1)))
    quote[offset] ^= 0x01
    with pytest.raises(AttestationRefused, match="does not verify"):
        check(bytes(quote), root, nonce)


def test_broken_links_debug_and_replay_are_refused(intel: tuple) -> None:  # type: ignore[type-arg]
    root, platform, pck, key = intel
    nonce = os.urandom(32)
    data = report_data(TLS, nonce, 1)
    good_chain = pem(pck, platform)
    with pytest.raises(AttestationRefused, match="does not bind the attestation key"):
        check(tdx_quote(key, good_chain, data, bind=False), root, nonce)
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(AttestationRefused, match="not signed by the PCK key"):
        check(tdx_quote(other, good_chain, data), root, nonce)
    _o_root, o_platform, o_pck, o_key = chain(ec.SECP256R1(), ("A", "B", "C"))
    with pytest.raises(AttestationRefused, match="not signed by"):
        check(tdx_quote(o_key, pem(o_pck, o_platform), data), root, nonce)
    with pytest.raises(AttestationRefused, match="debuggable"):
        check(tdx_quote(key, good_chain, data, attributes=1), root, nonce)
    with pytest.raises(AttestationRefused, match="another nonce"):
        check(tdx_quote(key, good_chain, data), root, os.urandom(32))
    with pytest.raises(AttestationRefused, match="not a TDX v4"):
        parse(b"\x03\x00" + b"\0" * 700)
