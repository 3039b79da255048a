"""Why a member cannot connect to its coordinator, in one line.

gRPC reports a failed connection vaguely ("failed to connect to all addresses; ... Socket
closed"), whichever side refused whose certificate. `diagnose` finds the cause with a one-off
connection of its own to the same address, using the member's own files:

1. the member's certificate, checked locally against its CA (`veil.crypto.pki.verify_certificate`:
   issued by that CA, valid now, a client certificate);
2. a TCP connection: is anyone listening? (the only finding worth retrying);
3. a TLS handshake with the member's certificate, key and CA (Python's `ssl`, host name checked):
   a refused server certificate is then examined (issuer, validity, role, names) to say why;
4. the start of an HTTP/2 conversation: a coordinator that refuses the member's certificate
   closes the connection here (TLS 1.3 sends that verdict after the handshake).

Diagnosis only: it never decides whom to trust (the gRPC channel does), and it reads nothing
from the connection but the server's certificate and whether the server answers.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from veil.crypto import pki
from veil.errors import UserError

__all__ = ["PROBE_TIMEOUT_S", "Diagnosis", "Endpoint", "MemberTls", "diagnose"]

#: How long one diagnosis may take: the TCP connection, then the TLS handshake and the answer.
PROBE_TIMEOUT_S = 3.0

# What a gRPC client sends first (RFC 9113 §3.4): the connection preface and an empty SETTINGS
# frame. A server that accepted the client's certificate answers with its own SETTINGS.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"

_RENEW = "ask the CA operator to sign a new one (`veil pki request`, then `veil pki sign`)"


@dataclass(frozen=True)
class MemberTls:
    """The member's TLS files, as the gRPC channel uses them."""

    certificate: Path
    key: Path
    ca_certificate: Path


@dataclass(frozen=True)
class Endpoint:
    """Where a member connects (``host:port``) and with what: `tls` is None for a plaintext
    (``--insecure-dev``) channel. `pinned`: the channel trusts one pinned server certificate
    instead of the CA (a TEE coordinator's in-process key), so the server's certificate is not
    checked against the CA here (the pin's own check reports on it)."""

    address: str
    tls: MemberTls | None = None
    pinned: bool = False


@dataclass(frozen=True)
class Diagnosis:
    """Why the connection fails: `reason` is one line naming the certificate (whose, which file)
    or the address and what is wrong. `retry` is true only when nobody answered at the address
    (the coordinator may be starting or restarting); any other finding needs a person."""

    reason: str
    retry: bool = False


def diagnose(
    endpoint: Endpoint, *, timeout_s: float = PROBE_TIMEOUT_S, now: dt.datetime | None = None
) -> Diagnosis | None:
    """Why a connection to `endpoint` fails, or None if a fresh connection works (the member's
    certificate is fine, the coordinator answers, both certificates are accepted): whatever
    failed was transient.

    Takes at most about `timeout_s` (TCP connection, then TLS handshake and first answer). `now`
    (timezone-aware; default the current time) is when the member's certificate must be valid.
    Never raises for a network or certificate problem: that is the diagnosis.
    """
    address = endpoint.address
    try:
        host, port = _split(address)
    except ValueError:
        return Diagnosis(f"the coordinator's address must be host:port, got '{address}'")
    tls = endpoint.tls
    if tls is not None and (local := _check_member(tls, now)) is not None:
        return local
    deadline = time.monotonic() + timeout_s
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        why = f"no answer within {timeout_s:g} s" if isinstance(exc, TimeoutError) else None
        why = why or _why(exc, host)
        return Diagnosis(f"cannot reach the coordinator at {address} ({why})", retry=True)
    with sock:
        if tls is None:
            return None
        try:
            context = _context(tls, verify=not endpoint.pinned)
        except (OSError, ssl.SSLError) as exc:
            return Diagnosis(
                f"cannot load this member's TLS certificate '{tls.certificate}' and key "
                f"'{tls.key}': {_ssl_reason(exc)}"
            )
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            with context.wrap_socket(sock, server_hostname=host) as conn:
                return _first_answer(conn, address, tls)
        except ssl.SSLCertVerificationError as exc:
            return _server_refused(address, host, port, tls, exc, timeout_s)
        except ssl.SSLError as exc:
            return _handshake_failed(address, tls, exc)
        except TimeoutError:
            return Diagnosis(
                f"cannot reach the coordinator at {address} (no TLS handshake within "
                f"{timeout_s:g} s)",
                retry=True,
            )
        except OSError as exc:  # e.g. reset: no verdict on either certificate
            return Diagnosis(
                f"cannot reach the coordinator at {address} ({_why(exc, host)} during the TLS "
                "handshake)",
                retry=True,
            )


def _check_member(tls: MemberTls, now: dt.datetime | None) -> Diagnosis | None:
    """The member's own certificate against its own CA: no network needed."""
    try:
        cert = pki.load_certificate(tls.certificate)
        ca = pki.load_certificate(tls.ca_certificate)
    except UserError as exc:
        return Diagnosis(f"this member's TLS files are unusable: {exc}")
    try:
        pki.verify_certificate(cert, ca, role="client", at=now)
    except pki.CertificateRejected as exc:
        what = str(exc).split(" rejected: ", 1)[-1]
        clock = f"it is {what}: check this machine's clock"
        dates = f"it {what}" if what.startswith("expired") else clock
        if str(exc).startswith("CA certificate"):  # the CA's own dates
            return Diagnosis(
                f"this member's CA certificate '{tls.ca_certificate}' cannot be used: {dates}"
            )
        if what.startswith("not issued"):
            hint = (
                f"it is not issued by the CA in '{tls.ca_certificate}', so the coordinator "
                "refuses it; use the certificate this federation's CA signed for this member"
            )
        elif what.startswith("expired"):
            hint = f"{dates}; {_RENEW}"
        elif what.startswith("not valid before"):
            hint = dates
        else:
            hint = f"{what}; {_RENEW}"  # a role or usage that does not fit a member
        return Diagnosis(f"this member's certificate '{tls.certificate}' cannot connect: {hint}")
    return None


def _context(tls: MemberTls, *, verify: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(tls.certificate, tls.key)
    if verify:
        context.load_verify_locations(cafile=str(tls.ca_certificate))
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # only to see the server's certificate and answer
    return context


def _first_answer(conn: ssl.SSLSocket, address: str, tls: MemberTls) -> Diagnosis | None:
    """After a completed handshake: does the coordinator accept the member's certificate?"""
    try:
        conn.sendall(_H2_PREFACE)
        answer = conn.recv(64)
    except TimeoutError:
        return None  # no verdict: nothing found
    except ssl.SSLError as exc:
        return _refused_member(address, tls, _ssl_reason(exc))
    except OSError as exc:
        return _refused_member(address, tls, exc.strerror or type(exc).__name__)
    if not answer:
        return _refused_member(address, tls, "it closed the connection")
    return None


def _refused_member(address: str, tls: MemberTls, how: str) -> Diagnosis:
    # The member's certificate passed the local check against its own ca.crt, and (unless
    # pinned) the coordinator's certificate too: so the coordinator trusts another CA.
    return Diagnosis(
        f"the coordinator at {address} refuses this member's certificate '{tls.certificate}' "
        f"({how}): it does not trust the CA that issued it; check that this member's "
        "certificate and ca.crt come from the coordinator's federation"
    )


def _handshake_failed(address: str, tls: MemberTls, exc: ssl.SSLError) -> Diagnosis:
    reason, code = _ssl_reason(exc), str(exc.reason or exc).upper()
    if "ALERT" in code:  # TLS 1.2: the coordinator's verdict on the member's certificate
        return _refused_member(address, tls, reason)
    if any(k in code for k in ("WRONG_VERSION", "RECORD_LAYER", "PACKET_LENGTH", "HTTP")):
        return Diagnosis(
            f"the coordinator at {address} does not speak TLS ({reason}); is it started with "
            "--insecure-dev, or is this another service's port?"
        )
    return Diagnosis(f"the TLS handshake with the coordinator at {address} failed ({reason})")


def _server_refused(
    address: str,
    host: str,
    port: int,
    tls: MemberTls,
    exc: ssl.SSLCertVerificationError,
    timeout_s: float,
) -> Diagnosis:
    """The member refused the coordinator's certificate: fetch it unverified and say why."""
    what = f"the coordinator's certificate at {address}"
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as sock,
            _context(tls, verify=False).wrap_socket(sock, server_hostname=host) as conn,
        ):
            der = conn.getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(der) if der else None
        ca = pki.load_certificate(tls.ca_certificate)
    except (OSError, ValueError, UserError):
        cert = None
    if cert is None:
        return Diagnosis(f"{what} is refused: {exc.verify_message}")
    name = _common_name(cert)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return Diagnosis(
            f"{what} ('{name}') is not issued by this member's CA ('{tls.ca_certificate}'): "
            "the coordinator or this ca.crt belongs to another federation"
        )
    at = dt.datetime.now(dt.UTC)
    if at > cert.not_valid_after_utc:
        return Diagnosis(
            f"{what} ('{name}') expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; the "
            "coordinator's operator must get a new one from the CA operator"
        )
    if at < cert.not_valid_before_utc:
        return Diagnosis(
            f"{what} ('{name}') is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check both machines' clocks)"
        )
    try:
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = [ExtendedKeyUsageOID.SERVER_AUTH]  # no restriction
    if ExtendedKeyUsageOID.SERVER_AUTH not in usages:
        return Diagnosis(
            f"{what} ('{name}') is a client certificate; the coordinator must serve a server "
            "certificate (`veil pki request DIR NAME --role server --host HOST`, then "
            "`veil pki sign`)"
        )
    names = _host_names(cert)
    if not _matches(host, names):
        return Diagnosis(
            f"{what} ('{name}') is not valid for the host name '{host}' (it names "
            f"{', '.join(names) or 'no host'}); connect with one of those names, or have the "
            f"coordinator's certificate issued with --host {host}"
        )
    return Diagnosis(f"{what} ('{name}') is refused: {exc.verify_message}")


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else "no name"


def _host_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]


def _matches(host: str, names: list[str]) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for name in names:
        if ip is not None:
            try:
                if ipaddress.ip_address(name) == ip:
                    return True
            except ValueError:
                continue
            continue
        pattern, host_l = name.lower(), host.lower().rstrip(".")
        if pattern == host_l:
            return True
        wildcard = pattern.startswith("*.") and "." in host_l
        if wildcard and host_l.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit():
        raise ValueError(address)
    return host, int(port)


def _why(exc: OSError, host: str) -> str:
    if isinstance(exc, socket.gaierror):
        return f"host name '{host}' not found"
    if isinstance(exc, TimeoutError):
        return "no answer"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    return (exc.strerror or str(exc) or type(exc).__name__).lower()


def _ssl_reason(exc: OSError) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason).lower().replace("_", " ") if reason else str(exc)
