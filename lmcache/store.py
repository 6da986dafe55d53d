"""Store: compressed KV chunks found again by the hash of their token prefix, kept in tiers.

Token ids are cut into chunks of ``chunk_size``; chunk ``i``'s key is
``SHA-256(key[i-1] || token_ids[i*C:(i+1)*C] as little-endian int64 || namespace)`` with
``key[-1]`` 32 zero bytes, so a key names the whole prefix up to its chunk and is the same
in every process and on every machine. The namespace is ``SHA-256`` of the model
fingerprint and an optional tenant salt: two namespaces never see each other's entries.

A chunk holds, for every layer and head group of a ``Cache``, the compressed blocks of its
tokens (packed codes, scales, offsets: a 4-bit cache stores 4-bit bytes), plus a layout
that says how they were made; a cache with another layout (bits, group size, plan,
rotation, shapes) treats the chunk as a miss.

Placement (see ``lmcache.policies.placement``): a new chunk goes to the fastest tier it
fits in; a full tier moves its least valuable chunks (recency and frequency) one tier down,
and the last tier drops them; a hit moves a chunk one tier up (disk and remote keep their
copy, since other processes may share them). Disk and remote writes run on background
threads (``writers``), so ``put`` returns after copying the chunk out of the cache; ``get`` reads the next
chunks from disk or remote on ``prefetch`` threads while it copies the current one.

Nothing fails silently: every failed write, corrupt entry and unreachable server is
counted in ``stats()`` and logged on the ``lmcache.store`` logger, and is a miss to readers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from . import serde
from .backends import backend_of, framework_of, get_backend
from .backends.base import QuantBlock
from .kvblocks import HeadGroupKV
from .policies.placement import RecencyFrequency
from .tiers import (
    RANK,
    DeviceTier,
    DiskTier,
    HostTier,
    RemoteTier,
    TierError,
    make_tier,
    parse_size,
    shares_host_memory,
    sync,
)

log = logging.getLogger("lmcache.store")

_ZERO_KEY = bytes(32)
_COUNTERS = ("hits", "misses", "puts", "put_bytes", "get_bytes", "migrations_in", "migrations_out",
             "evictions", "errors")


# --------------------------------------------------------------------------- hashing
def namespace_id(namespace: str | bytes, tenant: str | bytes | None = None) -> bytes:
    """32 bytes naming a namespace: SHA-256 of the model fingerprint and the tenant salt."""
    def b(x):
        return x if isinstance(x, bytes) else str(x).encode("utf-8")
    h = hashlib.sha256(b"lmcache-namespace-v1\0")
    h.update(len(b(namespace)).to_bytes(8, "little") + b(namespace))
    if tenant is not None:
        h.update(b"\0tenant\0" + b(tenant))
    return h.digest()


def token_array(token_ids: Any) -> np.ndarray:
    """``token_ids`` (a list, numpy, torch, jax or mlx 1-D integer array) as little-endian int64."""
    if framework_of(token_ids) not in (None, "numpy"):
        token_ids = backend_of(token_ids).to_numpy(token_ids)
    a = np.asarray(token_ids)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 1:
        raise ValueError(f"token_ids must be a 1-D sequence of token ids, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"token_ids must be integers, got dtype {a.dtype}")
    return a.astype("<i8", copy=False)


def chunk_keys(token_ids: Any, chunk_size: int, namespace: bytes) -> list[bytes]:
    """The key of every whole chunk of ``token_ids`` (chained SHA-256, see the module docstring)."""
    ids = token_array(token_ids)
    keys, prev = [], _ZERO_KEY
    for i in range(len(ids) // chunk_size):
        h = hashlib.sha256(prev)
        h.update(ids[i * chunk_size:(i + 1) * chunk_size].tobytes())
        h.update(namespace)
        prev = h.digest()
        keys.append(prev)
    return keys


# --------------------------------------------------------------------------- cache <-> chunks
def cache_layout(cache) -> dict:
    """How ``cache`` stores its layers: dtype, batch, and per layer its head groups' settings."""
    layers = []
    for ly in cache._layers:
        groups = [[g.heads, g.cfg.k_bits, g.cfg.v_bits, g.cfg.group_size, g.cfg.rotate_k, g.cfg.rotate_v]
                  for g in ly.groups]
        layers.append([ly.kv_heads, ly.head_dim, groups])
    d = cache._layers[0]
    return {"v": 1, "dtype": d.dtype, "batch": d.batch, "layers": layers}


def layout_mismatch(cache, layout: dict) -> str | None:
    """Why an empty ``cache`` cannot take chunks of ``layout`` (``None`` when it can)."""
    try:
        if layout.get("v") != 1:
            return f"layout version {layout.get('v')!r}"
        for li, (kv_heads, head_dim, groups) in enumerate(layout["layers"]):
            mine = [[heads, cfg.k_bits, cfg.v_bits, cfg.group_size, cfg.rotate_k, cfg.rotate_v]
                    for heads, cfg in cache._group_configs(li, kv_heads, head_dim)]
            if mine != groups:
                return f"layer {li} is stored as {groups} but this cache makes {mine}"
    except (ValueError, TypeError, KeyError) as e:
        return f"unreadable layout ({e})"
    return None


def _tokens(x) -> int:
    return x.codes.shape[2] if isinstance(x, QuantBlock) else x.shape[2]


def _slice(x, a: int, b: int, spec):
    """Tokens ``a:b`` of a block (``QuantBlock`` or plain array ``[B, H, T, D]``)."""
    if not isinstance(x, QuantBlock):
        return x[:, :, a:b]
    g = spec.group_size if spec.axis == -2 else 1
    return QuantBlock(x.codes[:, :, a:b], x.scale[:, :, a // g:b // g], x.lo[:, :, a // g:b // g], x.spec)


def _side(be, blocks, res, n_quant, spec, a, b) -> list:
    """The arrays of tokens ``a:b`` of one side (K or V) of a head group."""
    if b <= n_quant:  # the common case, kept short (it runs per layer, side and chunk): one block holds a:b
        off = 0
        for blk in blocks:
            quant = isinstance(blk, QuantBlock)
            t = blk.codes.shape[2] if quant else blk.shape[2]
            if off <= a and b <= off + t:
                if not quant:
                    return [blk[:, :, a - off:b - off]]
                g = spec.group_size if spec.axis == -2 else 1
                return [blk.codes[:, :, a - off:b - off], blk.scale[:, :, (a - off) // g:(b - off) // g],
                        blk.lo[:, :, (a - off) // g:(b - off) // g]]
            off += t
    pieces, off = [], 0
    for blk in blocks:
        t = _tokens(blk)
        lo, hi = max(a, off), min(b, off + t)
        if lo < hi:
            pieces.append(_slice(blk, lo - off, hi - off, spec))
        off += t
    if b > n_quant:  # tokens still in the full-precision residual: quantize them as the cache will
        r = res[:, :, max(a, n_quant) - n_quant:b - n_quant]
        pieces.append(r if spec is None else be.quantize(r, spec))
    if isinstance(pieces[0], QuantBlock):
        parts = [[p.codes for p in pieces], [p.scale for p in pieces], [p.lo for p in pieces]]
        return [ps[0] if len(ps) == 1 else be.concat(ps, 2) for ps in parts]
    return [pieces[0] if len(pieces) == 1 else be.concat(pieces, 2)]


def export_chunk(cache, a: int, b: int) -> list:
    """The compressed arrays of tokens ``a:b`` of every layer, in layout order (backend arrays).

    Per layer and head group: K (codes, scale, lo; or the plain array where K is kept in
    full precision), then V. Tokens still in the residual are quantized here, exactly as the
    cache would quantize them later (groups start at multiples of ``group_size``).
    """
    be = cache._be
    out = []
    for ly in cache._layers:
        for g in ly.groups:
            out += _side(be, g.k_blocks, g.k_res, g.n_quant, g.cfg.k_spec, a, b)
            out += _side(be, g.v_blocks, g.v_res, g.n_quant, g.cfg.v_spec, a, b)
    return out


IN_PLACE = object()  # a chunk a reader wrote straight into the assembler's destination


class DevicePacked:
    """A device-tier entry (what ``pack_on_device`` made) handed to ``Assembler.add`` as ``packed``."""

    def __init__(self, entry):
        self.entry = entry


class Assembler:
    """Copies chunks, as they arrive, into one array per segment holding up to ``n_max`` chunks.

    ``be``: the backend the arrays are made on (the numpy backend for a detached host copy).
    Each segment ``j`` of chunk ``i`` lands at tokens ``i * t_j`` of array ``j`` (axis 2), so
    nothing is held per chunk and every byte is copied once. Backends whose ``write`` returns
    a new array (immutable arrays) collect the chunks and concatenate them at the end instead.
    """

    def __init__(self, be, device: str | None, n_max: int, copier=None):
        self.be, self.device, self.n_max = be, device, n_max
        # Host-to-host copies (a numpy destination) run on ``copier`` threads when given:
        # they release the GIL, so chunks copy in parallel. ``wait()`` waits for them.
        self.copier = copier if be.name == "numpy" else None
        self._copies: list = []
        self.dest: list | None = None
        self.pieces: list | None = None  # the fallback for immutable arrays
        self.segments: tuple | None = None
        self.n = 0

    def wants_runs(self) -> bool:
        """Whether chunks could be read straight into the destination (host numpy arrays)."""
        return self.be.name == "numpy" and self.pieces is None

    def runs(self, i: int):
        """``(segments, byte views)`` where chunk ``i``'s payload goes, in payload order; or ``None``.

        Readers fill them directly (``IN_PLACE``); chunk ``i``'s span is its own, and a chunk
        past the loaded prefix is cut off by ``columns``, so a failed read leaves no trace.
        """
        if self.dest is None or not self.wants_runs() or i >= self.n_max:
            return None
        out = []
        for d, seg in zip(self.dest, self.segments):
            t = seg.shape[2]
            v = d[:, :, i * t:(i + 1) * t]
            b, h = v.shape[:2]
            out += [memoryview(v[x, y]).cast("B") for x in range(b) for y in range(h)]
        return self.segments, out

    def chunk_arrays(self, i: int) -> list:
        """The arrays of chunk ``i`` as they sit in the destination (views)."""
        return [d[:, :, i * s.shape[2]:(i + 1) * s.shape[2]] for d, s in zip(self.dest, self.segments)]

    def add(self, header: serde.Header, arrays, packed=None) -> None:
        """Append one chunk: its ``arrays`` (numpy or backend), or ``IN_PLACE``.

        ``packed``: the chunk's payload as one host buffer, when there is one; it then moves
        with one ``be.unpack_from_host`` (one host-to-device copy on a GPU). Host copies may
        run asynchronously until ``be.synchronize()``.
        """
        be = self.be
        if self.n == self.n_max:
            raise ValueError("more chunks than the assembler was made for")
        if arrays is IN_PLACE:  # a reader wrote it into the destination already
            self.n += 1
            return
        segs = header.segments
        if self.pieces is None and not shares_host_memory(be):
            # Immutable arrays (jax, mlx): each write would copy the whole destination, so the
            # chunks are collected and concatenated at the end.
            self.pieces = [[] for _ in segs]
        if self.pieces is not None:
            for col, a, s in zip(self.pieces, arrays, segs):
                col.append(be.to_device(a, s.dtype, self.device) if isinstance(a, np.ndarray) else a)
            self.n += 1
            return
        if self.dest is None:
            self.segments = tuple(segs)
            self.dest = be.empty_many([((*s.shape[:2], s.shape[2] * self.n_max, *s.shape[3:]), s.dtype) for s in segs],
                                      self.device)
        starts = [self.n * s.shape[2] for s in segs]
        if isinstance(packed, DevicePacked):  # a device-tier hit on this backend: one device copy per kind
            be.unpack_packed(packed.entry, [(s.dtype, s.shape) for s in segs], self.dest, starts, 2)
        elif packed is not None:
            args = (np.frombuffer(memoryview(packed).cast("B"), np.uint8), [(s.dtype, s.shape) for s in segs],
                    self.dest, starts, 2)
            if self.copier is not None:
                self._copies.append(self.copier.submit(be.unpack_from_host, *args))
            else:
                be.unpack_from_host(*args)
        else:
            for j, a in enumerate(arrays):
                if isinstance(a, np.ndarray):
                    be.copy_from_host(self.dest[j], starts[j], a, 2)
                else:
                    be.write(self.dest[j], starts[j], a, axis=2)
        self.n += 1

    def wait(self) -> None:
        """Wait for the copies started on ``copier`` threads and the backend's asynchronous ones."""
        copies, self._copies = self._copies, []
        for f in copies:
            f.result()
        sync(self.be)

    def columns(self) -> list:
        """One array per segment covering the ``n`` chunks added (a view when fewer than ``n_max``)."""
        if self.pieces is not None:
            return [col[0] if len(col) == 1 else self.be.concat(col, 2) for col in self.pieces]
        if self.n == self.n_max:
            return self.dest
        return [d[:, :, :d.shape[2] // self.n_max * self.n] for d in self.dest]


def import_columns(cache, be, layout: dict, columns: list, device: str | None) -> None:
    """Build ``cache``'s layers from ``columns`` (one array per segment, in ``export_chunk`` order).

    The arrays are ``be`` arrays, or host numpy arrays that are copied to ``device``. Every
    layer gets one block per side holding all the loaded tokens; the cache must be empty.
    """
    from .cache import _Layer

    if be.name != "numpy":
        columns = [a if not isinstance(a, np.ndarray) else be.to_device(a, None, device) for a in columns]
    dtype, batch = layout["dtype"], layout["batch"]
    layers, pos, n_tok = [], 0, 0
    for li, (kv_heads, head_dim, _) in enumerate(layout["layers"]):
        groups = []
        for heads, cfg in cache._group_configs(li, kv_heads, head_dim):
            hg = HeadGroupKV(be, heads, cfg, dtype)
            for spec, dst in ((cfg.k_spec, hg.k_blocks), (cfg.v_spec, hg.v_blocks)):
                if spec is None:
                    dst.append(columns[pos])
                    pos += 1
                else:
                    dst.append(QuantBlock(columns[pos], columns[pos + 1], columns[pos + 2], spec))
                    pos += 3
            hg.n_quant = n_tok = _tokens(hg.k_blocks[0])
            groups.append(hg)
        first = groups[0].k_blocks[0]
        dev = be.device_of(first.codes if isinstance(first, QuantBlock) else first)
        layers.append(_Layer(batch, kv_heads, head_dim, dtype, dev, groups))
    for ly in layers:
        ly.last_added = n_tok
    cache._layers = layers


# --------------------------------------------------------------------------- the store
class Store:
    """Chunks of compressed KV in tiers, found by the hash of their token prefix.

    ``tiers``: any of ``"device:4GB"`` (the backend's device memory), ``"host:16GB"`` (one
    host memory pool, pinned when the backend can), ``"disk:/path:200GB"`` and a remote url
    (``redis://host:6379``, ``valkey://...``, ``rediss://...``, ``redis+cluster://...``;
    options ``?capacity=..&timeout=1.0&connections=8&part=4MiB``), or ``Tier`` objects;
    they are kept fastest first. ``chunk_size``: tokens per chunk, a multiple of the caches'
    ``group_size``. ``namespace``: the model fingerprint (required); ``tenant``: an optional
    salt. ``key``: 32 bytes to encrypt disk and remote entries with AES-256-GCM (needs the
    ``cryptography`` package); an entry written with another key is a miss. ``prefetch``:
    chunks read ahead by ``get``. ``max_pending``: bytes of background writes queued before
    ``put`` waits for the writer. ``policy``: placement policy (``RecencyFrequency()``).
    ``backend``: a backend name or object to allocate the host pool with now (pinned when the
    backend can); by default the pool is allocated on the first put, with that cache's backend.
    ``writers``: background writer threads (two overlap one chunk's fsync with the next write).
    ``copy_threads``: threads for the copies between host arrays and the host pool (numpy
    caches; default ``min(4, cpus)``; 1 copies on the caller's thread).
    """

    def __init__(self, *tiers: Any, chunk_size: int = 256, namespace: str | bytes | None = None,
                 tenant: str | bytes | None = None, key: bytes | None = None, prefetch: int = 4,
                 max_pending: Any = "1GiB", policy: Any = None, backend: Any = None, writers: int = 2,
                 copy_threads: int | None = None):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if not isinstance(namespace, (str, bytes)) or not namespace:
            raise ValueError(f"namespace must be a non-empty string naming the model (a fingerprint), "
                             f"got {namespace!r}")
        if tenant is not None and not isinstance(tenant, (str, bytes)):
            raise TypeError(f"tenant must be a string, bytes or None, got {type(tenant).__name__}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be a positive integer, got {prefetch!r}")
        if isinstance(writers, bool) or not isinstance(writers, int) or writers < 1:
            raise ValueError(f"writers must be a positive integer, got {writers!r}")
        if copy_threads is None:
            copy_threads = min(4, os.cpu_count() or 1)
        if isinstance(copy_threads, bool) or not isinstance(copy_threads, int) or copy_threads < 1:
            raise ValueError(f"copy_threads must be a positive integer or None, got {copy_threads!r}")
        if not tiers:
            raise ValueError("Store needs at least one tier, e.g. Store('host:16GB', namespace=...)")
        self._key = serde.check_key(key)
        self.max_pending = parse_size(max_pending, "max_pending")  # checked before tiers hold resources
        built = []
        try:
            for t in tiers:
                built.append(make_tier(t, self._key))
            kinds = [t.kind for t in built]
            if len(set(kinds)) != len(kinds):
                raise ValueError(f"each kind of tier may appear once, got {kinds}")
        except BaseException:  # a bad tier spec: release the tiers already built
            for t in built:
                t.close()
            raise
        self.tiers = sorted(built, key=lambda t: RANK[t.kind])
        self.chunk_size = chunk_size
        self.namespace = namespace_id(namespace, tenant)
        self.prefetch = prefetch
        self.writers = writers
        self.copy_threads = copy_threads
        self._copy_pool: ThreadPoolExecutor | None = None
        self.policy = policy if policy is not None else RecencyFrequency()
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._pending: dict[bytes, tuple] = {}  # key -> (header, payload, first tier index, uses)
        self._pending_bytes = 0
        self._jobs: deque = deque()
        self._busy = 0
        self._workers: list[threading.Thread] = []
        self._readers: ThreadPoolExecutor | None = None
        self._closed = False
        self._protected: set = set()
        # Recycled write buffers: enough for the writers' chunks in flight and a few queued.
        self._buffers = _Buffers(min(self.max_pending, 256 << 20))
        self._stats = {t.name: dict.fromkeys(_COUNTERS, 0) for t in self.tiers}
        self._totals = {"chunks_put": 0, "chunks_present": 0, "put_failures": 0, "layout_misses": 0}
        if backend is not None:
            be = get_backend(backend)
            for t in self.tiers:
                if isinstance(t, HostTier):
                    t._ensure(be)

    # ------------------------------------------------------------------ small helpers
    def _copier(self):
        """The threads that run host-to-host chunk copies (made on first use), or ``None``."""
        if self.copy_threads < 2:
            return None
        if self._copy_pool is None:
            self._copy_pool = ThreadPoolExecutor(self.copy_threads, thread_name_prefix="lmcache-copy")
        return self._copy_pool

    def _settle(self) -> None:
        """Wait for the asynchronous copies into the host pool (lock held)."""
        for t in self.tiers:
            if isinstance(t, HostTier):
                t.settle()

    def _count(self, ti: int, what: str, n: int = 1) -> None:
        self._stats[self.tiers[ti].name][what] += n

    def _error(self, ti: int | None, msg: str) -> None:
        if ti is not None:
            self._count(ti, "errors")
        log.warning("lmcache store: %s", msg)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this Store is closed")

    def _local(self, key: bytes) -> int | None:
        """The tier index holding ``key`` in this process's memory, -1 for pending, else ``None``."""
        if key in self._pending:
            return -1
        for i, t in enumerate(self.tiers):
            if isinstance(t, (DeviceTier, HostTier)) and t.has(key):
                return i
        return None

    def _present(self, keys: list[bytes]) -> list[bool]:
        """Which ``keys`` some tier holds (one round trip to a remote tier at most)."""
        with self._lock:
            found = [self._local(k) is not None for k in keys]
        for t in self.tiers:
            if isinstance(t, DiskTier):
                found = [f or t.has(k) for f, k in zip(found, keys)]
            elif isinstance(t, RemoteTier):
                rest = [k for f, k in zip(found, keys) if not f]
                if rest and t.available():
                    there = dict(zip(rest, t.has_many(rest)))
                    found = [f or there.get(k, False) for f, k in zip(found, keys)]
        return found

    # ------------------------------------------------------------------ public API
    def keys(self, token_ids: Any) -> list[bytes]:
        """The chunk keys of ``token_ids`` in this store's namespace (whole chunks only)."""
        return chunk_keys(token_ids, self.chunk_size, self.namespace)

    def lookup(self, token_ids: Any) -> int:
        """Tokens of the longest prefix of ``token_ids`` whose chunks are all stored.

        A hint: a chunk found here may still be a miss for ``get`` (evicted meanwhile,
        corrupt, written with another key or cache layout).
        """
        self._check_open()
        n = 0
        for f in self._present(self.keys(token_ids)):
            if not f:
                break
            n += 1
        return n * self.chunk_size

    def put(self, token_ids: Any, cache) -> int:
        """Store the chunks of ``cache`` that ``token_ids`` names; return the tokens covered.

        ``token_ids``: the ids of the tokens the cache holds, oldest first (extra ids past
        the cache's length are ignored). Only whole chunks are stored; chunks already stored
        are only marked as used. Returns after copying the chunks out of the cache: disk and
        remote writes finish in the background (``flush()`` waits for them). A failed
        write is counted in ``stats()`` and logged; it never raises into the caller.
        """
        self._check_open()
        from .cache import Cache

        if not isinstance(cache, Cache):
            raise TypeError(f"cache must be a lmcache.Cache, got {type(cache).__name__}")
        if cache.num_layers == 0:
            raise ValueError("cache holds no tokens yet: update it before store.put")
        if self.chunk_size % cache.group_size:
            raise ValueError(f"chunk_size {self.chunk_size} must be a multiple of the cache's "
                             f"group_size {cache.group_size}")
        if any(getattr(ly, "evicted", 0) for ly in cache._layers):
            raise ValueError("cache has evicted tokens (policy=/budget=), so its positions no longer match "
                             "token_ids: only caches without eviction can be stored")
        ids = token_array(token_ids)
        n_tok = min(len(ids), min(cache.seq_len(i) for i in range(cache.num_layers)))
        keys = self.keys(ids[:n_tok])
        if not keys:
            return 0
        be = cache.backend
        layout = cache_layout(cache)
        present = self._present(keys)
        try:
            self._put_chunks(cache, be, keys, present, layout)
        finally:
            with self._lock:
                self._settle()  # once per put: the cache may change its arrays after we return
        return len(keys) * self.chunk_size

    def _put_chunks(self, cache, be, keys: list, present: list, layout: dict) -> None:
        """Export and place the chunks of ``keys`` not ``present`` yet (``put``'s loop)."""
        segs = None  # every chunk of one cache has the same segments
        for i, (key, there) in enumerate(zip(keys, present)):
            if there:
                with self._lock:
                    self._totals["chunks_present"] += 1
                    for ti, t in enumerate(self.tiers):
                        if not isinstance(t, RemoteTier) and t.has(key):
                            self.policy.touched(ti, key)
                continue
            arrays = export_chunk(cache, i * self.chunk_size, (i + 1) * self.chunk_size)
            if segs is None:
                segs = [serde.Segment(a.dtype.name if isinstance(a, np.ndarray) else be.dtype_name(a),
                                      tuple(a.shape)) for a in arrays]
            header = serde.Header(self.namespace, key, segs, layout)
            with self._lock:
                self._totals["chunks_put"] += 1
                self._place(key, header, arrays, be, 0, 1)

    def get(self, token_ids: Any, cache, max_tokens: int | None = None) -> int:
        """Load the longest stored prefix of ``token_ids`` into the empty ``cache``.

        Returns the tokens loaded (a multiple of ``chunk_size``, at most ``max_tokens``);
        the caller then runs the model on ``token_ids[n:]`` and ``update``s every layer with
        those tokens' K/V. The loaded tokens are all in quantized blocks (none in the
        full-precision residual). A missing, corrupt, foreign or undecryptable chunk ends
        the prefix: it is a miss, never wrong data. ``cache``'s backend must be known
        (``backend=`` given, or ``"auto"`` resolves without an array).
        """
        self._check_open()
        from .cache import Cache

        if not isinstance(cache, Cache):
            raise TypeError(f"cache must be a lmcache.Cache, got {type(cache).__name__}")
        if cache.num_layers:
            raise ValueError(f"store.get needs an empty cache, this one holds {cache.seq_len(0)} tokens")
        be = cache.backend or get_backend("auto", cache.device)
        n, layout, columns = self._load(token_ids, cache, be, cache.device, max_tokens, be)
        if n:
            cache._be = be
            import_columns(cache, be, layout, columns, cache.device)
        return n

    def fetch_prefix(self, token_ids: Any, cache, max_tokens: int | None = None) -> tuple[int, Any]:
        """Read the longest stored prefix into host memory, for a cache whose backend is not known yet.

        Returns ``(n_tokens, pending)``; ``load_pending(cache, pending, be)`` builds the layers
        later (``Cache.set_prompt`` uses this to load on the first ``update``).
        """
        self._check_open()
        n, layout, columns = self._load(token_ids, cache, get_backend("numpy"), None, max_tokens, None)
        return n, (layout, columns)

    @staticmethod
    def load_pending(cache, pending, be) -> None:
        """Build ``cache``'s layers from what ``fetch_prefix`` returned, on backend ``be``."""
        layout, columns = pending
        import_columns(cache, be, layout, columns, cache.device)

    def _load(self, token_ids, cache, be, device, max_tokens, promote_be):
        keys = self.keys(token_ids)
        if max_tokens is not None:
            keys = keys[:max(0, max_tokens) // self.chunk_size]
        n_max = 0
        for f in self._present(keys):  # how many to make room for (a hint: entries may still miss)
            if not f:
                break
            n_max += 1
        if not n_max:
            with self._lock:  # count the misses
                self._fetch(keys[:1], cache, None)
            return 0, None, None
        asm = Assembler(be, device, n_max, self._copier())
        with self._lock:
            layout, promote = self._fetch(keys[:n_max], cache, asm)
            self._promote(promote, promote_be)
            self._settle()
        if not asm.n:
            return 0, None, None
        return asm.n * self.chunk_size, layout, asm.columns()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every background write has finished; ``False`` if ``timeout`` ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._jobs or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left if left is not None else 0.5)
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Finish background writes for up to ``timeout`` seconds, then release everything.

        Returns within ``timeout`` (plus a few milliseconds) even when a server is gone:
        writes still queued are dropped, counted in ``stats()["put_failures"]`` and logged.
        """
        if self._closed:
            return
        start = time.monotonic()
        self.flush(max(0.0, timeout * 0.6))
        with self._cv:
            self._closed = True
            dropped = len(self._jobs)
            self._jobs.clear()
            if dropped:
                self._totals["put_failures"] += dropped
                self._error(None, f"close dropped {dropped} chunk write(s) that had not finished")
            self._cv.notify_all()
        for t in self.tiers:  # closes sockets, which wakes a writer blocked on one
            try:
                t.close()
            except Exception as e:  # noqa: BLE001 - close must not raise
                log.warning("lmcache store: closing %s failed: %s", t.name, e)
        for w in self._workers:
            w.join(max(0.0, timeout - (time.monotonic() - start) - 0.05))
        if self._readers is not None:
            self._readers.shutdown(wait=False, cancel_futures=True)
        if self._copy_pool is not None:
            self._copy_pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._pending.clear()
            self._pending_bytes = 0
            self._buffers.clear()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """Counters per tier (hits, misses, puts, bytes, migrations, evictions, errors, use) and totals."""
        with self._lock:
            tiers = {}
            for t in self.tiers:
                d = dict(self._stats[t.name])
                d.update(kind=t.kind, used_bytes=t.used, capacity=t.capacity, entries=len(t.keys()))
                if isinstance(t, HostTier):
                    d["pinned"] = t.pinned
                tiers[t.name] = d
            out = dict(self._totals)
            out.update(tiers=tiers, pending_writes=len(self._pending), pending_bytes=self._pending_bytes,
                       hits=sum(d["hits"] for d in tiers.values()),
                       misses=sum(d["misses"] for d in tiers.values()),
                       errors=sum(d["errors"] for d in tiers.values()),
                       evictions=sum(d["evictions"] for d in tiers.values()),
                       migrations=sum(d["migrations_in"] for d in tiers.values()))
            return out

    def __repr__(self) -> str:
        return f"lmcache.Store({', '.join(t.name for t in self.tiers)}, chunk_size={self.chunk_size})"

    # ------------------------------------------------------------------ placement (lock held)
    def _place(self, key, header, data, be, start: int, uses: int) -> bool:
        """Put a chunk into the first tier from ``start`` that takes it (lock held).

        ``data``: backend arrays, host arrays or one packed payload. Device and host tiers
        are written now; disk and remote writes are queued for the background writer.
        """
        nbytes = header.payload_nbytes
        for ti in range(start, len(self.tiers)):
            t = self.tiers[ti]
            if not t.fits(nbytes):
                continue
            if isinstance(t, (DiskTier, RemoteTier)):
                self._queue_write(key, header, _packed(header, data, be, self._buffers), ti, uses)
                return True
            try:
                self._put_local(ti, key, header, data, be)
            except (TierError, OSError, MemoryError) as e:
                self._error(ti, f"{t.name} could not take a chunk of {nbytes} bytes: {e}")
                continue
            self.policy.added(ti, key, nbytes, uses)
            self._count(ti, "puts")
            self._count(ti, "put_bytes", nbytes)
            return True
        self._totals["put_failures"] += 1
        self._error(None, f"no tier could take a chunk of {nbytes} bytes: it is not stored")
        return False

    def _put_local(self, ti: int, key: bytes, header, data, be) -> None:
        """Make room in device/host tier ``ti`` and put the chunk there (lock held).

        ``data``: backend arrays, host arrays or one packed payload (``header`` describes
        them). Raises ``TierError``, ``OSError`` or ``MemoryError`` when the tier cannot take it.
        """
        t = self.tiers[ti]
        self._make_room(ti, header.payload_nbytes, key)
        if isinstance(t, DeviceTier):
            t.put(key, header, _device_arrays(header, data, be), be)
        else:
            t.put(key, header, data, be, self._copier())

    def _make_room(self, ti: int, nbytes: int, keep: bytes) -> None:
        t = self.tiers[ti]
        while True:
            room = t.room()
            if room is None or (room >= nbytes and (not isinstance(t, HostTier) or t.can_alloc(nbytes))):
                return
            victims = self.policy.victims(ti, max(nbytes - room, 1), exclude={keep} | self._protected)
            if not victims:
                raise TierError(f"{t.name} is full and holds nothing it could move down")
            for v in victims:
                self._demote(ti, v)

    def _demote(self, ti: int, key: bytes) -> None:
        """Move ``key`` from device/host tier ``ti`` one tier down, or drop it from the last."""
        t = self.tiers[ti]
        uses = self.policy.uses(ti, key)
        got = t.get(key)
        below = ti + 1 < len(self.tiers)
        if got is not None and below:
            header, arrays = got
            if isinstance(t, HostTier):
                data = np.array(t.payload(key), copy=True)  # the pool span is freed right after
                be = None
            else:
                data, be = arrays, self._device_backend(arrays)
            nxt = self.tiers[ti + 1]
            if isinstance(nxt, (DiskTier, RemoteTier)) and nxt.knows(key):
                pass  # the lower tier already holds it (a chunk promoted earlier): nothing to write
            elif self._place(key, header, data, be, ti + 1, uses):
                self._count(ti, "migrations_out")
                self._count(ti + 1, "migrations_in")
        else:
            self._count(ti, "evictions")
        t.remove(key)
        self.policy.removed(ti, key)

    @staticmethod
    def _device_backend(arrays):
        return backend_of(arrays[0])

    # ------------------------------------------------------------------ background writer
    def _queue_write(self, key, header, payload, ti: int, uses: int) -> None:
        while self._pending_bytes > self.max_pending and not self._closed and self._worker_alive():
            self._cv.wait(0.5)  # back-pressure: the writer is behind by more than max_pending
        if key in self._pending:
            return
        self._pending[key] = (header, payload, ti, uses)
        self._pending_bytes += header.payload_nbytes
        self._jobs.append(key)
        self._workers = [w for w in self._workers if w.is_alive()]
        while len(self._workers) < min(self.writers, len(self._jobs) + self._busy):
            w = threading.Thread(target=self._run, name="lmcache-store-writer", daemon=True)
            w.start()
            self._workers.append(w)
        self._cv.notify_all()

    def _worker_alive(self) -> bool:
        return any(w.is_alive() for w in self._workers)

    def _run(self) -> None:
        while True:
            with self._cv:
                idle_until = time.monotonic() + 2.0
                while not self._jobs and not self._closed and time.monotonic() < idle_until:
                    self._cv.wait(0.5)
                if not self._jobs:  # closed, or idle: a writer is started again when work comes
                    self._workers = [w for w in self._workers if w is not threading.current_thread()]
                    return
                key = self._jobs.popleft()
                self._busy += 1
            try:
                self._write(key)
            except Exception as e:  # noqa: BLE001 - the writer must survive anything
                with self._lock:
                    self._totals["put_failures"] += 1
                    self._error(None, f"background write failed: {type(e).__name__}: {e}")
            finally:
                with self._cv:
                    self._busy -= 1
                    entry = self._pending.pop(key, None)
                    if entry is not None:
                        self._pending_bytes -= entry[0].payload_nbytes
                        self._buffers.give(entry[1])  # written: nothing reads it any more
                    self._cv.notify_all()

    def _write(self, key: bytes) -> None:
        with self._lock:
            entry = self._pending.get(key)
        if entry is None:
            return
        header, payload, start, uses = entry
        nbytes = header.payload_nbytes
        for ti in range(start, len(self.tiers)):
            t = self.tiers[ti]
            if self._closed:
                break
            if not t.fits(nbytes):
                continue
            try:
                if t.has(key):
                    return  # another process (or an earlier write) stored it already
                self._make_room_shared(ti, nbytes)
                size = t.put(key, header, payload)
            except (TierError, OSError) as e:
                with self._lock:
                    self._error(ti, f"write of a chunk to {t.name} failed: {type(e).__name__}: {e}")
                continue
            with self._lock:
                self.policy.added(ti, key, size, uses)
                self._count(ti, "puts")
                self._count(ti, "put_bytes", size)
            return
        with self._lock:
            self._totals["put_failures"] += 1
            self._error(None, f"chunk {key.hex()[:16]} could not be written to any tier: it is not stored")

    def _make_room_shared(self, ti: int, nbytes: int) -> None:
        """Make room in disk/remote tier ``ti`` (writer thread): move victims down or drop them."""
        t = self.tiers[ti]
        while True:
            room = t.room()
            if room is None or room >= nbytes:
                return
            with self._lock:
                victims = self.policy.victims(ti, nbytes - room)
            if not victims:  # files of other processes: our share is full but we cannot judge theirs
                victims = t.keys()[:1]
                if not victims:
                    return
            for v in victims:
                moved = 0  # the bytes the victim takes in the next tier, once moved there
                if ti + 1 < len(self.tiers):
                    nxt = self.tiers[ti + 1]
                    try:
                        got = t.get(v, self.namespace)
                        if got is not None and not nxt.has(v):
                            moved = nxt.put(v, got[0], got[1])
                    except (serde.FrameError, TierError, OSError) as e:
                        with self._lock:
                            self._error(ti + 1, f"moving a chunk down from {t.name} failed: {e}")
                t.remove(v)
                with self._lock:
                    uses = self.policy.uses(ti, v)
                    self.policy.removed(ti, v)
                    if moved:
                        self.policy.added(ti + 1, v, moved, uses)
                        self._count(ti, "migrations_out")
                        self._count(ti + 1, "migrations_in")
                    else:
                        self._count(ti, "evictions")

    # ------------------------------------------------------------------ reading
    def _read_shared(self, key: bytes, first: int, runs=None):
        """Look ``key`` up in the disk/remote tiers from ``first`` on (reader thread, no lock).

        ``runs``: ``(segments, byte views)`` to read a disk entry straight into (see
        ``Assembler.runs``). Returns ``(result, events)``: result ``(header, payload or
        IN_PLACE, tier index)`` or ``None``, events the counters to add (the caller holds the lock).
        """
        events = []
        for ti in range(first, len(self.tiers)):
            t = self.tiers[ti]
            try:
                got = None
                if runs is not None and isinstance(t, (DiskTier, RemoteTier)):
                    h = t.read_into(key, self.namespace, *runs)
                    if h is None:
                        events.append((ti, "misses", None))
                        continue
                    if h is not False:
                        events.append((ti, "hits", None))
                        events.append((ti, "get_bytes", h.payload_nbytes))
                        return (h, IN_PLACE, ti), events
                got = t.get(key, self.namespace)
            except serde.FrameError as e:
                events.append((ti, "errors", f"{t.name} holds a bad entry (a miss): {e}"))
                if isinstance(t, DiskTier) and ("checksum" in str(e) or "truncated" in str(e)):
                    t.remove(key)  # damaged for every reader: drop it
                events.append((ti, "misses", None))
                continue
            except (TierError, OSError, MemoryError) as e:  # MemoryError: a file too large to read
                events.append((ti, "errors", f"reading from {t.name} failed (a miss): {type(e).__name__}: {e}"))
                events.append((ti, "misses", None))
                continue
            if got is None:
                events.append((ti, "misses", None))
                continue
            events.append((ti, "hits", None))
            events.append((ti, "get_bytes", got[0].payload_nbytes))
            return (got[0], got[1], ti), events
        return None, events

    def _apply(self, events) -> None:
        for ti, what, msg in events:
            if what == "errors":
                self._error(ti, msg)
            elif what == "get_bytes":
                self._count(ti, what, msg)
            else:
                self._count(ti, what)

    def _fetch(self, keys: list[bytes], cache, asm: Assembler | None):
        """Read the chunks of the longest stored prefix of ``keys`` into ``asm`` (lock held).

        Returns ``(layout, promote)``, ``promote`` the hits to move one tier up.
        """
        first_shared = next((i for i, t in enumerate(self.tiers) if isinstance(t, (DiskTier, RemoteTier))), None)
        futures = {}

        def schedule(j):
            if first_shared is None or j >= len(keys) or j in futures or self._local(keys[j]) is not None:
                return
            if self._readers is None:
                self._readers = ThreadPoolExecutor(self.prefetch, thread_name_prefix="lmcache-prefetch")
            runs = asm.runs(j) if asm is not None else None
            futures[j] = self._readers.submit(self._read_shared, keys[j], first_shared, runs)

        layout, promote = None, []
        try:
            for i, key in enumerate(keys):
                # Until the first chunk has shaped the destination, read no further ahead, so
                # that the chunks after it can be read straight into it.
                ahead = 1 if asm is not None and asm.dest is None and asm.wants_runs() else self.prefetch + 1
                for j in range(i, i + ahead):
                    schedule(j)
                where = self._local(key)
                if where is not None:
                    for ti in range(0, len(self.tiers) if where == -1 else where):
                        if not isinstance(self.tiers[ti], (DiskTier, RemoteTier)):
                            self._count(ti, "misses")
                    packed = None
                    if where == -1:
                        header, payload = self._pending[key][:2]
                        packed = None if isinstance(payload, list) else payload
                        arrays = payload if isinstance(payload, list) else serde.split_payload(header, payload)
                        src = -1  # still on its way to disk/remote: a hit there, nothing to move up
                        self._count(self._pending[key][2], "hits")
                        self._count(self._pending[key][2], "get_bytes", header.payload_nbytes)
                    else:
                        header, arrays = self.tiers[where].get(key)
                        if isinstance(self.tiers[where], HostTier):
                            packed = self.tiers[where].payload(key)
                        elif asm is not None and self.tiers[where].packed(key)[0] is asm.be:
                            packed = DevicePacked(self.tiers[where].packed(key)[1])
                        src = where
                        self._count(where, "hits")
                        self._count(where, "get_bytes", header.payload_nbytes)
                        self.policy.touched(where, key)
                else:
                    for ti, t in enumerate(self.tiers):
                        if isinstance(t, (DeviceTier, HostTier)):
                            self._count(ti, "misses")
                    if i in futures:
                        res, events = futures.pop(i).result()
                    else:
                        res, events = (None, []) if first_shared is None else self._read_shared(key, first_shared)
                    self._apply(events)
                    if res is None:
                        break
                    header, payload, src = res
                    arrays = payload if payload is IN_PLACE else serde.split_payload(header, payload)
                    packed = None if payload is IN_PLACE else payload
                if layout is None:
                    why = layout_mismatch(cache, header.layout) if not cache.num_layers else "the cache is not empty"
                    if why is not None:
                        self._totals["layout_misses"] += 1
                        log.warning("lmcache store: a stored chunk does not fit this cache (a miss): %s", why)
                        break
                    layout = header.layout
                elif header.layout != layout:
                    self._totals["layout_misses"] += 1
                    break
                if asm is None:
                    break
                if arrays is not IN_PLACE and asm.be.name == "numpy" and \
                        not all(isinstance(a, np.ndarray) for a in arrays):
                    arrays = [a if isinstance(a, np.ndarray) else self._device_backend([a]).to_host(a)
                              for a in arrays]  # device-tier arrays, for a detached host copy
                asm.add(header, arrays, packed)
                if src > 0:  # a hit below the fastest tier moves up
                    shared = first_shared is not None and src >= first_shared
                    if arrays is IN_PLACE:  # its bytes are in the destination now
                        arrays = asm.chunk_arrays(asm.n - 1)
                        # A write one shared tier up (remote to disk) needs a private packed copy
                        # (it is also what a reader of the pending write splits); a local tier
                        # copies from the arrays.
                        payload = _packed(header, arrays, asm.be, self._buffers) if src - 1 >= first_shared else None
                    promote.append((key, header, arrays, payload if shared else None, src))
        finally:
            for f in futures.values():
                f.cancel()
            if asm is not None:
                asm.wait()  # copies out of pool spans end before the lock is released
        return layout, promote

    def _promote(self, promote, be) -> None:
        """Move each hit one tier up (lock held); disk and remote keep their copy."""
        # Hits still to move out of the host pool are read from their pool spans: never victims.
        self._protected = {p[0] for p in promote if isinstance(self.tiers[p[4]], HostTier)}
        try:
            for key, header, arrays, payload, src in promote:
                self._promote_one(key, header, arrays, payload, src, be)
                self._protected.discard(key)
        finally:
            self._protected = set()

    def _promote_one(self, key, header, arrays, payload, src, be) -> None:
        """Move one hit from tier ``src`` one tier up (lock held)."""
        up = src - 1
        t = self.tiers[up]
        if not isinstance(t, RemoteTier) and t.has(key):
            return
        uses = self.policy.uses(src, key) + 1
        if isinstance(t, (DiskTier, RemoteTier)):
            self._queue_write(key, header, payload, up, uses)  # payload: a fresh read, private
            self._count(up, "migrations_in")
            self._count(src, "migrations_out")
            return
        if isinstance(t, DeviceTier) and be is None:
            return
        data = arrays if isinstance(t, DeviceTier) or payload is None else payload
        try:
            self._put_local(up, key, header, data, be)
        except (TierError, OSError, MemoryError) as e:
            self._error(up, f"moving a chunk up to {t.name} failed: {e}")
            return
        self.policy.added(up, key, header.payload_nbytes, uses)
        self._count(up, "migrations_in")
        self._count(src, "migrations_out")
        if isinstance(self.tiers[src], (DeviceTier, HostTier)):  # private tiers: a move, not a copy
            self.tiers[src].remove(key)
            self.policy.removed(src, key)


def _device_arrays(header, data, be) -> list:
    if isinstance(data, list) and not isinstance(data[0], np.ndarray):
        return data
    arrays = data if isinstance(data, list) else serde.split_payload(header, data)
    return [be.to_device(a, header.segments[k].dtype) if be.name != "numpy" else a for k, a in enumerate(arrays)]


class _Buffers:
    """Host buffers of background writes, recycled once written (chunks of one cache have one size).

    A fresh buffer of a chunk's size (tens of MiB) is a fresh mapping whose pages the kernel
    faults in and zeroes on the first copy, which costs about as much as the copy itself;
    a recycled one is already mapped. Keeps at most ``keep`` bytes.
    """

    def __init__(self, keep: int):
        self.keep, self.kept = keep, 0
        self._free: dict[int, list] = {}
        self._ours: set[int] = set()  # ids of the buffers handed out (alive while pending)
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A ``uint8`` buffer of ``nbytes`` (contents undefined)."""
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self.kept -= nbytes
                buf = free.pop()
            else:
                buf = np.empty(nbytes, np.uint8)
            self._ours.add(id(buf))
        return buf

    def give(self, buf) -> None:
        """Take back ``buf`` if ``take`` made it and room is left (else it is freed)."""
        with self._lock:
            if id(buf) not in self._ours:
                return
            self._ours.discard(id(buf))
            if self.kept + buf.nbytes <= self.keep:
                self._free.setdefault(buf.nbytes, []).append(buf)
                self.kept += buf.nbytes

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self.kept = 0


def _packed(header, data, be, buffers: _Buffers | None = None):
    """One contiguous payload for a disk or remote write (a private copy: the caller may change ``data``)."""
    if not isinstance(data, list):  # already a private packed payload
        return data
    buf = buffers.take(header.payload_nbytes) if buffers is not None else np.empty(header.payload_nbytes, np.uint8)
    if isinstance(data[0], np.ndarray):
        for dst, src in zip(serde.split_payload(header, buf), data):
            np.copyto(dst, src, casting="same_kind")
    else:
        be.pack_to_host(data, buf)  # one copy per chunk
        sync(be)  # the writer thread reads it next
    return buf
