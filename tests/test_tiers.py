"""The tiers on their own: sizes, the host pool, disk files, a real Redis-protocol server."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from conftest import require
from redis_server import RedisServer, require_server, server_fixture, small_tmpfs

from lmcache import serde
from lmcache.backends import get_backend
from lmcache.tiers import DeviceTier, DiskTier, HostTier, RemoteTier, TierError, _Pool, make_tier, parse_size

NS = b"n" * 32


def _chunk(rng, key=b"k" * 32, n=4096):
    arrays = [rng.integers(0, 255, (1, 2, n // 64, 32), dtype=np.uint8),
              rng.standard_normal((1, 2, 4, 32)).astype(np.float16)]
    header = serde.Header(NS, key, [serde.Segment(a.dtype.name, a.shape) for a in arrays], {"v": 1})
    payload = b"".join(a.tobytes() for a in arrays)
    return header, arrays, payload


def test_parse_size():
    assert parse_size("16GB") == 16 * 10**9
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1.5k") == 1536
    assert parse_size(100) == 100
    for bad in ("", "-1GB", "12 parsecs", 0, True):
        with pytest.raises(ValueError, match="capacity"):
            parse_size(bad)


def test_make_tier_rejects_bad_specs(tmp_path):
    for bad in ("host", "host:lots", "disk:5GB", "tape:/x:1GB", "ftp://x"):
        with pytest.raises(ValueError):
            make_tier(bad)
    with pytest.raises(TypeError):
        make_tier(42)
    assert isinstance(make_tier(f"disk:{tmp_path}:1MB"), DiskTier)


def test_pool_allocates_and_merges():
    p = _Pool(1024)
    a, b, c = p.alloc(100), p.alloc(100), p.alloc(100)
    assert (a, b, c) == (0, 128, 256)
    assert p.alloc(1024) is None
    p.release(b, 100)
    p.release(a, 100)
    assert p.alloc(256) == 0  # the two freed neighbours merged
    p.release(0, 256)
    p.release(c, 100)
    assert p.free == [[0, 1024]]


def test_host_tier(rng):
    t = HostTier(20000)
    h, arrays, payload = _chunk(rng)
    t.put(b"a" * 32, h, arrays)
    buf = t._buf
    got_h, got = t.get(b"a" * 32)
    assert all(np.array_equal(x, y) for x, y in zip(arrays, got))
    assert bytes(t.payload(b"a" * 32)) == payload
    t.put(b"b" * 32, h, payload)  # a packed payload works too
    assert t._buf is buf  # one pool, allocated once
    assert t.used == 2 * h.payload_nbytes
    with pytest.raises(TierError, match="no free span"):
        for i in range(10):
            t.put(bytes([i]) * 32, h, arrays)
    t.remove(b"a" * 32)
    assert not t.has(b"a" * 32) and t.has(b"b" * 32)
    t.close()
    assert t._buf is None and t.used == 0


def test_device_tier_keeps_private_copies(rng):
    be = get_backend("numpy")
    t = DeviceTier(1 << 20)
    h, arrays, _ = _chunk(rng)
    t.put(b"a" * 32, h, arrays, be)
    arrays[0][...] = 0
    assert t.get(b"a" * 32)[1][0].any()
    assert t.remove(b"a" * 32) == h.payload_nbytes and t.used == 0


def test_disk_tier_round_trip_and_atomic_names(tmp_path, rng):
    t = DiskTier(str(tmp_path), 1 << 20)
    h, arrays, payload = _chunk(rng, b"a" * 32)
    t.put(b"a" * 32, h, payload)
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert len(files) == 1 and files[0].endswith(".lmkv")  # no temporary left behind
    got_h, got = t.get(b"a" * 32, NS)
    assert bytes(got) == payload
    assert t.get(b"z" * 32, NS) is None
    again = DiskTier(str(tmp_path), 1 << 20)  # a new process finds the entry
    assert again.knows(b"a" * 32) and again.used == t.used


@pytest.mark.parametrize("damage", ["flip", "truncate", "namespace"])
def test_disk_tier_damaged_entries_raise(tmp_path, rng, damage):
    t = DiskTier(str(tmp_path), 1 << 20)
    h, _, payload = _chunk(rng)
    if damage == "namespace":
        h = serde.Header(b"o" * 32, h.key, h.segments, h.layout)
    t.put(b"k" * 32, h, payload)
    path = t.file(b"k" * 32)
    data = bytearray(open(path, "rb").read())
    if damage == "flip":
        data[len(data) // 2] ^= 1
    elif damage == "truncate":
        data = data[:len(data) // 2]
    open(path, "wb").write(bytes(data))
    with pytest.raises(serde.FrameError):
        t.get(b"k" * 32, NS)


def test_disk_tier_full_filesystem_raises_oserror(tmp_path, rng):
    mnt = tmp_path / "small"
    mnt.mkdir()
    umount = small_tmpfs(mnt, "64k")
    try:
        t = DiskTier(str(mnt), 1 << 30)
        h, _, payload = _chunk(rng, n=8192)
        with pytest.raises(OSError):
            for i in range(64):
                t.put(bytes([i]) * 32, h, payload)
        assert not [f for d, _, fs in os.walk(mnt) for f in fs if f.endswith(".tmp")]
    finally:
        umount()


server = pytest.fixture(scope="module", name="server")(server_fixture)


def test_remote_tier_round_trip_in_parts(server, rng):
    t = RemoteTier(server.url + "?part=1KiB&connections=3")
    h, _, payload = _chunk(rng, b"r" * 32)
    t.put(b"r" * 32, h, payload)
    assert t.has(b"r" * 32) and t.has_many([b"r" * 32, b"q" * 32]) == [True, False]
    assert bytes(t.get(b"r" * 32, NS)[1]) == payload
    assert t.get(b"q" * 32, NS) is None
    import redis

    r = redis.Redis.from_url(server.url)
    r.delete(t._k(b"r" * 32, 2))  # a part lost (evicted by the server): a short frame
    with pytest.raises(serde.FrameError):
        t.get(b"r" * 32, NS)
    t.remove(b"r" * 32)
    assert not t.has(b"r" * 32)
    t.close()


def test_remote_tier_corrupt_lengths_are_frame_errors(server, rng):
    # A corrupt length field in part 0 must not size the reader's buffer (MemoryError or
    # ValueError raised into the store): it is a FrameError, which the store counts as a miss.
    import redis

    key = b"c" * 32
    t = RemoteTier(server.url + "?part=1KiB")
    h, _, payload = _chunk(rng, key)
    t.put(key, h, payload)
    r = redis.Redis.from_url(server.url)
    v = bytearray(r.get(t._k(key, 0)))
    v[12:20] = (1 << 62).to_bytes(8, "little")  # the payload length of the prefix
    r.set(t._k(key, 0), bytes(v))
    with pytest.raises(serde.FrameError, match="length"):
        t.get(key, NS)
    r.set(t._k(key, 0), b"a value of some other program, not a frame")
    with pytest.raises(serde.FrameError, match="magic"):
        t.get(key, NS)
    t.remove(key)
    t.close()


def test_remote_tier_full_server_raises(rng):
    require("redis")
    require_server()
    with RedisServer(extra=["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]) as s:
        t = RemoteTier(s.url)
        h, _, payload = _chunk(rng, n=1 << 18)
        with pytest.raises(TierError, match="OOM|memory"):
            for i in range(64):
                t.put(bytes([i]) * 32, h, payload)
        assert t.available()  # a refusal is not an outage
        t.close()


def test_remote_tier_outage_and_reconnect(rng):
    require("redis")
    require_server()
    s = RedisServer().start()
    try:
        t = RemoteTier(s.url + "?timeout=0.5")
        h, _, payload = _chunk(rng, b"b" * 32)
        t.put(b"a" * 32, h, payload)
        s.stop(kill=True)
        with pytest.raises(TierError):
            t.get(b"a" * 32, NS)
        assert not t.available()
        with pytest.raises(TierError, match="unavailable"):  # fails at once during the backoff
            t.put(b"b" * 32, h, payload)
        s = RedisServer(port=s.port).start()
        deadline = time.monotonic() + 10
        while not t.available() and time.monotonic() < deadline:
            time.sleep(0.05)
        t.put(b"b" * 32, h, payload)  # reconnected by itself
        assert bytes(t.get(b"b" * 32, NS)[1]) == payload
        t.close()
    finally:
        s.stop()


def test_remote_tier_on_a_redis_cluster(rng):
    require("redis")
    require_server()
    with RedisServer(cluster=True) as s:
        t = RemoteTier(f"redis+cluster://127.0.0.1:{s.port}?part=1KiB")
        h, _, payload = _chunk(rng, b"c" * 32)
        t.put(b"c" * 32, h, payload)  # parts land on different hash slots
        assert t.has_many([b"c" * 32, b"d" * 32]) == [True, False]
        assert bytes(t.get(b"c" * 32, NS)[1]) == payload
        t.remove(b"c" * 32)
        assert not t.has(b"c" * 32)
        t.close()
