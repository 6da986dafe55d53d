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
from lmcache.backends.base import host_dtype
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


@pytest.mark.parametrize("peek", [1 << 16, 16])
def test_remote_tier_reads_large_runs_from_the_socket(server, rng, peek):
    """Parts received straight into the destination (part 0 after a header peek), exactly;
    a peek too short for the header takes the buffered path."""
    t = RemoteTier(server.url + "?part=40KiB&connections=2")
    t.PEEK = peek
    arrays = [rng.standard_normal((1, 2, 256, 64)).astype(np.float16) for _ in range(3)]
    h = serde.Header(NS, b"L" * 32, [serde.Segment(a.dtype.name, a.shape) for a in arrays], {"v": 1})
    payload = b"".join(a.tobytes() for a in arrays)
    t.put(b"L" * 32, h, payload)
    dest = [np.zeros_like(a) for a in arrays]
    runs = [memoryview(d[0, i]).cast("B") for d in dest for i in range(2)]  # 32 KiB per head
    got = t.read_into(b"L" * 32, NS, tuple(h.segments), runs)
    assert got is not False and got.key == b"L" * 32
    assert all(np.array_equal(a, d) for a, d in zip(arrays, dest))
    assert t.read_into(b"M" * 32, NS, tuple(h.segments), runs) is None
    with pytest.raises(serde.FrameError):  # another namespace's reader
        t.read_into(b"L" * 32, b"o" * 32, tuple(h.segments), runs)
    t.close()


def test_remote_tier_over_a_unix_socket(tmp_path, rng):
    require("redis")
    require_server()
    sock = str(tmp_path / "s")
    with RedisServer(extra=["--unixsocket", sock, "--unixsocketperm", "700"]):
        t = RemoteTier(f"unix://{sock}?part=1KiB")
        h, _, payload = _chunk(rng, b"u" * 32)
        t.put(b"u" * 32, h, payload)
        assert bytes(t.get(b"u" * 32, NS)[1]) == payload
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


# ----------------------------------------------------------------------------- backend host hooks
def _segments(rng, be, dtypes=("float16",)):
    """A chunk as the store exports it: token slices of [1, H, T, D] arrays (codes, scales, plain)."""
    out = []
    for dt in dtypes:
        full = rng.standard_normal((1, 3, 40, 8)).astype(np.float32)
        out.append(be.from_numpy(full, dt)[:, :, 8:24])  # one run per head, strided
        codes = rng.integers(0, 255, (1, 3, 40, 4), dtype=np.uint8)
        out.append(be.from_numpy(codes)[:, :, 8:24])
        out.append(be.from_numpy(rng.standard_normal((1, 3, 2, 8)).astype(np.float32), dt))  # contiguous
    return out


def _bytes(be, arrays) -> bytes:
    """The reference payload: each array's bytes, C order, back to back."""
    out = b""
    for a in arrays:
        if isinstance(a, np.ndarray):
            out += np.ascontiguousarray(a).tobytes()
        else:
            h = be.to_numpy(be.cast(a, "float32") if be.dtype_name(a) == "bfloat16" else a)
            out += np.ascontiguousarray(h.astype(host_dtype(be.dtype_name(a)))).tobytes()
    return out


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_backend_host_hooks_round_trip(name, rng):
    """pack_to_host / unpack_from_host / copy_*_host / pack_on_device move the exact bytes, on CPU arrays."""
    if name == "torch":
        require("torch")
    be = get_backend(name, "cpu")
    dtypes = ("float16", "bfloat16") if name == "torch" else ("float16", "float32")
    arrays = _segments(rng, be, dtypes)
    ref = _bytes(be, arrays)
    assert not be.pins_host_memory() or name != "numpy"
    pool = be.host_buffer(len(ref) + 64)
    assert pool.dtype == np.uint8 and pool.shape == (len(ref) + 64,) and not pool.any()
    span = pool[64:]
    be.pack_to_host(arrays, span)
    be.synchronize()
    assert span.tobytes() == ref
    with pytest.raises(ValueError, match="bytes"):  # a destination of the wrong size is refused
        be.pack_to_host(arrays, pool[1:])
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="nbytes"):
            be.host_buffer(bad)

    # Into two chunks' places of fresh destinations, the second chunk at token 16 of each.
    segs = [(be.dtype_name(a), tuple(a.shape)) for a in arrays]
    dests = [be.empty((*s[:2], 2 * s[2], *s[3:]), dt, "cpu") for dt, s in segs]
    dests = be.unpack_from_host(span, segs, dests, [s[2] for _, s in segs], 2)
    be.synchronize()
    back = [d[:, :, s[2]:] for d, (_, s) in zip(dests, segs)]
    assert _bytes(be, back) == ref

    # One array at a time.
    for a in arrays:
        h = np.empty(tuple(a.shape), host_dtype(be.dtype_name(a)))
        be.copy_to_host(a, h)
        d2 = be.copy_from_host(be.empty(tuple(a.shape), be.dtype_name(a), "cpu"), 0, h, 2)
        be.synchronize()
        assert _bytes(be, [h]) == _bytes(be, [a]) == _bytes(be, [d2])

    # The device tier's private copy: views of it give the bytes back, whatever the source does next.
    packed = be.pack_on_device(arrays)
    got = be.unpack_on_device(packed, segs)
    assert [be.dtype_name(g) for g in got] == [dt for dt, _ in segs]
    assert [tuple(g.shape) for g in got] == [s for _, s in segs]
    arrays[0][...] = 0
    assert _bytes(be, got) == ref


def test_torch_pack_into_gathers_by_period(rng):
    """The torch gather: one cat per recurring segment kind, exact bytes for odd layouts too."""
    torch = require("torch")
    from lmcache.backends.torch.backend import pack_into

    big = torch.from_numpy(rng.standard_normal((1, 4, 64, 16)).astype(np.float16))
    codes = torch.from_numpy(rng.integers(0, 255, (2, 4, 64, 5), dtype=np.uint8))
    cases = [
        [big[:, :, i:i + 8] for i in range(0, 64, 8)],  # full precision: one kind, one cat
        [x for i in range(3) for x in (codes[:1, :, i:i + 8], big[:, :, i:i + 2], big[:, :, 9:11])],  # period 3
        [codes[:, :, :3], big[:, :, :2]] * 2,  # batch 2, and float16 at odd offsets (byte copies)
        [big[:, :, :8], codes[0, 1:3, 5:9, ::2], big[0, 1:3, 5:9, ::2]],  # no period
        [torch.arange(10, dtype=torch.float16).view(2, 5).t(), big[:, :, 3:7]],  # a transposed array
    ]
    for arrays in cases:
        n = sum(a.numel() * a.element_size() for a in arrays)
        out = torch.full((n + 1,), 7, dtype=torch.uint8)
        pack_into(arrays, out[1:])  # at an odd offset of its buffer
        assert out[0] == 7
        assert out[1:].numpy().tobytes() == b"".join(a.contiguous().numpy().tobytes() for a in arrays)
        with pytest.raises(ValueError, match="bytes"):
            pack_into(arrays, out)


def test_torch_unpack_into_one_buffer(rng):
    """Destinations from empty_many (one buffer) are filled by one copy per segment kind, exactly."""
    torch = require("torch")
    be = get_backend("torch", "cpu")
    big = torch.from_numpy(rng.standard_normal((1, 4, 64, 16)).astype(np.float16))
    codes = torch.from_numpy(rng.integers(0, 255, (1, 4, 64, 5), dtype=np.uint8))
    for arrays in ([big[:, :, i:i + 8] for i in range(0, 64, 8)],
                   [x for i in range(3) for x in (codes[:, :, i:i + 8], big[:, :, i:i + 2], big[:, :, 9:11])]):
        segs = [(be.dtype_name(a), tuple(a.shape)) for a in arrays]
        src = np.frombuffer(b"".join(a.contiguous().numpy().tobytes() for a in arrays), np.uint8)
        dests = be.empty_many([((*s[:2], 3 * s[2], *s[3:]), dt) for dt, s in segs], "cpu")
        assert len({d.untyped_storage().data_ptr() for d in dests}) == 1
        for d in dests:
            d.zero_()
        be.unpack_from_host(src, segs, dests, [s[2] for _, s in segs], 2)
        for a, d, (_, s) in zip(arrays, dests, segs):
            assert torch.equal(d[:, :, s[2]:2 * s[2]], a)
            assert not d[:, :, :s[2]].any() and not d[:, :, 2 * s[2]:].any()  # nothing else written


def test_host_and_device_tiers_take_torch_tensors(rng):
    """Backend arrays go into the host pool with one pack per chunk and come back exactly."""
    require("torch")
    be = get_backend("torch", "cpu")
    arrays = _segments(rng, be, ("float16", "bfloat16"))
    ref = _bytes(be, arrays)
    h = serde.Header(NS, b"t" * 32, [serde.Segment(be.dtype_name(a), tuple(a.shape)) for a in arrays], {"v": 1})
    host = HostTier(4 * len(ref))
    host._ensure(be)
    host.put(b"t" * 32, h, arrays, be)
    host.settle()
    assert bytes(host.payload(b"t" * 32)) == ref and not host.pinned
    dev = DeviceTier(1 << 20)
    dev.put(b"t" * 32, h, arrays, be)
    arrays[1][...] = 0
    got = dev.get(b"t" * 32)[1]
    assert all(be.is_array(g) for g in got) and _bytes(be, got) == ref
    owner, entry = dev.packed(b"t" * 32)
    segs = [(s.dtype, s.shape) for s in h.segments]
    dests = be.empty_many([((*s[:2], 2 * s[2], *s[3:]), dt) for dt, s in segs], "cpu")
    dests = owner.unpack_packed(entry, segs, dests, [s[2] for _, s in segs], 2)
    assert _bytes(be, [d[:, :, s[2]:] for d, (_, s) in zip(dests, segs)]) == ref
    host.close()
    dev.close()


@pytest.mark.cuda
def test_host_hooks_and_store_on_gpu(rng):
    """CUDA tensors: pinned pool, one device-to-host copy per chunk, and a Store round trip, bit for bit."""
    torch = require("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    import lmcache
    from lmcache.store import Store, export_chunk

    be = get_backend("torch", "cuda")
    assert be.pins_host_memory()
    arrays = [a.cuda() for a in _segments(rng, get_backend("torch", "cpu"), ("float16", "bfloat16"))]
    ref = _bytes(be, arrays)
    pool = be.host_buffer(len(ref))
    assert torch.from_numpy(pool).is_pinned()
    be.pack_to_host(arrays, pool)
    be.synchronize()
    assert pool.tobytes() == ref
    segs = [(be.dtype_name(a), tuple(a.shape)) for a in arrays]
    dests = [be.empty(s, dt, "cuda") for dt, s in segs]
    be.unpack_from_host(pool, segs, dests, [0] * len(segs), 2)
    be.synchronize()
    assert _bytes(be, dests) == ref
    packed = be.pack_on_device(arrays)
    assert packed.is_cuda and _bytes(be, be.unpack_on_device(packed, segs)) == ref

    for bits in (None, 4):
        cache = lmcache.Cache(backend="torch", device="cuda", bits=bits, group_size=32, residual=32)
        ids = rng.integers(0, 1000, 256)
        for i in range(3):
            k = torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
            cache.update(i, k, -k)
        for tiers in (("device:1MB", "host:64MB"), ("host:64MB",)):
            st = Store(*tiers, chunk_size=64, namespace="gpu", backend=be)
            assert st.put(ids, cache) == 256
            assert st.stats()["tiers"]["host"]["pinned"]
            c2 = lmcache.Cache(backend="torch", device="cuda", bits=bits, group_size=32, residual=32)
            assert st.get(ids, c2) == 256
            for j in range(4):
                for p, q in zip(export_chunk(cache, j * 64, (j + 1) * 64), export_chunk(c2, j * 64, (j + 1) * 64)):
                    assert q.is_cuda and torch.equal(p, q)
            st.close()
