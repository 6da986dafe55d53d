"""The Store: prefix hashing, round trips through every tier, placement, and failures.

Real components only: a real redis/valkey server process, real files, a real small tmpfs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import require, test_backends
from redis_server import RedisServer, require_server, server_fixture, small_tmpfs

import lmcache
from lmcache.plan import QuantPlan
from lmcache.store import Store, chunk_keys, export_chunk, namespace_id

C = 64  # chunk_size in these tests (a multiple of group_size 32)
L, H, D = 2, 2, 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cache(seed=0, T=300, bits=4, **kw):
    """A numpy cache of L layers filled with T tokens; returns (cache, token_ids, kv)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 32000, T)
    kv = [(rng.standard_normal((1, H, T, D)).astype(np.float16),
           rng.standard_normal((1, H, T, D)).astype(np.float16)) for _ in range(L)]
    kw = {"group_size": 32, "residual": 64, **kw}
    c = lmcache.Cache(backend="numpy", bits=bits, **kw)
    for i in range(L):
        c.update(i, *kv[i])
    return c, ids, kv


def _fresh(bits=4, **kw):
    return lmcache.Cache(backend="numpy", bits=bits, **{"group_size": 32, "residual": 64, **kw})


def _same_chunks(a, b, n):
    for i in range(n // C):
        xa, xb = export_chunk(a, i * C, (i + 1) * C), export_chunk(b, i * C, (i + 1) * C)
        assert len(xa) == len(xb)
        for p, q in zip(xa, xb):
            assert p.dtype == q.dtype and np.array_equal(p, q)


# ----------------------------------------------------------------------------- hashing
def test_chunk_keys_follow_the_formula():
    ids = list(range(200))
    ns = namespace_id("model-x", "tenant-a")
    keys = chunk_keys(ids, 64, ns)
    assert len(keys) == 3
    prev = bytes(32)
    for i, k in enumerate(keys):
        prev = hashlib.sha256(prev + np.arange(i * 64, (i + 1) * 64, dtype="<i8").tobytes() + ns).digest()
        assert k == prev
    assert chunk_keys(np.array(ids, dtype=np.int32), 64, ns) == keys  # any integer dtype, same key


def test_chunk_keys_are_the_same_in_another_process():
    ids = list(range(1000, 1300))
    mine = [k.hex() for k in chunk_keys(ids, 64, namespace_id("m", "t"))]
    code = ("from lmcache.store import chunk_keys, namespace_id; "
            "print(' '.join(k.hex() for k in chunk_keys(list(range(1000, 1300)), 64, namespace_id('m', 't'))))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == mine


def test_namespaces_and_tenants_are_separate(tmp_path):
    c, ids, _ = _cache()
    a = Store(f"disk:{tmp_path}:100MB", chunk_size=C, namespace="model-a")
    a.put(ids, c)
    assert a.flush(10)
    for other in (Store(f"disk:{tmp_path}:100MB", chunk_size=C, namespace="model-b"),
                  Store(f"disk:{tmp_path}:100MB", chunk_size=C, namespace="model-a", tenant="someone")):
        assert other.lookup(ids) == 0
        assert other.get(ids, _fresh()) == 0
        other.close()
    assert a.lookup(ids) == 4 * C
    a.close()


# ----------------------------------------------------------------------------- round trips
_MIXED = QuantPlan([[2, 4], [8, None]], [[4, 8], [None, 2]])  # head groups of different bits per layer


@pytest.mark.parametrize("cfg", [dict(bits=4), dict(bits=2), dict(bits=8), dict(bits=None),
                                 dict(bits=4, rotate=True), dict(bits=4, plan=_MIXED)])
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_round_trip_is_exact(tmp_path, cfg, tier):
    spec = "host:10MB" if tier == "host" else f"disk:{tmp_path}:100MB"
    st = Store(spec, chunk_size=C, namespace="m")
    c, ids, kv = _cache(**cfg)
    assert st.put(ids, c) == 4 * C
    st.flush()
    c2 = _fresh(**cfg)
    assert st.get(ids, c2) == 4 * C
    _same_chunks(c, c2, 4 * C)
    n = 4 * C
    for i in range(L):  # the caller then adds the rest
        k, v = c2.update(i, kv[i][0][:, :, n:], kv[i][1][:, :, n:])
        assert k.shape == (1, H, 300, D)
    assert c2.seq_len(0) == 300
    if cfg.get("bits") is not None:  # 4-bit caches store 4-bit bytes
        assert st.stats()["tiers"][st.tiers[0].name]["put_bytes"] < c.dense_nbytes() // 2
    st.close()


@pytest.mark.parametrize("copy_threads", [1, 3])
def test_host_copies_on_the_caller_or_on_threads(copy_threads):
    """Chunks copied into and out of the host pool on the caller's thread or on copy threads, exactly."""
    st = Store("host:10MB", chunk_size=C, namespace="m", copy_threads=copy_threads)
    c, ids, _ = _cache(bits=None)
    assert st.put(ids, c) == 4 * C
    c2 = _fresh(bits=None)
    assert st.get(ids, c2) == 4 * C
    _same_chunks(c, c2, 4 * C)
    assert (st._copy_pool is None) == (copy_threads == 1)
    st.close()


def test_cache_with_store_loads_the_prefix_on_first_update():
    st = Store("host:10MB", chunk_size=C, namespace="m")
    c, ids, kv = _cache(T=256)
    st.put(ids, c)
    c2 = lmcache.Cache(bits=4, group_size=32, residual=64, store=st)  # backend "auto"
    n = c2.set_prompt(ids)
    assert n == 3 * C  # whole chunks, at least one token left for the model
    assert c2.num_layers == 0  # loaded on the first update, on that array's backend
    outs = [c2.update(i, kv[i][0][:, :, n:], kv[i][1][:, :, n:]) for i in range(L)]
    assert c2.seq_len(0) == 256 and outs[0][0].shape == (1, H, 256, D)
    _same_chunks(c, c2, n)
    assert lmcache.Cache(bits=4, group_size=32, residual=64).set_prompt(ids) == 0  # no store
    st.close()


def test_a_cache_of_another_layout_misses():
    st = Store("host:10MB", chunk_size=C, namespace="m")
    c, ids, _ = _cache(bits=4)
    st.put(ids, c)
    assert st.lookup(ids) == 4 * C
    assert st.get(ids, _fresh(bits=2)) == 0
    assert st.get(ids, _fresh(bits=4, group_size=64)) == 0
    assert st.stats()["layout_misses"] == 2
    st.close()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="namespace"):
        Store("host:1MB")
    with pytest.raises(ValueError, match="chunk_size"):
        Store("host:1MB", namespace="m", chunk_size=0)
    with pytest.raises(ValueError, match="once"):
        Store("host:1MB", "host:2MB", namespace="m")
    with pytest.raises(ValueError, match="at least one tier"):
        Store(namespace="m")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="copy_threads"):
            Store("host:1MB", namespace="m", copy_threads=bad)
    st = Store("host:1MB", namespace="m", chunk_size=48)
    c, ids, _ = _cache()
    with pytest.raises(ValueError, match="multiple of the cache's group_size"):
        st.put(ids, c)
    with pytest.raises(ValueError, match="empty cache"):
        st.get(ids, c)
    with pytest.raises(TypeError, match="lmcache.Cache"):
        st.put(ids, "not a cache")
    with pytest.raises(ValueError, match="1-D"):
        st.lookup(np.zeros((2, 3), int))
    with pytest.raises(TypeError, match="store"):
        lmcache.Cache(store="host:1MB")
    st.close()
    with pytest.raises(ValueError, match="closed"):
        st.lookup(ids)


# ----------------------------------------------------------------------------- placement
def test_full_tiers_move_chunks_down_and_hits_move_them_up(tmp_path):
    c, ids, _ = _cache(T=320)
    chunk = len(b"".join(a.tobytes() for a in export_chunk(c, 0, C)))
    st = Store(f"host:{int(chunk * 2.5)}", f"disk:{tmp_path}:100MB", chunk_size=C, namespace="m")
    st.put(ids, c)
    st.flush()
    s = st.stats()["tiers"]
    host, disk = s["host"], s[st.tiers[1].name]
    assert host["entries"] == 2 and disk["entries"] == 3
    assert host["migrations_out"] == 3 and disk["migrations_in"] == 3 and disk["puts"] == 3
    c2 = _fresh()
    assert st.get(ids, c2) == 5 * C
    _same_chunks(c, c2, 5 * C)
    s = st.stats()["tiers"]
    assert s[st.tiers[1].name]["hits"] >= 3  # read from disk...
    assert s["host"]["migrations_in"] >= 3  # ...and moved up
    st.close()


def test_the_last_tier_drops_its_least_valuable_chunks(tmp_path):
    c, ids, _ = _cache(T=320)
    chunk = len(b"".join(a.tobytes() for a in export_chunk(c, 0, C)))
    st = Store(f"host:{int(chunk * 2.5)}", chunk_size=C, namespace="m")
    st.get(ids[:C], _fresh())  # nothing there yet
    st.put(ids[:2 * C], c)
    st.get(ids[:C], _fresh())  # chunk 0 is now worth more than chunk 1
    st.put(ids, c)
    s = st.stats()["tiers"]["host"]
    assert s["evictions"] == 3 and s["entries"] == 2
    assert st.lookup(ids) == C  # chunk 0 (hit) kept, chunk 1 dropped
    assert st.stats()["misses"] >= 1
    st.close()


# ----------------------------------------------------------------------------- failures: disk
def _disk_store(path, **kw):
    return Store(f"disk:{path}:100MB", chunk_size=C, namespace="m", **kw)


@pytest.mark.parametrize("damage", ["flip", "truncate", "other-namespace", "empty"])
def test_damaged_disk_entries_are_misses(tmp_path, damage, caplog):
    c, ids, _ = _cache()
    st = _disk_store(tmp_path)
    st.put(ids, c)
    st.flush()
    path = st.tiers[0].file(st.keys(ids)[1])
    data = bytearray(open(path, "rb").read())
    if damage == "flip":
        data[-100] ^= 4
    elif damage == "truncate":
        data = data[:-10]
    elif damage == "empty":
        data = b""
    else:  # chunk 1 of another namespace, copied under this chunk's name
        other = Store(f"disk:{tmp_path}/o:100MB", chunk_size=C, namespace="other")
        other.put(ids, c)
        other.flush()
        data = open(other.tiers[0].file(other.keys(ids)[1]), "rb").read()
        other.close()
    open(path, "wb").write(bytes(data))
    c2 = _fresh()
    with caplog.at_level(logging.WARNING, logger="lmcache.store"):
        assert st.get(ids, c2) == C  # chunk 0 only: the damaged chunk ends the prefix
    _same_chunks(c, c2, C)
    assert st.stats()["errors"] >= 1 and "bad entry" in caplog.text
    st.close()


def test_wrong_encryption_key_is_a_miss(tmp_path):
    require("cryptography")
    c, ids, _ = _cache()
    k1, k2 = os.urandom(32), os.urandom(32)
    a = _disk_store(tmp_path, key=k1)
    a.put(ids, c)
    a.flush()
    raw = open(a.tiers[0].file(a.keys(ids)[0]), "rb").read()
    assert export_chunk(c, 0, C)[0].tobytes()[:256] not in raw  # encrypted on disk
    for other in (_disk_store(tmp_path, key=k2), _disk_store(tmp_path)):
        assert other.get(ids, _fresh()) == 0
        other.close()
    b = _disk_store(tmp_path, key=k1)
    c2 = _fresh()
    assert b.get(ids, c2) == 4 * C
    _same_chunks(c, c2, 4 * C)
    a.close()
    b.close()


def test_full_disk_fails_puts_without_raising(tmp_path, caplog):
    mnt = tmp_path / "small"
    mnt.mkdir()
    umount = small_tmpfs(mnt, "64k")
    try:
        c, ids, _ = _cache(T=1100)
        st = _disk_store(mnt)
        with caplog.at_level(logging.WARNING, logger="lmcache.store"):
            st.put(ids, c)  # does not raise
            st.flush()
        s = st.stats()
        assert s["put_failures"] >= 1 and s["errors"] >= 1
        assert "No space left" in caplog.text
        n = st.get(ids, _fresh())
        assert 0 < n < len(ids)  # what fitted is there and whole
        st.close()
    finally:
        umount()


# ----------------------------------------------------------------------------- failures: remote
server = pytest.fixture(scope="module", name="server")(server_fixture)


def test_remote_round_trip_and_corrupt_entries(server):
    require("redis")
    import redis

    c, ids, _ = _cache(seed=5)
    st = Store(server.url + "?part=8KiB", chunk_size=C, namespace="m-remote")
    st.put(ids, c)
    st.flush()
    assert st.lookup(ids) == 4 * C
    c2 = _fresh()
    assert st.get(ids, c2) == 4 * C
    _same_chunks(c, c2, 4 * C)
    r = redis.Redis.from_url(server.url)
    k2 = st.tiers[0]._k(st.keys(ids)[2], 0)
    v = bytearray(r.get(k2))
    v[len(v) // 2] ^= 1
    r.set(k2, bytes(v))
    r.delete(st.tiers[0]._k(st.keys(ids)[1], 1))  # a lost part
    assert st.get(ids, _fresh()) == C
    assert st.stats()["errors"] >= 1
    st.close()


def test_remote_hits_read_in_place_move_up_to_disk(server, tmp_path):
    # Chunks read from remote straight into the destination are promoted to disk from a
    # packed copy: no failed background write, and every chunk then sits on disk too.
    c, ids, _ = _cache(seed=9)
    a = Store(server.url + "?part=8KiB", chunk_size=C, namespace="m-up")
    a.put(ids, c)
    a.flush()
    a.close()
    b = Store(f"disk:{tmp_path}:1GB", server.url + "?part=8KiB", chunk_size=C, namespace="m-up")
    c2 = _fresh()
    assert b.get(ids, c2) == 4 * C
    _same_chunks(c, c2, 4 * C)
    assert b.flush(timeout=30)
    s = b.stats()
    assert s["put_failures"] == 0 and s["errors"] == 0
    assert all(b.tiers[0].has(k) for k in b.keys(ids))
    c3 = _fresh()
    assert b.get(ids, c3) == 4 * C  # now from disk
    _same_chunks(c, c3, 4 * C)
    b.close()


def test_remote_wrong_key_is_a_miss(server):
    require("cryptography")
    c, ids, _ = _cache(seed=6)
    a = Store(server.url, chunk_size=C, namespace="m-enc", key=os.urandom(32))
    a.put(ids, c)
    a.flush()
    b = Store(server.url, chunk_size=C, namespace="m-enc", key=os.urandom(32))
    assert b.lookup(ids) == 4 * C and b.get(ids, _fresh()) == 0
    a.close()
    b.close()


def test_failed_remote_puts_are_counted_and_logged(caplog):
    require("redis")
    require_server()
    with RedisServer(extra=["--maxmemory", "1mb", "--maxmemory-policy", "noeviction"]) as s:
        c, ids, _ = _cache(T=2000)
        st = Store(s.url, chunk_size=C, namespace="m")
        with caplog.at_level(logging.WARNING, logger="lmcache.store"):
            st.put(ids, c)
            st.flush()
        stats = st.stats()
        assert stats["put_failures"] >= 1 and stats["errors"] >= 1
        assert "could not be written" in caplog.text
        st.close()


def test_server_killed_mid_run_then_back(caplog):
    require("redis")
    require_server()
    srv = RedisServer().start()
    try:
        c, ids, _ = _cache(seed=7)
        st = Store(srv.url + "?timeout=0.5", chunk_size=C, namespace="m")
        st.put(ids[:2 * C], c)
        st.flush()
        srv.stop(kill=True)
        assert st.get(ids, _fresh()) == 0  # misses, not errors raised into the caller
        st.put(ids, c)
        assert st.flush(timeout=30)  # bounded: every write fails fast while the server is down
        s = st.stats()
        assert s["put_failures"] >= 1 and s["errors"] >= 1
        srv = RedisServer(port=srv.port).start()
        deadline = time.monotonic() + 10
        while st.get(ids, c2 := _fresh()) == 0 and time.monotonic() < deadline:  # reconnects by itself
            st.put(ids, c)
            st.flush()
            time.sleep(0.1)
        st.put(ids, c)
        st.flush()
        c2 = _fresh()
        assert st.get(ids, c2) == 4 * C
        _same_chunks(c, c2, 4 * C)
        srv.stop(kill=True)
        st.put(_cache(seed=8)[1], _cache(seed=8)[0])  # writes queued for a server that is gone
        t0 = time.monotonic()
        st.close()
        assert time.monotonic() - t0 < 2.5  # the contract is 2 s; a little slack for a loaded machine
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- two processes
_WORKER = textwrap.dedent("""
    import sys, numpy as np, lmcache
    from lmcache.store import Store, export_chunk
    spec, who = sys.argv[1], int(sys.argv[2])
    st = Store(spec, chunk_size=64, namespace="shared")
    bad = reads = 0
    for it in range(12):
        seed = (it + who) % 3
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, 32000, 320)
        c = lmcache.Cache(backend="numpy", bits=4, group_size=32, residual=64)
        for i in range(2):
            c.update(i, rng.standard_normal((1, 2, 320, 32)).astype(np.float16),
                     rng.standard_normal((1, 2, 320, 32)).astype(np.float16))
        st.put(ids, c)
        c2 = lmcache.Cache(backend="numpy", bits=4, group_size=32, residual=64)
        n = st.get(ids, c2)
        reads += n // 64
        for j in range(n // 64):
            for p, q in zip(export_chunk(c, j * 64, (j + 1) * 64), export_chunk(c2, j * 64, (j + 1) * 64)):
                bad += not np.array_equal(p, q)
        st.flush()
    st.close()
    print(bad, reads)
""")


@pytest.mark.parametrize("kind", ["disk", "remote"])
def test_two_processes_never_read_a_partial_entry(tmp_path, kind, request):
    if kind == "remote":
        srv = request.getfixturevalue("server")
        spec = srv.url + "?part=16KiB"
    else:
        spec = f"disk:{tmp_path}:100MB"
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, str(script), spec, str(w)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for w in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        bad, reads = map(int, out.split())
        assert bad == 0 and reads > 0


# ----------------------------------------------------------------------------- device tier, backends
def test_device_tier_moves_down_to_host_and_hits_move_up():
    c, ids, _ = _cache(T=320)
    chunk = len(b"".join(a.tobytes() for a in export_chunk(c, 0, C)))
    st = Store(f"device:{int(chunk * 2.5)}", "host:10MB", chunk_size=C, namespace="m")
    st.put(ids, c)
    s = st.stats()["tiers"]
    assert s["device"]["entries"] == 2 and s["host"]["entries"] == 3 and s["host"]["migrations_in"] == 3
    c2 = _fresh()
    assert st.get(ids, c2) == 5 * C
    _same_chunks(c, c2, 5 * C)
    s = st.stats()["tiers"]
    assert s["host"]["hits"] == 3 and s["device"]["migrations_in"] >= 1
    assert s["device"]["entries"] + s["host"]["entries"] == 5  # moved, not copied
    st.close()


@pytest.mark.parametrize("backend", test_backends())
def test_round_trip_on_every_backend(tmp_path, backend):
    """Chunks exported from a cache of one backend load into a cache of any backend, bit for bit."""
    be = lmcache.backends.get_backend(backend)
    c, ids, kv = _cache(T=200)
    st = Store("device:1MB", "host:1MB", f"disk:{tmp_path}:10MB", chunk_size=C, namespace="m")
    c_be = lmcache.Cache(backend=backend, bits=4, group_size=32, residual=64)
    for i in range(L):
        c_be.update(i, be.from_numpy(kv[i][0]), be.from_numpy(kv[i][1]))
    assert st.put(ids, c_be) == 3 * C
    st.flush()
    for target in (backend, "numpy"):
        c2 = lmcache.Cache(backend=target, bits=4, group_size=32, residual=64)
        assert st.get(ids, c2) == 3 * C
        for i in range(3):
            for p, q in zip(export_chunk(c, i * C, (i + 1) * C), export_chunk(c2, i * C, (i + 1) * C)):
                b2 = c2.backend
                assert np.array_equal(p, q if isinstance(q, np.ndarray) else b2.to_numpy(q))
    c3 = lmcache.Cache(bits=4, group_size=32, residual=64, store=st)  # "auto": the first array decides
    n = c3.set_prompt(ids)
    assert n == 3 * C
    k, _ = c3.update(0, be.from_numpy(kv[0][0][:, :, n:]), be.from_numpy(kv[0][1][:, :, n:]))
    assert c3.backend.name == backend and be.is_array(k) and tuple(k.shape) == (1, H, 200, D)
    st.close()


def test_caches_with_evicted_tokens_are_refused():
    st = Store("host:1MB", chunk_size=C, namespace="m")
    c, ids, kv = _cache(T=300, policy="window", budget=128)
    for i in range(L):  # attention evicts down to the budget
        c.attend(i, np.ones((1, H, 1, D), np.float16))
    assert c.seq_len(0) == 128
    with pytest.raises(ValueError, match="evicted"):
        st.put(ids, c)
    assert st.stats()["chunks_put"] == 0
    st.close()
