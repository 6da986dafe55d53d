"""The frame that carries one chunk on disk and over the wire. Never pickle.

Layout (all integers little-endian)::

    prefix   magic b"LMKV" | version u8 | flags u8 | checksum kind u8 | reserved u8
             | header length u32 | payload length u64                       (20 bytes)
    header   UTF-8 JSON: namespace and key (hex), the segments (dtype, shape) of the
             payload, the cache layout (quantization) and, when encrypted, the nonce
    payload  the segments' bytes back to back (AES-256-GCM ciphertext + 16-byte tag
             when encrypted, with prefix + header as the authenticated data)
    trailer  8-byte checksum of everything before it (xxh3-64, or crc32 where the
             ``xxhash`` package is missing; the kind byte says which)

``decode`` checks all of it (magic, version, lengths, checksum, namespace, key, tag) and
raises ``FrameError`` on any mismatch, so a corrupt, truncated, foreign or wrongly keyed
entry is reported as a miss by the store, never returned as data.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from .backends.base import host_dtype

MAGIC = b"LMKV"
VERSION = 1
_PREFIX = struct.Struct("<4sBBBBIQ")
PREFIX_SIZE = _PREFIX.size
TRAILER_SIZE = 8
FLAG_ENCRYPTED = 1
CHECK_CRC32, CHECK_XXH3 = 1, 2
_NONCE = 12
_TAG = 16
# Headers are small JSON; anything larger is a corrupt length field, not a header.
_MAX_HEADER = 1 << 24

try:  # xxh3 runs at ~20 GB/s, crc32 at ~3: the checksum must not be what limits a disk read
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - depends on the installation
    _xxhash = None

class FrameError(ValueError):
    """A frame that is corrupt, truncated, of another namespace or key, or undecryptable."""


class _Checksum:
    """Incremental checksum of kind ``CHECK_XXH3`` or ``CHECK_CRC32`` (8-byte digest)."""

    def __init__(self, kind: int):
        if kind == CHECK_XXH3:
            if _xxhash is None:
                raise FrameError("the frame's checksum is xxh3 but the xxhash package is not installed")
            self._h = _xxhash.xxh3_64()
        elif kind == CHECK_CRC32:
            self._h = None
            self._crc = 0
        else:
            raise FrameError(f"unknown checksum kind {kind}")

    def update(self, b) -> None:
        if self._h is not None:
            self._h.update(b)
        else:
            self._crc = zlib.crc32(b, self._crc)

    def digest(self) -> bytes:
        return self._h.digest() if self._h is not None else struct.pack("<Q", self._crc)


def default_checksum() -> int:
    """The checksum kind new frames use: xxh3 when ``xxhash`` is installed, else crc32."""
    return CHECK_XXH3 if _xxhash is not None else CHECK_CRC32


def check_key(key) -> bytes | None:
    """Validate an AES-256 key: ``None`` or 32 bytes. Raises ``ValueError``/``TypeError``."""
    if key is None:
        return None
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(f"key must be 32 bytes (AES-256) or None, got {type(key).__name__}")
    if len(key) != 32:
        raise ValueError(f"key must be 32 bytes (AES-256), got {len(key)} bytes")
    import cryptography  # noqa: F401  (fail early with a clear error when it is missing)

    return bytes(key)


#: The dtypes a frame may carry, with their item sizes in bytes.
_ITEMSIZE = {"uint8": 1, "int8": 1, "float16": 2, "bfloat16": 2, "int32": 4, "float32": 4, "int64": 8, "float64": 8}


@dataclass(frozen=True)
class Segment:
    """One array of a payload: dtype name (a key of ``_ITEMSIZE``) and shape (a tuple of ints)."""

    dtype: str
    shape: tuple

    @property
    def nbytes(self) -> int:
        """Bytes of the array: the product of the shape times the item size."""
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


@dataclass
class Header:
    """What a frame says about its payload.

    ``namespace``/``key``: bytes identifying the chunk. ``segments``: the arrays of the
    payload in order. ``layout``: a JSON-able dict describing the cache the chunk came from
    (dtype, layers, heads, bits...); the store compares it with the importing cache.
    """

    namespace: bytes
    key: bytes
    segments: list[Segment]
    layout: dict = field(default_factory=dict)

    @functools.cached_property
    def payload_nbytes(self) -> int:
        """Bytes of the plain payload: the segments' sizes summed (computed once)."""
        return sum(s.nbytes for s in self.segments)

    def to_json(self, nonce: bytes | None) -> bytes:
        """The header as compact UTF-8 JSON; ``nonce``: the 12-byte AES-GCM nonce, or ``None``."""
        d = {"ns": self.namespace.hex(), "key": self.key.hex(),
             "seg": [[s.dtype, list(s.shape)] for s in self.segments], "layout": self.layout}
        if nonce is not None:
            d["nonce"] = nonce.hex()
        return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()

    @staticmethod
    def from_json(b: bytes) -> tuple[Header, bytes | None]:
        """``(header, nonce or None)`` from the JSON bytes ``b``; raises ``FrameError`` if unreadable."""
        try:
            d = json.loads(bytes(b))
            segs = []
            for dt, shape in d["seg"]:
                if dt not in _ITEMSIZE or not all(isinstance(n, int) and n >= 0 for n in shape):
                    raise FrameError(f"bad segment {dt!r} {shape!r}")
                segs.append(Segment(dt, tuple(shape)))
            layout = d.get("layout", {})
            if not isinstance(layout, dict):  # the store reads it with .get: a list would raise there
                raise FrameError(f"frame layout must be a JSON object, got {type(layout).__name__}")
            h = Header(bytes.fromhex(d["ns"]), bytes.fromhex(d["key"]), segs, layout)
            nonce = bytes.fromhex(d["nonce"]) if "nonce" in d else None
        except (ValueError, KeyError, TypeError) as e:
            raise FrameError(f"unreadable frame header: {e}") from None
        return h, nonce


@functools.lru_cache(maxsize=256)
def _plan(segments: tuple) -> tuple:
    """(start, stop, dtype, shape) of each segment; every chunk of a cache shares one plan."""
    out, off = [], 0
    for s in segments:
        n = s.nbytes
        out.append((off, off + n, host_dtype(s.dtype), s.shape))
        off += n
    return tuple(out)


def split_payload(header: Header, payload) -> list[np.ndarray]:
    """The payload's segments as numpy arrays (views of ``payload``, no copy)."""
    if isinstance(payload, np.ndarray):
        buf = payload.reshape(-1).view(np.uint8)
    else:
        buf = np.frombuffer(payload, np.uint8)
    return [buf[a:b].view(dt).reshape(shape) for a, b, dt, shape in _plan(tuple(header.segments))]


def encode(header: Header, payload, key: bytes | None = None, checksum: int | None = None) -> list:
    """Frame ``payload`` (a contiguous bytes-like of ``header.payload_nbytes`` bytes).

    Returns the frame as a list of bytes-like pieces (prefix + header, payload, trailer)
    so that writers can send them without joining; ``b"".join`` gives the whole frame.
    ``key``: 32 bytes to encrypt with AES-256-GCM, or ``None``.
    """
    payload = memoryview(payload).cast("B")
    if payload.nbytes != header.payload_nbytes:
        raise ValueError(f"payload holds {payload.nbytes} bytes but the header's segments need "
                         f"{header.payload_nbytes}")
    kind = default_checksum() if checksum is None else checksum
    nonce = os.urandom(_NONCE) if key is not None else None
    hj = header.to_json(nonce)
    body_len = payload.nbytes + (_TAG if key is not None else 0)
    head = _PREFIX.pack(MAGIC, VERSION, FLAG_ENCRYPTED if key is not None else 0, kind, 0, len(hj), body_len) + hj
    if key is not None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        payload = memoryview(AESGCM(key).encrypt(nonce, payload, head))
    ck = _Checksum(kind)
    ck.update(head)
    ck.update(payload)
    return [head, payload, ck.digest()]


def frame_size(pieces: list) -> int:
    """Total bytes of a frame given as pieces by ``encode``."""
    return sum(memoryview(p).nbytes for p in pieces)


def parse_prefix(buf) -> tuple[int, int, int, int]:
    """Check the 20-byte prefix at the start of ``buf`` (bytes-like, at least the prefix).

    Returns ``(flags, checksum kind, header length, payload length)``. Raises
    ``FrameError`` for a short buffer, bad magic, another version or a corrupt header length.
    """
    if len(buf) < PREFIX_SIZE:
        raise FrameError(f"frame of {len(buf)} bytes is truncated")
    magic, version, flags, kind, _, hlen, plen = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FrameError("not a lmcache frame (bad magic)")
    if version != VERSION:
        raise FrameError(f"frame version {version} is not supported (this reader knows {VERSION})")
    if hlen > _MAX_HEADER:
        raise FrameError("frame header length is corrupt")
    return flags, kind, hlen, plen


def frame_length(head) -> int:
    """Total bytes of the frame that starts with ``head`` (bytes-like, at least the prefix).

    When the header is all in ``head``, the payload length is checked against its
    segments, so a corrupt length field cannot make a reader allocate or fetch more.
    Raises ``FrameError`` for a bad prefix or lengths that the header contradicts.
    """
    mv = memoryview(head).cast("B")
    flags, _, hlen, plen = parse_prefix(mv)
    if PREFIX_SIZE + hlen <= mv.nbytes:
        header, _ = Header.from_json(mv[PREFIX_SIZE:PREFIX_SIZE + hlen])
        if plen != header.payload_nbytes + (_TAG if flags & FLAG_ENCRYPTED else 0):
            raise FrameError(f"frame payload length {plen} does not match its header's "
                             f"{header.payload_nbytes} bytes (corrupt frame)")
    return PREFIX_SIZE + hlen + plen + TRAILER_SIZE


def open_head(head, namespace: bytes, key_id: bytes, segments: tuple):
    """Parse the prefix and header at the start of ``head`` (bytes-like) for a direct read.

    Returns ``(header, header end, checksum kind, payload length)``, or ``None`` when the
    frame cannot be read straight into ``segments`` (encrypted, other segments, header not
    all in ``head``). Raises ``FrameError`` for a bad or foreign frame.
    """
    mv = memoryview(head).cast("B")
    flags, kind, hlen, plen = parse_prefix(mv)
    if PREFIX_SIZE + hlen > mv.nbytes:
        return None
    header, _ = Header.from_json(mv[PREFIX_SIZE:PREFIX_SIZE + hlen])
    if flags & FLAG_ENCRYPTED or tuple(header.segments) != tuple(segments) or plen != header.payload_nbytes:
        return None
    if header.namespace != namespace or header.key != key_id:
        raise FrameError("frame belongs to another namespace or chunk")
    return header, PREFIX_SIZE + hlen, kind, plen


def check_runs(head, kind: int, runs: list, trailer) -> None:
    """Verify the checksum of a frame read as ``head`` (prefix + header) and payload ``runs``."""
    ck = _Checksum(kind)
    ck.update(head)
    for r in runs:
        ck.update(r)
    if ck.digest() != bytes(trailer):
        raise FrameError("checksum mismatch (corrupt frame)")


def read_into(read, namespace: bytes, key_id: bytes, segments: tuple, runs: list) -> Header | None:
    """Read a plain frame straight into ``runs``: the payload is never held elsewhere.

    ``read(n)`` returns the next ``n`` bytes of the frame; ``read(None, views)`` fills the
    writable memoryviews ``views`` in order (a ``readv``). ``runs``: writable byte views that
    the payload fills in order (``segments`` describes it). Returns the header, or ``None``
    when the frame cannot go this way (encrypted, or other segments): read it whole then.
    Raises ``FrameError`` as ``decode`` does; ``runs`` then hold garbage.
    """
    prefix = read(PREFIX_SIZE)
    flags, kind, hlen, plen = parse_prefix(prefix)
    hj = read(hlen)
    if len(hj) != hlen:
        raise FrameError("frame is truncated in its header")
    header, _ = Header.from_json(hj)
    if flags & FLAG_ENCRYPTED or tuple(header.segments) != tuple(segments) or plen != header.payload_nbytes:
        return None
    if header.namespace != namespace or header.key != key_id:
        raise FrameError("frame belongs to another namespace or chunk")
    trailer = bytearray(TRAILER_SIZE)
    views = [*runs, memoryview(trailer)]
    if read(None, views) != plen + TRAILER_SIZE:
        raise FrameError("frame is truncated in its payload")
    check_runs(prefix, kind, [hj, *runs], trailer)
    return header


def decode(frame, namespace: bytes, key_id: bytes, key: bytes | None = None) -> tuple[Header, memoryview]:
    """Check and open a whole frame; return its header and its plain payload (a view).

    ``namespace``/``key_id``: what the caller asked for; a frame of another namespace or
    chunk is rejected. ``key``: the AES-256 key the store was opened with (``None`` for
    none); a frame encrypted with another key, or encrypted when no key is given (and the
    reverse), is rejected. Raises ``FrameError`` on any mismatch.
    """
    mv = memoryview(frame).cast("B")
    flags, kind, hlen, plen = parse_prefix(mv)
    if PREFIX_SIZE + hlen + plen + TRAILER_SIZE != mv.nbytes:
        raise FrameError(f"frame lengths do not add up to its {mv.nbytes} bytes (truncated or corrupt)")
    body_end = PREFIX_SIZE + hlen + plen
    ck = _Checksum(kind)
    ck.update(mv[:body_end])
    if ck.digest() != bytes(mv[body_end:]):
        raise FrameError("checksum mismatch (corrupt frame)")
    head = mv[:PREFIX_SIZE + hlen]
    header, nonce = Header.from_json(mv[PREFIX_SIZE:PREFIX_SIZE + hlen])
    if header.namespace != namespace or header.key != key_id:
        raise FrameError("frame belongs to another namespace or chunk")
    body = mv[PREFIX_SIZE + hlen:body_end]
    encrypted = bool(flags & FLAG_ENCRYPTED)
    if encrypted != (key is not None):
        raise FrameError("frame is encrypted but no key was given" if encrypted
                         else "frame is not encrypted but the store requires encryption")
    if encrypted:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if nonce is None or len(nonce) != _NONCE:
            raise FrameError("encrypted frame without a valid nonce")
        try:
            body = memoryview(AESGCM(key).decrypt(nonce, body, head))
        except InvalidTag:
            raise FrameError("decryption failed: wrong key or tampered frame") from None
    if body.nbytes != header.payload_nbytes:
        raise FrameError(f"payload of {body.nbytes} bytes does not match the header's {header.payload_nbytes}")
    return header, body
