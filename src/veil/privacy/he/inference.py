"""Encrypted inference: a linear model scores CKKS-encrypted features; only the client decrypts.

The client (`veil predict`) makes a fresh CKKS key, encrypts its feature matrix column by
column (feature j of up to N/2 rows in one ciphertext) and sends the ciphertexts with a context
that holds the parameters only. The server (`veil serve`) computes every class's logit,
Σ_j W[k, j] · x_j + b[k], with plaintext-scalar multiplications and additions: no rotations,
so it needs neither Galois nor relinearisation keys, and it never holds a key that could
decrypt. It returns one ciphertext per class and batch; the client decrypts and applies the
softmax. The server sees neither the features nor the scores; it does learn the number of
rows and features (ciphertext metadata).

Parameters: N = 8192, primes [60, 40, 60], scale 2^40: one multiplication and rescale. The
logits agree with plaintext inference to about 1e-5 (tested against 1e-3 on probabilities).

HTTPS with the federation's PKI (`serve_https`): the server presents its node certificate;
with `mutual_tls` it requires a client certificate of the same CA (revocation checked).
"""

from __future__ import annotations

import http.client
import http.server
import json
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt
import tenseal as ts
from cryptography import x509

from veil.crypto import pki
from veil.errors import UserError
from veil.privacy.he.ckks import (
    CkksError,
    CkksParams,
    SecretKeyRefused,
    join_frames,
    load_public_context,
    new_secret_context,
    public_context_bytes,
    split_frames,
)
from veil.privacy.he.wire import pack_message, unpack_message
from veil.store import load_checkpoint
from veil.tensors import NamedArrays

#: One plaintext multiplication deep: data primes [60, 40], special prime 60.
INFERENCE_PARAMS = CkksParams(8192, (60, 40, 60), 40)
#: Requests larger than this are refused (about 2000 features).
MAX_REQUEST_BYTES = 512 << 20
_WEIGHT, _BIAS = "linear.weight", "linear.bias"


class InferenceError(UserError):
    """A model that cannot be served encrypted, or a request or reply that is malformed."""


@dataclass(frozen=True)
class LinearModel:
    """Logits = x · Wᵀ + b (a `model.name = "logistic"` model, or any single linear layer)."""

    weight: npt.NDArray[np.float64]
    bias: npt.NDArray[np.float64]

    @classmethod
    def from_parameters(cls, parameters: NamedArrays) -> LinearModel:
        if set(parameters) != {_WEIGHT, _BIAS}:
            raise InferenceError(
                "encrypted inference serves linear models (model.name = 'logistic'); this "
                f"model has parameters {sorted(parameters)}"
            )
        return cls(parameters[_WEIGHT].astype(np.float64), parameters[_BIAS].astype(np.float64))

    @classmethod
    def load(cls, model: Path, *, key: bytes | None = None) -> LinearModel:
        """From a run folder (its checkpoint.safetensors) or a checkpoint file."""
        path = model / "checkpoint.safetensors" if model.is_dir() else model
        return cls.from_parameters(load_checkpoint(path, key=key).parameters)

    @property
    def features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def classes(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Plaintext inference, for comparison."""
        return np.asarray(x, np.float64) @ self.weight.T + self.bias

    def describe(self) -> dict[str, Any]:
        return {
            "model": "linear",
            "features": self.features,
            "classes": self.classes,
            "ckks": INFERENCE_PARAMS.to_dict(),
        }


# -- client ------------------------------------------------------------------------------


def encrypt_features(x: npt.NDArray[np.float64]) -> tuple[ts.Context, bytes]:
    """A fresh secret context and the request: column-packed ciphertexts, batch by batch."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise InferenceError("features must be a finite matrix of rows × features")
    context = new_secret_context(INFERENCE_PARAMS)
    slots = INFERENCE_PARAMS.slots
    frames = [
        ts.ckks_vector(context, x[start : start + slots, j]).serialize()
        for start in range(0, x.shape[0], slots)
        for j in range(x.shape[1])
    ]
    public = public_context_bytes(context)
    header = {"rows": int(x.shape[0]), "features": int(x.shape[1]), "context": len(public)}
    return context, pack_message(header, public + join_frames(frames))


def decrypt_scores(context: ts.Context, reply: bytes, rows: int) -> npt.NDArray[np.float64]:
    """The logits (rows × classes) from the server's reply."""
    try:
        header, body = unpack_message(reply, "encrypted scores")
        classes = int(header["classes"])
        frames = split_frames(body)
    except (CkksError, KeyError, TypeError, ValueError) as exc:
        raise InferenceError(f"malformed reply from the inference server: {exc}") from None
    batches = -(-rows // INFERENCE_PARAMS.slots)
    if len(frames) != batches * classes:
        raise InferenceError("the reply does not hold one ciphertext per class and batch")
    out = np.empty((rows, classes), np.float64)
    for b in range(batches):
        for k in range(classes):
            values = ts.ckks_vector_from(context, frames[b * classes + k]).decrypt()
            start = b * INFERENCE_PARAMS.slots
            out[start : start + len(values), k] = values
    return out


def softmax(logits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True), np.float64)


# -- server ------------------------------------------------------------------------------


def score_encrypted(model: LinearModel, request: bytes) -> bytes:
    """The server's work: encrypted logits for an encrypted feature matrix. The request's
    context must hold no secret key (the server refuses to hold one)."""
    try:
        header, body = unpack_message(request, "encrypted features")
        rows, features, n_context = (int(header[k]) for k in ("rows", "features", "context"))
        context = load_public_context(body[:n_context], INFERENCE_PARAMS)
        frames = split_frames(body[n_context:])
    except SecretKeyRefused:
        raise InferenceError(
            "the request's context carries the secret key: refused, the server never holds "
            "one; send the context without keys (`encrypt_features` does)"
        ) from None
    except (CkksError, KeyError, TypeError, ValueError) as exc:
        raise InferenceError(f"malformed request: {exc}") from None
    if features != model.features:
        raise InferenceError(
            f"the model takes {model.features} features, the request has {features}"
        )
    batches = -(-rows // INFERENCE_PARAMS.slots)
    if rows < 1 or len(frames) != batches * features:
        raise InferenceError("the request does not hold one ciphertext per feature and batch")
    out = []
    for b in range(batches):
        try:
            columns = [
                ts.ckks_vector_from(context, f) for f in frames[b * features : (b + 1) * features]
            ]
        except Exception as exc:  # TenSEAL raises bare exceptions on malformed bytes
            raise InferenceError(f"a ciphertext does not parse: {exc}") from None
        for k in range(model.classes):
            total = columns[0] * float(model.weight[k, 0])
            for j in range(1, features):
                total += columns[j] * float(model.weight[k, j])
            total += float(model.bias[k])
            out.append(total.serialize())
    return pack_message({"classes": model.classes}, join_frames(out))


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _InferenceServer

    def do_GET(self) -> None:
        if self.path != "/v1/model":
            self._send(404, json.dumps({"error": "unknown path"}).encode(), "application/json")
            return
        self._send(200, json.dumps(self.server.model.describe()).encode(), "application/json")

    def do_POST(self) -> None:
        if self.path != "/v1/score":
            self._send(404, json.dumps({"error": "unknown path"}).encode(), "application/json")
            return
        length = int(self.headers.get("Content-Length", "0"))
        if not 0 < length <= MAX_REQUEST_BYTES:
            self._send(413, json.dumps({"error": "request too large"}).encode(), "application/json")
            return
        try:
            self.server.check_peer(self.connection)
            reply = score_encrypted(self.server.model, self.rfile.read(length))
        except UserError as exc:
            self._send(400, json.dumps({"error": str(exc)}).encode(), "application/json")
            return
        self._send(200, reply, "application/octet-stream")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # One line per request, without the client's address details beyond what TLS shows.
        self.server.log(f"{self.command} {self.path} {args[1] if len(args) > 1 else ''}")


class _InferenceServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        model: LinearModel,
        check_peer: Callable[[Any], None],
        log: Callable[[str], None],
    ) -> None:
        super().__init__(address, _Handler)
        self.model = model
        self.check_peer = check_peer
        self.log = log


def serve_https(
    model: LinearModel,
    *,
    pki_dir: Path,
    name: str = "server",
    address: str = "127.0.0.1:8443",
    mutual_tls: bool = False,
    log: Callable[[str], None] = lambda line: None,
) -> tuple[http.server.ThreadingHTTPServer, int]:
    """Start serving `model` over HTTPS in a background thread; returns (server, port). The
    server's certificate is node `name` of the PKI; with `mutual_tls` clients must present a
    client certificate of the same CA that is not revoked. Stop with `server.shutdown()`."""
    files = pki.node_files(pki_dir, name)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert, files.key)
    ca = pki.load_certificate(files.ca_cert)
    if mutual_tls:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(files.ca_cert)

    def check_peer(connection: Any) -> None:
        if not mutual_tls:
            return
        der = connection.getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(der)
        pki.verify_certificate(cert, ca, role="client", revoked=pki.revoked_serials(pki_dir))

    host, _, port = address.rpartition(":")
    server = _InferenceServer((host or "127.0.0.1", int(port)), model, check_peer, log)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1])


def predict(
    url: str,
    x: npt.NDArray[np.float64],
    *,
    pki_dir: Path,
    name: str | None = None,
    timeout_s: float = 300.0,
) -> npt.NDArray[np.float64]:
    """Encrypt `x`, have the server at `url` (https://HOST:PORT) score it, decrypt: the logits.
    The server certificate must come from the PKI's CA; with `name` this client presents its
    own node certificate (mutual TLS)."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise InferenceError(f"'{url}' is not an https:// URL")
    tls = ssl.create_default_context(cafile=str(Path(pki_dir) / pki.CA_CERT))
    if name is not None:
        files = pki.node_files(pki_dir, name)
        tls.load_cert_chain(files.cert, files.key)
    context, request = encrypt_features(x)
    connection = http.client.HTTPSConnection(
        parts.hostname, parts.port or 443, context=tls, timeout=timeout_s
    )
    try:
        connection.request("POST", "/v1/score", body=request)
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise InferenceError(f"cannot reach the inference server at {url}: {exc}") from None
    finally:
        connection.close()
    if response.status != 200:
        raise InferenceError(f"the inference server refused: {body[:300].decode(errors='replace')}")
    return decrypt_scores(context, body, int(np.asarray(x).shape[0]))
