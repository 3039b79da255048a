"""CKKS through TenSEAL and its SEAL binding: contexts, packing of a flat vector into few
ciphertexts, fixed-size frames for the wire, the overflow guard and the noise estimate.

CKKS (Cheon, Kim, Kim and Song 2017) encrypts a vector of N/2 complex numbers as one ciphertext
of two polynomials modulo q; ciphertexts add slot by slot. Aggregation only adds, so Veil uses
the shortest modulus chain (one data prime and the special prime, e.g. [60, 40]), no Galois or
relinearisation keys, and symmetric encryption: the clients hold the secret key anyway (they
decrypt the sum), a secret-key RLWE encryption is as hard to break as a public-key one and
cheaper, and the server receives a context with the parameters only, so it can add but can
neither encrypt nor decrypt.

Two things halve an upload each, at the same parameters (so the same 128-bit security level of
the HE standard) and the same scale (so the same precision):

* Complex packing: a slot holds a complex number, so a frame of N real values puts the first
  N/2 in the real parts and the rest in the imaginary parts. Addition acts on both parts alike,
  and the decryption error of an imaginary part has the distribution of a real part's.
* Seeded ciphertexts: a symmetric ciphertext is (c0, c1) = (-a·s + e + m, a) with `a` uniform;
  SEAL draws `a` from a seeded PRNG (SHAKE-256 or BLAKE2xb) and serialises the seed in place
  of c1 (SEAL's `Serializable` ciphertext); the reader expands it. The security argument is
  SEAL's: `a` is the output of a PRNG keyed by a fresh random seed.

An upload is thus about 2x its float32 size (N = 8192, one 60-bit data prime: 8 bytes per
coefficient of c0 for N values) instead of 8x for TenSEAL's real-packed, full ciphertexts.
TenSEAL's `CKKSVector` exposes neither, so frames are made and read with `tenseal.sealapi`
(SEAL's own objects); the contexts and keys stay TenSEAL's.

A flat vector is cut into frames of N values (the last one shorter), one ciphertext each;
every frame travels in a slot of fixed size (4-byte length, the serialised ciphertext, zero
padding), so an upload has one exact size that the server checks before it parses anything,
and the transport streams it in chunks.
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
from veil.privacy.he.seal_io import load_ciphertext, save_bytes

__all__ = [
    "CkksError",
    "CkksParams",
    "OverflowRisk",
    "Packing",
    "SecretKeyRefused",
    "add_frames",
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
#: SEAL's serialisation (compressed when the build has zstd) varies by a few bytes; a slot leaves
#: this much room.
_MARGIN = 64


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
        """Complex slots per ciphertext."""
        return self.poly_modulus_degree // 2

    @property
    def values_per_ciphertext(self) -> int:
        """Real values per ciphertext: two per complex slot (complex packing)."""
        return self.poly_modulus_degree

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
        step = self.params.values_per_ciphertext
        return [(s, min(s + step, self.length)) for s in range(0, self.length, step)]

    @property
    def ciphertexts(self) -> int:
        return math.ceil(self.length / self.params.values_per_ciphertext)

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
    """The largest size of one serialised frame, measured once per parameter set with a
    throwaway key: random polynomials do not compress, so every frame is about this size."""
    context = new_secret_context(params)
    values = np.zeros(params.values_per_ciphertext)  # c0 is uniform whatever the message
    return max(len(encrypt_frames(context, values)[0]) for _ in range(4))


class _Seal:
    """SEAL's encoder, encryptor and decryptor for a TenSEAL context holding the secret key
    (CkksError for one without: the server's)."""

    def __init__(self, context: ts.Context) -> None:
        sealapi = tenseal.sealapi
        self.context = context.seal_context().data
        self.encoder = sealapi.CKKSEncoder(self.context)
        self.scale = float(context.global_scale)
        self.half = self.encoder.slot_count()
        if not context.has_secret_key():
            raise CkksError("this context holds no secret key: it can neither encrypt nor decrypt")
        key = context.secret_key().data
        self.encryptor = sealapi.Encryptor(self.context, key)
        self.decryptor = sealapi.Decryptor(self.context, key)

    def encrypt(self, values: npt.NDArray[np.float64]) -> bytes:
        """One seeded ciphertext of up to N values: the first N/2 in the real parts of the
        slots, the rest in the imaginary parts."""
        slots = np.zeros(self.half, np.complex128)
        head = values[: self.half]
        slots.real[: head.size] = head
        tail = values[self.half :]
        slots.imag[: tail.size] = tail
        plain = tenseal.sealapi.Plaintext()
        self.encoder.encode(slots.tolist(), self.scale, plain)
        return save_bytes(self.encryptor.encrypt_symmetric(plain))

    def decrypt(self, ciphertext: object, count: int) -> npt.NDArray[np.float64]:
        plain = tenseal.sealapi.Plaintext()
        self.decryptor.decrypt(ciphertext, plain)
        slots = np.asarray(self.encoder.decode_complex(plain), np.complex128)
        return np.concatenate([slots.real, slots.imag])[:count]


def encrypt_frames(context: ts.Context, values: npt.NDArray[np.float64]) -> list[bytes]:
    """The serialised frames of `values` (seeded ciphertexts under the context's secret key)."""
    seal = _Seal(context)
    packing = Packing(_params_of(context), int(values.size))
    flat = np.asarray(values, np.float64)
    return [seal.encrypt(flat[a:b]) for a, b in packing.frames]


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


def read_frames(context: ts.Context, blob: npt.NDArray[np.uint8], packing: Packing) -> list[object]:
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


def parse_frames(context: ts.Context, frames: list[bytes], packing: Packing) -> list[object]:
    """SEAL's ciphertexts of serialised frames, each checked by SEAL's own loader (header,
    parameters, reduced coefficients) and then here: one fresh ciphertext of two polynomials at
    the context's first data level and scale."""
    if len(frames) != packing.ciphertexts:
        raise CkksError(f"{len(frames)} frames for a vector of {packing.ciphertexts} ciphertexts")
    seal_context = context.seal_context().data
    level = list(seal_context.first_parms_id())
    ciphertexts = []
    for data in frames:
        try:
            ciphertext = load_ciphertext(seal_context, data)
        except Exception as exc:  # SEAL raises bare ValueError/RuntimeError on bad bytes
            raise CkksError(f"a frame does not parse as a CKKS ciphertext: {exc}") from None
        if ciphertext.size() != 2 or not ciphertext.is_ntt_form():
            raise CkksError("a frame must hold one fresh ciphertext of two polynomials")
        if list(ciphertext.parms_id()) != level:
            raise CkksError("a frame is at another level of the modulus chain")
        if not math.isclose(ciphertext.scale, context.global_scale, rel_tol=1e-9):
            raise CkksError(
                f"a frame has scale {ciphertext.scale:.6g}, expected 2^{_log2(context)}"
            )
        ciphertexts.append(ciphertext)
    return ciphertexts


def add_frames(context: ts.Context, total: list[object], frames: list[object]) -> None:
    """Add the ciphertexts of `frames` into `total`, frame by frame (in place)."""
    evaluator = tenseal.sealapi.Evaluator(context.seal_context().data)
    for t, f in zip(total, frames, strict=True):
        evaluator.add_inplace(t, f)


def decrypt_frames(
    context: ts.Context, ciphertexts: list[object], packing: Packing
) -> npt.NDArray[np.float64]:
    """The decrypted values of every frame, in order (the context must hold the secret key)."""
    seal = _Seal(context)
    return np.concatenate(
        [seal.decrypt(c, b - a) for c, (a, b) in zip(ciphertexts, packing.frames, strict=True)]
    )


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
