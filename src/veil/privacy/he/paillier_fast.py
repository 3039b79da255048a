"""Fast Paillier on gmpy2: textbook Paillier (1999) with g = n + 1, its randomness precomputed
in a background pool, CRT decryption, and signed fixed-point values packed into slots. The layer
that vertical logistic regression (`veil.vertical.logistic`) and SecureBoost
(`veil.vertical.secureboost`) share.

Arithmetic (nothing beyond the textbook scheme):

* encryption: Enc(m) = (1 + m·n) · r^n mod n², r uniform in Z_n* from `secrets`. The factor
  r^n mod n² (one 2048-bit exponentiation, ~8 ms) does not depend on m, so `RandomnessPool`
  makes it ahead of time in background threads; what remains on the critical path is one
  multiplication mod n² (plus 1 + m·n, a shift-and-add);
* addition: Enc(a)·Enc(b) = Enc(a + b); plaintext scalar k: Enc(a)^k = Enc(k·a);
* decryption by the CRT over p² and q² (Paillier's own speed-up): two half-size
  exponentiations instead of one mod n².

Keys come from `veil.privacy.he.paillier.generate_keypair` (`phe`, primes from os.urandom;
at least 2048 bits) and are converted, so `phe` and this layer share keys.

Signed values and packing: a plaintext is an integer mod n; values are read in the centred
range (-n/2, n/2), so negative numbers need no offset. `pack` puts K ciphertexts into one,
Σ_k v_k · 2^(k·s) (Horner: (K-1)·s squarings mod n²), and `unpack_signed` recovers every v_k
exactly as long as each |v_k| < 2^(s-1) and the whole packed value stays below n/2. The budget
of a slot is therefore (`slot_bits`): the bits of the largest fixed-point value (integer part +
fractional bits) + ceil(log2(number of summands)) + 1 sign bit. Adding packed ciphertexts adds
slot by slot (the carries of negative slots are undone by the centred decoding).

The dominant cost of vertical learning is a plaintext matrix times an encrypted vector
(Σ_i x_ik · Enc(d_i)): `encrypted_dot` groups the rows of each column by their (quantised)
value, multiplies each group's ciphertexts (one multiplication per row) and exponentiates each
distinct value once. One-hot and ordinal columns then cost a few exponentiations instead of one
per row.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gmpy2
import numpy as np
import numpy.typing as npt
from phe import PaillierPrivateKey, PaillierPublicKey

from veil.errors import ConfigError, VeilError

__all__ = [
    "FastPrivateKey",
    "FastPublicKey",
    "Mpz",
    "PackError",
    "RandomnessPool",
    "Slots",
    "encrypted_dot",
    "generate_fast_keypair",
    "multi_exp",
    "pack",
    "private_key_for",
    "quantise",
    "slot_bits",
    "unpack_signed",
]

Mpz = Any  # a gmpy2.mpz (gmpy2 is untyped here)


class PackError(VeilError):
    """Values do not fit the slots they were packed into, or a ciphertext is out of range."""


def slot_bits(value_bits: int, summands: int) -> int:
    """Bits of one packed slot that holds a sum of `summands` signed values of magnitude below
    2^value_bits: value bits + ceil(log2(summands)) + 1 sign bit."""
    if value_bits < 1 or summands < 1:
        raise ConfigError("value_bits and summands must be at least 1")
    return value_bits + math.ceil(math.log2(summands)) + 1


def quantise(values: npt.ArrayLike, frac_bits: int) -> npt.NDArray[np.int64]:
    """round(values · 2^frac_bits) as int64; PackError if a value is not finite or too large."""
    v = np.asarray(values, np.float64)
    if not np.isfinite(v).all():
        raise PackError("cannot encode NaN or Inf")
    scaled = np.rint(v * float(1 << frac_bits))
    if scaled.size and float(np.max(np.abs(scaled))) >= 2.0**62:
        raise PackError(f"a value is too large for {frac_bits} fractional bits")
    return scaled.astype(np.int64)


class FastPublicKey:
    """n and n² as gmpy2 integers; encryption with a precomputed r^n (see `RandomnessPool`)."""

    def __init__(self, n: int):
        if int(n).bit_length() < 2048:
            raise ConfigError(f"a Paillier key of {int(n).bit_length()} bits is too weak")
        self.n = gmpy2.mpz(n)
        self.nsquare = self.n * self.n
        self.bits = int(n).bit_length()

    @classmethod
    def from_phe(cls, public: PaillierPublicKey, *, allow_weak: bool = False) -> FastPublicKey:
        """The same key as `phe`'s; `allow_weak` admits short keys (tests only)."""
        key = cls.__new__(cls)
        if not allow_weak:
            cls.__init__(key, public.n)
            return key
        key.n = gmpy2.mpz(public.n)
        key.nsquare = key.n * key.n
        key.bits = int(public.n).bit_length()
        return key

    def encrypt(self, m: int, rn: Mpz) -> Mpz:
        """Enc(m) = (1 + (m mod n)·n) · rn mod n², with rn = r^n mod n² from a pool: one
        multiplication mod n²; m may be negative (it is read centred on decryption)."""
        return (1 + (gmpy2.mpz(m) % self.n) * self.n) * rn % self.nsquare

    def add_plain(self, c: Mpz, m: int) -> Mpz:
        """Enc(a) -> Enc(a + m) without fresh randomness (whoever made `c` knows its r:
        re-randomise with `rerandomise` before it leaves for a party that did not)."""
        return c * (1 + (gmpy2.mpz(m) % self.n) * self.n) % self.nsquare

    def rerandomise(self, c: Mpz, rn: Mpz) -> Mpz:
        """The same plaintext under fresh randomness: c · r^n mod n²."""
        return c * rn % self.nsquare

    def add(self, a: Mpz, b: Mpz) -> Mpz:
        """Enc(x) · Enc(y) = Enc(x + y)."""
        return a * b % self.nsquare

    def check(self, c: int) -> Mpz:
        """c as gmpy2 integer; PackError unless 0 < c < n² (a ciphertext of this key)."""
        value = gmpy2.mpz(c)
        if not 0 < value < self.nsquare:
            raise PackError("a ciphertext is out of range for this key")
        return value


class FastPrivateKey:
    """p and q; decryption by the CRT (Paillier 1999, section 7)."""

    def __init__(self, public: FastPublicKey, p: int, q: int):
        if p * q != public.n:
            raise ConfigError("p·q is not the public modulus")
        self.public = public
        self.p, self.q = gmpy2.mpz(min(p, q)), gmpy2.mpz(max(p, q))
        self.psquare, self.qsquare = self.p * self.p, self.q * self.q
        self.hp = self._h(self.p, self.psquare)
        self.hq = self._h(self.q, self.qsquare)
        self.q_inverse = gmpy2.invert(self.q, self.p)

    def _h(self, x: Mpz, xsquare: Mpz) -> Mpz:
        g = (self.public.n + 1) % xsquare
        lx = (gmpy2.powmod(g, x - 1, xsquare) - 1) // x
        return gmpy2.invert(lx, x)

    @classmethod
    def from_phe(cls, private: PaillierPrivateKey, *, allow_weak: bool = False) -> FastPrivateKey:
        """The same key as `phe`'s private key."""
        return cls(
            FastPublicKey.from_phe(private.public_key, allow_weak=allow_weak), private.p, private.q
        )

    def _half(self, c: Mpz, x: Mpz, xsquare: Mpz, h: Mpz) -> Mpz:
        return (gmpy2.powmod(c, x - 1, xsquare) - 1) // x * h % x

    def decrypt(self, c: Mpz) -> int:
        """The plaintext in [0, n)."""
        mp = self._half(c, self.p, self.psquare, self.hp)
        mq = self._half(c, self.q, self.qsquare, self.hq)
        u = (mp - mq) * self.q_inverse % self.p
        return int(mq + u * self.q)

    def decrypt_signed(self, c: Mpz) -> int:
        """The plaintext in the centred range (-n/2, n/2]."""
        m = self.decrypt(c)
        n = int(self.public.n)
        return m - n if m > n // 2 else m


def generate_fast_keypair(bits: int = 2048) -> tuple[FastPublicKey, FastPrivateKey]:
    """A fresh key pair (primes from os.urandom via `phe`); ConfigError under 2048 bits."""
    from veil.privacy.he.paillier import generate_keypair

    _, private = generate_keypair(bits)
    fast = FastPrivateKey.from_phe(private)
    return fast.public, fast


def private_key_for(
    keypair: tuple[PaillierPublicKey, PaillierPrivateKey] | FastPrivateKey | None, bits: int
) -> FastPrivateKey:
    """The key a protocol runs with: `keypair` as given (a `FastPrivateKey`, or a `phe` pair,
    which tests pass short: weak keys are allowed only this way), else a fresh `bits` key."""
    if isinstance(keypair, FastPrivateKey):
        return keypair
    if keypair is not None:
        return FastPrivateKey.from_phe(keypair[1], allow_weak=True)
    return generate_fast_keypair(bits)[1]


class RandomnessPool:
    """r^n mod n² for r uniform in Z_n* (`secrets`), made by `workers` background threads
    (gmpy2 releases the GIL during big exponentiations) up to `target` values ahead.

    `take` pops one; if the pool is empty it computes one inline and counts a miss, so a pool
    that falls behind is slower, never wrong. Each value is handed out once."""

    def __init__(self, public: FastPublicKey, *, workers: int = 2, target: int = 0):
        self.public = public
        self._ready: deque[Mpz] = deque()
        self._lock = threading.Condition()
        self._target = target
        self._closed = False
        self.misses = 0
        self.made = 0
        self.seconds = 0.0  # thread time spent making values (all workers)
        self._threads = [
            threading.Thread(target=self._work, name=f"paillier-pool-{i}", daemon=True)
            for i in range(max(0, workers))
        ]
        for thread in self._threads:
            thread.start()

    def one(self) -> Mpz:
        """A fresh r^n mod n² (no pool)."""
        n = self.public.n
        while True:
            r = gmpy2.mpz(secrets.randbelow(int(n) - 1) + 1)
            if gmpy2.gcd(r, n) == 1:
                return gmpy2.powmod(r, n, self.public.nsquare)

    def _work(self) -> None:
        gmpy2.get_context().allow_release_gil = True
        while True:
            with self._lock:
                while not self._closed and len(self._ready) >= self._target:
                    self._lock.wait()
                if self._closed:
                    return
            started = time.perf_counter()
            value = self.one()
            with self._lock:
                self._ready.append(value)
                self.made += 1
                self.seconds += time.perf_counter() - started
                self._lock.notify_all()

    def request(self, count: int) -> None:
        """Keep `count` values ready (the workers start making them)."""
        with self._lock:
            self._target = max(0, count)
            self._lock.notify_all()

    def fill(self, count: int) -> None:
        """Block until `count` values are ready (offline precomputation)."""
        self.request(count)
        if not self._threads:
            while len(self._ready) < count:
                self._ready.append(self.one())
                self.made += 1
            return
        with self._lock:
            while len(self._ready) < count:
                self._lock.wait()

    @property
    def ready(self) -> int:
        return len(self._ready)

    def take(self) -> Mpz:
        """One r^n mod n², never handed out before."""
        try:
            value = self._ready.popleft()
        except IndexError:
            self.misses += 1
            return self.one()
        with self._lock:
            self._lock.notify_all()
        return value

    def close(self) -> None:
        """Stop the workers (values already made are dropped)."""
        with self._lock:
            self._closed = True
            self._ready.clear()
            self._lock.notify_all()
        for thread in self._threads:
            thread.join()


def encrypted_dot(ciphertexts: Sequence[Mpz], q: npt.NDArray[np.int64], nsquare: Mpz) -> list[Mpz]:
    """[[Σ_i q_ik · m_i]] for each column k of the integer matrix `q` (rows x columns), where
    ciphertexts[i] = [[m_i]]: rows are grouped by their value in each column, each group's
    ciphertexts multiplied, and each distinct value exponentiated once (negative values through
    one inversion per column)."""
    q = np.asarray(q, np.int64)
    if q.ndim != 2 or q.shape[0] != len(ciphertexts):
        raise PackError("the plaintext matrix must have one row per ciphertext")
    out = []
    for column in q.T:
        groups: dict[int, Mpz] = {}
        for c, value in zip(ciphertexts, column.tolist(), strict=True):
            if value:
                g = groups.get(value)
                groups[value] = c if g is None else g * c % nsquare
        pos = multi_exp([(g, v) for v, g in groups.items() if v > 0], nsquare)
        neg = multi_exp([(g, -v) for v, g in groups.items() if v < 0], nsquare)
        out.append(pos if neg == 1 else pos * gmpy2.invert(neg, nsquare) % nsquare)
    return out


def multi_exp(pairs: Sequence[tuple[Mpz, int]], modulus: Mpz) -> Mpz:
    """Π base^exponent mod `modulus` for non-negative exponents: one exponentiation each when
    there are few pairs, else Straus's method (squarings shared by all pairs, bases in groups
    of 4 with a table of their 16 subset products)."""
    if len(pairs) <= 3:
        acc = gmpy2.mpz(1)
        for base, e in pairs:
            acc = acc * (base if e == 1 else gmpy2.powmod(base, e, modulus)) % modulus
        return acc
    chunks = [pairs[i : i + 4] for i in range(0, len(pairs), 4)]
    tables = []
    for chunk in chunks:
        table = [gmpy2.mpz(1)] * (1 << len(chunk))
        for j, (base, _) in enumerate(chunk):
            bit = 1 << j
            table[bit] = base
            for low in range(1, bit):
                table[bit | low] = table[low] * base % modulus
        tables.append((table, [int(e) for _, e in chunk]))
    acc = gmpy2.mpz(1)
    for k in range(max(int(e) for _, e in pairs).bit_length() - 1, -1, -1):
        if acc != 1:
            acc = acc * acc % modulus
        for table, exps in tables:
            index = 0
            for j, e in enumerate(exps):
                index |= ((e >> k) & 1) << j
            if index:
                acc = acc * table[index] % modulus
    return acc


def pack(ciphertexts: Sequence[Mpz], bits: int, nsquare: Mpz) -> Mpz:
    """[[Σ_k m_k · 2^(k·bits)]] from [[m_0]], [[m_1]], ... (Horner: (K-1)·bits squarings)."""
    if not ciphertexts:
        raise PackError("nothing to pack")
    shift = gmpy2.mpz(1) << bits
    acc = ciphertexts[-1]
    for c in reversed(ciphertexts[:-1]):
        acc = gmpy2.powmod(acc, shift, nsquare) * c % nsquare
    return acc


def unpack_signed(value: int, count: int, bits: int) -> list[int]:
    """The `count` signed slots of a centred packed plaintext (each |slot| < 2^(bits-1));
    PackError if anything is left over (a slot overflowed)."""
    half, full, mask = 1 << (bits - 1), 1 << bits, (1 << bits) - 1
    out = []
    rest = int(value)
    for _ in range(count):
        digit = rest & mask
        if digit >= half:
            digit -= full
        out.append(digit)
        rest = (rest - digit) >> bits
    if rest != 0:
        raise PackError("a packed slot overflowed: its sum needed more bits than the budget")
    return out


@dataclass(frozen=True)
class Slots:
    """How many signed slots of `bits` bits fit under a key (one bit kept for the sign of the
    whole packed value)."""

    bits: int
    per_plaintext: int

    @classmethod
    def fit(cls, public: FastPublicKey, bits: int) -> Slots:
        per = (public.bits - 2) // bits
        if per < 1:
            raise ConfigError(f"a {bits}-bit slot does not fit under a {public.bits}-bit key")
        return cls(bits, per)
