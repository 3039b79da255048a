"""CKKS through TenSEAL: contexts, packing of a flat vector into few ciphertexts, fixed-size
frames for the wire, the overflow guard and the noise estimate.

CKKS (Cheon, Kim, Kim and Song 2017) encrypts a vector of N/2 real numbers as one ciphertext
of two polynomials modulo q; ciphertexts add slot by slot. Aggregation only adds, so Veil uses
the shortest modulus chain (one data prime and TenSEAL's special prime, e.g. [60, 40]), no
Galois or relinearisation keys, and symmetric encryption: the clients hold the secret key
anyway (they decrypt the sum), a secret-key RLWE encryption is as hard to break as a public-key
one and cheaper, and the server receives a context with the parameters only, so it can add but
can neither encrypt nor decrypt.

A flat vector is cut into frames of N/2 values (the last one shorter), each one TenSEAL
`CKKSVector` of one ciphertext (TenSEAL encrypts a longer vector one ciphertext after another
anyway); every frame travels in a slot of fixed size (4-byte length, the serialised vector,
zero padding), so an upload has one exact size that the server checks before it parses
anything, and the transport streams it in chunks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import tenseal as ts
import tenseal.sealapi  # registers SEAL's types (e.g. Modulus) with pybind

from veil.errors import ConfigError, VeilError

__all__ = [
    "CkksError",
    "CkksParams",
    "OverflowRisk",
    "Packing",
    "SecretKeyRefused",
    "decrypt_frames",
    "encrypt_frames",
    "join_frames",
    "load_public_context",
    "load_secret_context",
    "new_secret_context",
    "parse_frames",
    "public_context_bytes",
    "read_frames",
    "secret_context_bytes",
    "split_frames",
    "write_frames",
]

#: Standard deviation of the RLWE error (SEAL's default), in coefficient units.
ERROR_STD = 3.2
_LENGTH_BYTES = 4
#: TenSEAL's serialisation varies by a few bytes (varints); a slot leaves this much room.
_MARGIN = 32


class CkksError(VeilError):
    """A ciphertext or context that cannot be used: malformed, other parameters, wrong size."""


class SecretKeyRefused(CkksError):
    """A context meant for the server carries a secret key: the server must never hold one."""


class OverflowRisk(ConfigError):
    """The worst-case sum times the scale could exceed the ciphertext modulus, where CKKS wraps
    around silently."""


@dataclass(frozen=True)
class CkksParams:
    """The encryption parameters every party of a run must share."""

    poly_modulus_degree: int = 8192
    coeff_modulus_bits: tuple[int, ...] = (60, 40)
    scale_bits: int = 40

    @property
    def slots(self) -> int:
        """Values per ciphertext."""
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    @property
    def data_modulus_bits(self) -> int:
        """A lower bound on log2(q) of a fresh ciphertext: every data prime (all but the last,
        special one) of b bits is above 2^(b-1)."""
        return sum(b - 1 for b in self.coeff_modulus_bits[:-1])

    def max_sum(self) -> float:
        """The largest |value| a sum may reach: |sum| · scale stays below q/2 with a factor 2
        to spare (rounding and noise)."""
        return float(2.0 ** (self.data_modulus_bits - self.scale_bits - 2))

    def check_capacity(self, bound: float, what: str) -> None:
        """Refuse (OverflowRisk) if a sum bounded by `bound` could wrap around the modulus."""
        if bound > self.max_sum():
            raise OverflowRisk(
                f"CKKS overflow risk: {what} can reach {bound:.4g}, and at scale 2^"
                f"{self.scale_bits} with coefficient modulus {list(self.coeff_modulus_bits)} a "
                f"sum must stay below {self.max_sum():.4g} or it wraps around silently; lower "
                "[ckks].max_weight or clip_range, lower scale_bits (less precision), or use a "
                "larger data prime"
            )

    def noise_std(self, terms: int) -> float:
        """Estimated standard deviation of the decryption error of one slot of a sum of `terms`
        fresh symmetric encryptions: the RLWE error (σ = 3.2 per coefficient, plus encoding
        rounding) grows as √terms and the canonical embedding multiplies it by √N."""
        coefficient = math.sqrt(terms * (ERROR_STD**2 + 1.0 / 12.0))
        return coefficient * math.sqrt(self.poly_modulus_degree) / self.scale

    def to_dict(self) -> dict[str, object]:
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_modulus_bits": list(self.coeff_modulus_bits),
            "scale_bits": self.scale_bits,
        }


def new_secret_context(params: CkksParams, *, threads: int | None = None) -> ts.Context:
    """A fresh CKKS context with a new secret key (from SEAL's CSPRNG), symmetric encryption."""
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_modulus_bits),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        n_threads=threads or 1,
    )
    context.global_scale = params.scale
    return context


def secret_context_bytes(context: ts.Context) -> bytes:
    """The parameters and the secret key only (no relinearisation or Galois keys)."""
    if not context.has_secret_key():
        raise CkksError("this context holds no secret key")
    return bytes(
        context.serialize(
            save_public_key=False,
            save_secret_key=True,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    )


def public_context_bytes(context: ts.Context) -> bytes:
    """What the server receives: the parameters, no key of any kind."""
    return bytes(
        context.serialize(
            save_public_key=False,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    )


def load_secret_context(
    data: bytes, params: CkksParams, *, threads: int | None = None
) -> ts.Context:
    """A client's context; CkksError if it is malformed, has no secret key or other params."""
    context = _load(data, params, threads)
    if not context.has_secret_key():
        raise CkksError("the CKKS secret context holds no secret key")
    return context


def load_public_context(
    data: bytes, params: CkksParams, *, threads: int | None = None
) -> ts.Context:
    """The server's context. SecretKeyRefused if it carries a secret key: whoever holds it could
    decrypt every client's update, so the server refuses to start with one."""
    context = _load(data, params, threads)
    if context.has_secret_key() or context.is_private():
        raise SecretKeyRefused(
            "the CKKS context given to the server contains the secret key; refusing to start. "
            "Give the server the public context only (`veil he keygen` writes it as "
            "he/public.ctx) and keep the secret key with the clients"
        )
    return context


def _load(data: bytes, params: CkksParams, threads: int | None) -> ts.Context:
    try:
        context = ts.context_from(data, n_threads=threads or 1)
    except Exception as exc:  # TenSEAL raises bare ValueError/RuntimeError on bad bytes
        raise CkksError(f"not a CKKS context: {exc}") from None
    context.global_scale = params.scale
    sizes = _modulus_bits(context)
    degree = context.seal_context().data.first_context_data().parms().poly_modulus_degree()
    if degree != params.poly_modulus_degree or sizes != params.coeff_modulus_bits:
        raise CkksError(
            f"the CKKS context has N = {degree} and primes of {list(sizes)} bits; this run's "
            f"[ckks] says N = {params.poly_modulus_degree} and {list(params.coeff_modulus_bits)}: "
            "generate the keys again with this config (`veil he keygen`)"
        )
    return context


def _modulus_bits(context: ts.Context) -> tuple[int, ...]:
    parms = context.seal_context().data.key_context_data().parms()
    return tuple(int(m.bit_count()) for m in parms.coeff_modulus())


@dataclass(frozen=True)
class Packing:
    """How a vector of `length` values is cut into frames and how many bytes each takes."""

    params: CkksParams
    length: int

    @property
    def frames(self) -> list[tuple[int, int]]:
        """(start, stop) of each frame: one ciphertext each."""
        step = self.params.slots
        return [(s, min(s + step, self.length)) for s in range(0, self.length, step)]

    @property
    def ciphertexts(self) -> int:
        return math.ceil(self.length / self.params.slots)

    @property
    def frame_bytes(self) -> int:
        """The fixed size of one frame's slot."""
        return _LENGTH_BYTES + _ciphertext_bytes(self.params) + _MARGIN

    @property
    def nbytes(self) -> int:
        """The exact size of an encrypted vector on the wire."""
        return self.ciphertexts * self.frame_bytes


@functools.lru_cache(maxsize=8)
def _ciphertext_bytes(params: CkksParams) -> int:
    """The size of one serialised full ciphertext, measured once per parameter set with a
    throwaway key (random polynomials do not compress, so this is also the largest size)."""
    context = new_secret_context(params)
    return len(ts.ckks_vector(context, np.zeros(params.slots)).serialize())


def encrypt_frames(context: ts.Context, values: npt.NDArray[np.float64]) -> list[bytes]:
    """The serialised frames of `values` (encrypted with the context's secret key)."""
    packing = Packing(_params_of(context), int(values.size))
    return [ts.ckks_vector(context, values[a:b]).serialize() for a, b in packing.frames]


def write_frames(frames: list[bytes], packing: Packing) -> npt.NDArray[np.uint8]:
    """Frames laid out in their fixed-size slots: one uint8 vector of `packing.nbytes`."""
    out = np.zeros(packing.nbytes, np.uint8)
    offset = 0
    size = packing.frame_bytes
    for data in frames:
        if len(data) + _LENGTH_BYTES > size:
            raise CkksError(f"a serialised frame of {len(data)} bytes exceeds its slot of {size}")
        out[offset : offset + _LENGTH_BYTES] = np.frombuffer(
            len(data).to_bytes(_LENGTH_BYTES, "little"), np.uint8
        )
        out[offset + _LENGTH_BYTES : offset + _LENGTH_BYTES + len(data)] = np.frombuffer(
            data, np.uint8
        )
        offset += size
    if offset != packing.nbytes:
        raise CkksError(f"{len(frames)} frames for a vector of {packing.ciphertexts} ciphertexts")
    return out


def read_frames(
    context: ts.Context, blob: npt.NDArray[np.uint8], packing: Packing
) -> list[ts.CKKSVector]:
    """Parse and check every frame of an upload; CkksError naming what is wrong (wrong total
    size, a frame of another length or scale, bytes that do not parse)."""
    if blob.dtype != np.uint8 or blob.shape != (packing.nbytes,):
        raise CkksError(
            f"an encrypted vector of {packing.length} values takes {packing.nbytes} bytes, "
            f"got {blob.shape} {blob.dtype}"
        )
    raw = blob.tobytes()
    size = packing.frame_bytes
    frames = []
    for offset in range(0, len(raw), size):
        length = int.from_bytes(raw[offset : offset + _LENGTH_BYTES], "little")
        if length > size - _LENGTH_BYTES:
            raise CkksError("a frame's length field exceeds its slot")
        frames.append(raw[offset + _LENGTH_BYTES : offset + _LENGTH_BYTES + length])
    return parse_frames(context, frames, packing)


def parse_frames(context: ts.Context, frames: list[bytes], packing: Packing) -> list[ts.CKKSVector]:
    """The CKKS vectors of serialised frames, each checked: one fresh ciphertext at the
    context's scale holding the frame's number of values."""
    if len(frames) != packing.ciphertexts:
        raise CkksError(f"{len(frames)} frames for a vector of {packing.ciphertexts} ciphertexts")
    vectors = []
    for (a, b), data in zip(packing.frames, frames, strict=True):
        try:
            vector = ts.ckks_vector_from(context, data)
        except Exception as exc:  # malformed bytes: TenSEAL raises bare exceptions
            raise CkksError(f"a frame does not parse as a CKKS vector: {exc}") from None
        if vector.size() != b - a:
            raise CkksError(f"a frame holds {vector.size()} values, expected {b - a}")
        ciphertext = vector.ciphertext()
        if len(ciphertext) != 1 or ciphertext[0].size() != 2:
            raise CkksError("a frame must hold one ciphertext of two polynomials")
        if not math.isclose(ciphertext[0].scale, context.global_scale, rel_tol=1e-9):
            raise CkksError(
                f"a frame has scale {ciphertext[0].scale:.6g}, expected 2^{_log2(context)}"
            )
        vectors.append(vector)
    return vectors


def decrypt_frames(vectors: list[ts.CKKSVector]) -> npt.NDArray[np.float64]:
    """The decrypted values of every frame, in order (the context must hold the secret key)."""
    return np.concatenate([np.asarray(v.decrypt(), np.float64) for v in vectors])


def join_frames(frames: list[bytes]) -> bytes:
    """Serialised frames, each with a 4-byte length (a sum on its way to a decryptor)."""
    return b"".join(len(f).to_bytes(_LENGTH_BYTES, "little") + f for f in frames)


def split_frames(data: bytes) -> list[bytes]:
    """The frames of `join_frames`; CkksError if the lengths do not add up."""
    frames, offset = [], 0
    while offset < len(data):
        n = int.from_bytes(data[offset : offset + _LENGTH_BYTES], "little")
        offset += _LENGTH_BYTES
        if n == 0 or offset + n > len(data):
            raise CkksError("malformed frames: a length runs past the end")
        frames.append(data[offset : offset + n])
        offset += n
    return frames


def _params_of(context: ts.Context) -> CkksParams:
    degree = context.seal_context().data.first_context_data().parms().poly_modulus_degree()
    return CkksParams(int(degree), _modulus_bits(context), _log2(context))


def _log2(context: ts.Context) -> int:
    return round(math.log2(context.global_scale))
