"""Named tensors to and from a stream of protobuf `Chunk`s, with a digest for signatures.

A logical message is one `Header` (kind, JSON metadata, tensor specs, optional signature) and
then every tensor's raw little-endian bytes, in spec order, split into chunks of at most
`CHUNK_BYTES`. Decoding preallocates each array from its spec and fills it as chunks arrive, so a
receiver holds one copy of the payload, never the chunk list. No pickle: only the dtypes in
`ALLOWED_DTYPES` are accepted.

A receiver bounds what a stream may cost it: the announced size is computed in exact integers
(a shape whose product overflows int64 is refused, not wrapped), and the number of data chunks
is capped (`max_data_chunks`), with at most `MAX_EMPTY_CHUNKS` empty ones, so a stream of
200,000 zero-length chunks is refused after the 17th empty chunk.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from veil.crypto.identity import signing_payload
from veil.errors import VeilError
from veil.transport.grpc import veil_pb2 as pb

CHUNK_BYTES = 1 << 20
ALLOWED_DTYPES = frozenset({"<f4", "<f8", "<i8", "<i4", "<u2", "<u4", "<u8", "|u1"})
#: A sender never needs an empty data chunk (`data_chunks` sends none); a few are tolerated.
MAX_EMPTY_CHUNKS = 16
#: The most dimensions a tensor may announce (numpy's own limit is 64).
MAX_DIMS = 32


def max_data_chunks(announced_bytes: int, tensors: int) -> int:
    """The most data chunks a message announcing `announced_bytes` in `tensors` tensors may
    have: what `data_chunks` sends (at most one short chunk per tensor plus one per full
    `CHUNK_BYTES`), with room for senders that use chunks as small as 64 KiB, plus 64."""
    return 64 + tensors + announced_bytes // (64 << 10)


class MalformedMessage(VeilError, ValueError):
    """A stream that does not decode to a well-formed message."""


@dataclass
class Message:
    kind: str
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]
    signature: bytes
    #: SHA-256 over the metadata, the tensor specs and every tensor byte, in order.
    digest: bytes

    def signed_payload(self) -> bytes:
        return signing_payload("veil-message", self.kind, self.digest)


def _specs(arrays: Mapping[str, np.ndarray]) -> list[pb.TensorSpec]:
    return [
        pb.TensorSpec(name=name, dtype=_le(a).dtype.str, shape=list(a.shape))
        for name, a in arrays.items()
    ]


def _bytes_view(a: np.ndarray) -> memoryview:
    """The array's little-endian bytes, without a copy when it already is contiguous LE."""
    return _le(a).reshape(-1).view(np.uint8).data


def _le(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


def _digest_start(kind: str, meta_json: str, specs: Iterable[pb.TensorSpec]) -> Any:
    h = hashlib.sha256()
    h.update(signing_payload("veil-header", kind, meta_json))
    for s in specs:
        h.update(signing_payload(s.name, s.dtype, json.dumps(list(s.shape))))
    return h


def digest(kind: str, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> bytes:
    """The digest `decode` computes for the same message (what a sender signs)."""
    meta_json = json.dumps(meta, sort_keys=True)
    h = _digest_start(kind, meta_json, _specs(arrays))
    for a in arrays.values():
        h.update(_bytes_view(a))
    return bytes(h.digest())


def encode(
    kind: str,
    meta: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray] | None = None,
    *,
    signature: bytes = b"",
) -> Iterator[pb.Chunk]:
    """The chunks of one message."""
    arrays = arrays or {}
    yield header_chunk(kind, meta, arrays, signature=signature)
    yield from data_chunks(arrays)


def header_chunk(
    kind: str,
    meta: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    *,
    signature: bytes = b"",
) -> pb.Chunk:
    """The header chunk that announces `arrays`."""
    header = pb.Header(
        kind=kind,
        json=json.dumps(meta, sort_keys=True),
        tensors=_specs(arrays),
        signature=signature,
    )
    return pb.Chunk(header=header)


def data_chunks(arrays: Mapping[str, np.ndarray]) -> Iterator[pb.Chunk]:
    """The tensors' bytes in chunks; a sender may build them once and send them to many."""
    for a in arrays.values():
        view = _bytes_view(a)
        for start in range(0, len(view), CHUNK_BYTES):
            yield pb.Chunk(data=bytes(view[start : start + CHUNK_BYTES]))


def decode(chunks: Iterable[pb.Chunk], *, max_bytes: int = 1 << 40) -> Message:
    """Reassemble one message; `MalformedMessage` on anything unexpected."""
    it = iter(chunks)
    first = next(it, None)
    if first is None or first.WhichOneof("part") != "header":
        raise MalformedMessage("a message must start with a header")
    header = first.header
    try:
        meta = json.loads(header.json) if header.json else {}
    except json.JSONDecodeError as exc:
        raise MalformedMessage(f"metadata is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise MalformedMessage("metadata must be a JSON object")
    arrays: dict[str, np.ndarray] = {}
    buffers: list[memoryview] = []
    total = 0
    for spec in header.tensors:
        if spec.dtype not in ALLOWED_DTYPES:
            raise MalformedMessage(f"tensor '{spec.name}': dtype {spec.dtype!r} is not allowed")
        if spec.name in arrays or any(d < 0 for d in spec.shape):
            raise MalformedMessage(f"tensor '{spec.name}': duplicate name or negative shape")
        if len(spec.shape) > MAX_DIMS:
            raise MalformedMessage(f"tensor '{spec.name}': more than {MAX_DIMS} dimensions")
        shape = tuple(int(d) for d in spec.shape)
        # Exact integers: a product that overflows int64 must not wrap to a small size.
        nbytes = math.prod(shape) * np.dtype(spec.dtype).itemsize
        total += nbytes
        if total > max_bytes:
            raise MalformedMessage(f"message larger than the limit of {max_bytes} bytes")
        arr = np.empty(shape, dtype=np.dtype(spec.dtype))
        arrays[spec.name] = arr
        buffers.append(arr.reshape(-1).view(np.uint8).data)
    h = _digest_start(header.kind, header.json, header.tensors)
    index, offset = 0, 0
    chunk_limit = max_data_chunks(total, len(buffers))
    chunks_seen, empty_seen = 0, 0
    for chunk in it:
        if chunk.WhichOneof("part") != "data":
            raise MalformedMessage("a second header inside one message")
        chunks_seen += 1
        if chunks_seen > chunk_limit:
            raise MalformedMessage(
                f"more than {chunk_limit} data chunks for {total} announced bytes"
            )
        if not chunk.data:
            empty_seen += 1
            if empty_seen > MAX_EMPTY_CHUNKS:
                raise MalformedMessage(f"more than {MAX_EMPTY_CHUNKS} empty data chunks")
            continue
        data = memoryview(chunk.data)  # slices of a view do not copy
        pos = 0
        while pos < len(data):
            while index < len(buffers) and offset == len(buffers[index]):
                index, offset = index + 1, 0
            if index == len(buffers):
                raise MalformedMessage("more tensor bytes than the specs announce")
            take = min(len(data) - pos, len(buffers[index]) - offset)
            buffers[index][offset : offset + take] = data[pos : pos + take]
            pos += take
            offset += take
        h.update(data)
    while index < len(buffers) and offset == len(buffers[index]):
        index, offset = index + 1, 0
    if index != len(buffers):
        raise MalformedMessage("fewer tensor bytes than the specs announce")
    return Message(
        kind=header.kind,
        meta=meta,
        arrays={k: v.astype(v.dtype.newbyteorder("="), copy=False) for k, v in arrays.items()},
        signature=bytes(header.signature),
        digest=h.digest(),
    )
