"""The frame: round trip, and every kind of damage is a FrameError (never wrong data)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import require

from lmcache import serde

NS, KEY = b"n" * 32, b"k" * 32


def _header(arrays, ns=NS, key=KEY):
    return serde.Header(ns, key, [serde.Segment(a.dtype.name, a.shape) for a in arrays], {"v": 1, "bits": 4})


def _payload(arrays):
    return b"".join(a.tobytes() for a in arrays)


@pytest.fixture
def arrays(rng):
    return [rng.integers(0, 255, (1, 2, 8, 16), dtype=np.uint8), rng.standard_normal((1, 2, 1, 32)).astype(np.float16),
            np.zeros((0, 3), np.float32)]


def test_round_trip(arrays):
    h = _header(arrays)
    frame = b"".join(serde.encode(h, _payload(arrays)))
    assert frame[:4] == serde.MAGIC
    h2, payload = serde.decode(frame, NS, KEY)
    assert h2.segments == h.segments and h2.layout == {"v": 1, "bits": 4}
    for a, b in zip(arrays, serde.split_payload(h2, payload)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_crc32_frames_are_readable(arrays):
    h = _header(arrays)
    frame = b"".join(serde.encode(h, _payload(arrays), checksum=serde.CHECK_CRC32))
    assert serde.decode(frame, NS, KEY)[0].segments == h.segments


def test_no_pickle_in_header(arrays):
    frame = b"".join(serde.encode(_header(arrays), _payload(arrays)))
    hlen = int.from_bytes(frame[8:12], "little")
    header = frame[serde.PREFIX_SIZE:serde.PREFIX_SIZE + hlen]
    assert header.startswith(b"{") and header.endswith(b"}")


@pytest.mark.parametrize("where", ["magic", "version", "header", "payload", "trailer"])
def test_any_flipped_byte_is_rejected(arrays, where):
    frame = bytearray(b"".join(serde.encode(_header(arrays), _payload(arrays))))
    hlen = int.from_bytes(frame[8:12], "little")
    pos = {"magic": 0, "version": 4, "header": serde.PREFIX_SIZE + 3, "payload": serde.PREFIX_SIZE + hlen + 5,
           "trailer": len(frame) - 1}[where]
    frame[pos] ^= 0x10
    with pytest.raises(serde.FrameError):
        serde.decode(bytes(frame), NS, KEY)


@pytest.mark.parametrize("cut", [0, 3, serde.PREFIX_SIZE, 100, -9, -1])
def test_truncated_frames_are_rejected(arrays, cut):
    frame = b"".join(serde.encode(_header(arrays), _payload(arrays)))
    with pytest.raises(serde.FrameError):
        serde.decode(frame[:cut], NS, KEY)


def test_other_namespace_or_key_is_rejected(arrays):
    frame = b"".join(serde.encode(_header(arrays), _payload(arrays)))
    with pytest.raises(serde.FrameError, match="namespace"):
        serde.decode(frame, b"x" * 32, KEY)
    with pytest.raises(serde.FrameError, match="namespace"):
        serde.decode(frame, NS, b"y" * 32)


def test_encryption(arrays):
    require("cryptography")
    key = os.urandom(32)
    h = _header(arrays)
    pieces = serde.encode(h, _payload(arrays), key)
    frame = b"".join(pieces)
    assert _payload(arrays)[:64] not in frame  # the payload is not in the clear
    h2, payload = serde.decode(frame, NS, KEY, key)
    assert bytes(payload) == _payload(arrays)
    with pytest.raises(serde.FrameError, match="wrong key"):
        serde.decode(frame, NS, KEY, os.urandom(32))
    with pytest.raises(serde.FrameError, match="no key"):
        serde.decode(frame, NS, KEY, None)
    plain = b"".join(serde.encode(h, _payload(arrays)))
    with pytest.raises(serde.FrameError, match="requires encryption"):
        serde.decode(plain, NS, KEY, key)


def test_header_is_authenticated(arrays):
    """Changing the header (and fixing the checksum) still fails: the header is GCM's associated data."""
    require("cryptography")
    key = os.urandom(32)
    frame = bytearray(b"".join(serde.encode(_header(arrays), _payload(arrays), key)))
    hlen = int.from_bytes(frame[8:12], "little")
    i = frame.index(b'"bits":4', serde.PREFIX_SIZE, serde.PREFIX_SIZE + hlen)
    frame[i + 7:i + 8] = b"2"
    ck = serde._Checksum(frame[6])
    ck.update(bytes(frame[:-8]))
    frame[-8:] = ck.digest()
    with pytest.raises(serde.FrameError, match="wrong key or tampered"):
        serde.decode(bytes(frame), NS, KEY, key)


def test_bad_arguments(arrays):
    with pytest.raises(ValueError, match="payload holds"):
        serde.encode(_header(arrays), b"short")
    with pytest.raises(ValueError, match="32 bytes"):
        serde.check_key(b"short")
    with pytest.raises(TypeError, match="32 bytes"):
        serde.check_key("a string key")
