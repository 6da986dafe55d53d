"""The tiers a ``Store`` keeps chunks in: device, host, disk and remote (Redis protocol).

Every tier maps a chunk key (32 bytes) to one entry and knows its capacity in bytes. The
tiers do no placement, locking or statistics (the store does); they move bytes and say
what went wrong by raising. Two entry forms exist:

* device and host tiers hold the chunk's arrays (``list`` of backend arrays on the
  device; views of one host pool for the host tier);
* disk and remote tiers hold a ``serde`` frame, so a corrupt, truncated, foreign or wrongly
  keyed entry raises ``serde.FrameError`` on ``get`` instead of returning data.
"""

from __future__ import annotations

import bisect
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np

from . import serde

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
#: Order of speed, fastest first; the store keeps its tiers in this order.
RANK = {"device": 0, "host": 1, "disk": 2, "remote": 3}


class TierError(RuntimeError):
    """A tier could not take or give an entry (full, unreachable, I/O error)."""


def parse_size(text: Any, what: str = "capacity") -> int:
    """``"16GB"``, ``"512MiB"``, ``"1g"`` or an int to a number of bytes (GB = 10**9, GiB = 2**30)."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{what} must be a positive size like '16GB', '512MiB' or a byte count, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


_SHARES_HOST: dict[str, bool] = {}


def shares_host_memory(be) -> bool:
    """Whether ``be.from_numpy(a, device="cpu")`` views ``a`` and ``be.write`` writes in place.

    Then a backend array can be copied straight into (or out of) host memory we own: one
    copy, device-to-host into the pool on put and host-to-device into the cache on get.
    Probed once per backend on a tiny array (torch: yes; jax, mlx: no; numpy: yes).
    """
    name = getattr(be, "name", None)
    if name not in _SHARES_HOST:
        try:
            a = np.zeros((1, 1, 2, 2), np.float32)
            t = be.from_numpy(a, None, "cpu")
            out = be.write(t, 1, be.from_numpy(np.ones((1, 1, 1, 2), np.float32), None, "cpu"), axis=2)
            _SHARES_HOST[name] = out is t and a[0, 0, 1].tolist() == [1.0, 1.0] and not a[0, 0, 0].any()
        except Exception:  # noqa: BLE001 - a backend that cannot do it takes the plain path
            _SHARES_HOST[name] = False
    return _SHARES_HOST[name]


def sync(be) -> None:
    """Wait for the copies a backend's host hooks may still run (``Backend.synchronize``)."""
    if be is not None:
        be.synchronize()


def copy_into(dst: np.ndarray, src, be=None) -> None:
    """Copy ``src`` (a numpy or backend array) into the host array ``dst`` of the same shape.

    A backend array goes through ``be.copy_to_host``, which may return before the copy ends:
    ``sync(be)`` waits.
    """
    if isinstance(src, np.ndarray):
        np.copyto(dst, src, casting="same_kind")
    else:
        be.copy_to_host(src, dst)


def copy_all(dsts: list, srcs: list) -> None:
    """``np.copyto`` each of the host arrays ``srcs`` into the same-shaped ``dsts``."""
    for d, a in zip(dsts, srcs):
        np.copyto(d, a, casting="same_kind")


class Tier:
    """Base of the tiers. ``capacity``: bytes, or ``None`` for no limit of ours."""

    kind = "tier"
    #: Whether other processes may add or remove entries behind our back.
    shared = False

    def __init__(self, capacity: int | None):
        self.capacity = capacity
        self.used = 0

    @property
    def name(self) -> str:
        return self.kind

    def fits(self, nbytes: int) -> bool:
        """Whether an entry of ``nbytes`` could ever fit (it is not larger than the tier)."""
        return self.capacity is None or nbytes <= self.capacity

    def room(self) -> int | None:
        """Free bytes under the capacity (negative when over it), ``None`` for no limit."""
        return None if self.capacity is None else self.capacity - self.used

    def close(self) -> None:
        """Release what the tier holds (memory, connections). Idempotent."""


# --------------------------------------------------------------------------- device
class DeviceTier(Tier):
    """Chunks as arrays of the cache's backend on its device (device memory for a GPU).

    Entries are private copies, so the cache may change or drop its own arrays.
    """

    kind = "device"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._entries: dict[bytes, tuple[serde.Header, Any, int, Any]] = {}

    def has(self, key: bytes) -> bool:
        """Whether the tier holds ``key`` (32 bytes)."""
        return key in self._entries

    def keys(self) -> list[bytes]:
        """The keys the tier holds, in insertion order."""
        return list(self._entries)

    def put(self, key: bytes, header: serde.Header, arrays: list, be) -> int:
        """Keep a private copy of backend ``arrays`` (what ``header.segments`` describes).

        ``be.pack_on_device`` makes it: one buffer made in one copy per kind of segment where
        the backend can (torch), else a copy of each array.
        """
        nbytes = header.payload_nbytes
        self._entries[key] = (header, be.pack_on_device(arrays), nbytes, be)
        self.used += nbytes
        return nbytes

    def get(self, key: bytes):
        """``(header, arrays)`` (views of the entry) or ``None``."""
        e = self._entries.get(key)
        if e is None:
            return None
        header, packed, _, be = e
        return header, be.unpack_on_device(packed, [(s.dtype, s.shape) for s in header.segments])

    def packed(self, key: bytes):
        """``(backend, entry)``: what ``pack_on_device`` made for ``key`` (for ``be.unpack_packed``)."""
        e = self._entries[key]
        return e[3], e[1]

    def remove(self, key: bytes) -> int:
        """Drop ``key``'s entry; returns the bytes it took (0 when absent)."""
        e = self._entries.pop(key, None)
        if e is None:
            return 0
        self.used -= e[2]
        return e[2]

    def close(self) -> None:
        self._entries.clear()
        self.used = 0


# --------------------------------------------------------------------------- host
class _Pool:
    """First-fit allocator over one byte range; free neighbours are merged."""

    ALIGN = 64

    def __init__(self, size: int):
        self.size = size
        self.free: list[list[int]] = [[0, size]]  # [offset, length], sorted by offset

    @classmethod
    def span(cls, n: int) -> int:
        """The bytes an entry of ``n`` bytes takes: rounded up to ``ALIGN``, at least ``ALIGN``."""
        return -(-n // cls.ALIGN) * cls.ALIGN or cls.ALIGN

    def alloc(self, n: int) -> int | None:
        """Offset of a free span for ``n`` bytes (first fit), or ``None`` when none is large enough."""
        n = self.span(n)
        for i, (off, length) in enumerate(self.free):
            if length >= n:
                if length == n:
                    del self.free[i]
                else:
                    self.free[i] = [off + n, length - n]
                return off
        return None

    def release(self, off: int, n: int) -> None:
        """Return the span that ``alloc(n)`` gave at ``off``."""
        n = self.span(n)
        i = 0
        while i < len(self.free) and self.free[i][0] < off:
            i += 1
        self.free.insert(i, [off, n])
        if i + 1 < len(self.free) and off + n == self.free[i + 1][0]:  # merge with the next
            self.free[i][1] += self.free.pop(i + 1)[1]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == off:  # and with the previous
            self.free[i - 1][1] += self.free.pop(i)[1]

    def largest(self) -> int:
        """Bytes of the largest free span."""
        return max((length for _, length in self.free), default=0)


class HostTier(Tier):
    """Chunks in one host memory pool, allocated once (on first use) and freed on ``close``.

    The pool comes from the backend's ``host_buffer`` (pinned where the backend uses a GPU,
    for fast asynchronous device copies), every page touched once at allocation so later
    copies run at memcpy speed. A put of backend arrays is one ``pack_to_host`` per chunk and
    may still be copying when it returns: every read of the pool waits for it (``settle``),
    and the store calls ``settle`` once at the end of each put.
    """

    kind = "host"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._buf: np.ndarray | None = None
        self._release = None
        self.pinned = False
        self._pool = _Pool(capacity)
        self._entries: dict[bytes, tuple[serde.Header, int, int]] = {}
        self._unsettled = None  # a backend whose copies into the pool may still run
        self._copies: list = []  # futures of host copies into the pool still running

    def _ensure(self, be=None) -> np.ndarray:
        """The pool (``uint8``, ``capacity`` bytes), allocated now if needed; raises ``TierError``."""
        if self._buf is None:
            if be is None:
                from .backends import get_backend

                be = get_backend("numpy")
            try:
                buf = be.host_buffer(self.capacity)  # pages faulted in (and pinned) once, here
            except Exception as e:  # noqa: BLE001 - MemoryError, a framework's out-of-memory RuntimeError
                # A TierError is what the store handles (counts it, tries the next tier);
                # anything else would raise out of Store.put into the caller.
                raise TierError(f"host pool of {self.capacity} bytes could not be allocated: "
                                f"{type(e).__name__}: {e}") from e
            self._buf = np.asarray(buf).view(np.uint8).reshape(-1)
            self.pinned = bool(be.pins_host_memory())
        return self._buf

    def settle(self) -> None:
        """Wait until the copies into the pool that puts started have finished."""
        copies, self._copies = self._copies, []
        for f in copies:
            f.result()
        if self._unsettled is not None:
            be, self._unsettled = self._unsettled, None
            sync(be)

    def has(self, key: bytes) -> bool:
        """Whether the tier holds ``key`` (32 bytes)."""
        return key in self._entries

    def keys(self) -> list[bytes]:
        """The keys the tier holds, in insertion order."""
        return list(self._entries)

    def can_alloc(self, nbytes: int) -> bool:
        """Whether one free span of the pool takes ``nbytes`` now (free bytes may be fragmented)."""
        return self._pool.largest() >= _Pool.span(nbytes)

    def put(self, key: bytes, header: serde.Header, arrays: list, be=None, copier=None) -> int:
        """Copy ``arrays`` (numpy or ``be`` arrays, or one bytes-like payload) into the pool.

        ``copier``: an executor to run the copies of numpy arrays on (they release the GIL,
        so the next chunk's copy overlaps this one's); ``settle`` waits for them. Raises
        ``TierError`` when no free span is large enough.
        """
        buf = self._ensure(be)
        nbytes = header.payload_nbytes
        off = self._pool.alloc(nbytes)
        if off is None:
            raise TierError(f"host pool has no free span of {nbytes} bytes")
        try:
            if not isinstance(arrays, list):  # a packed payload (from disk or remote)
                buf[off:off + nbytes] = np.frombuffer(memoryview(arrays).cast("B"), np.uint8)
            elif isinstance(arrays[0], np.ndarray):
                views = serde.split_payload(header, buf[off:off + nbytes])
                if copier is not None:
                    self._copies.append(copier.submit(copy_all, views, arrays))
                else:
                    copy_all(views, arrays)
            else:
                self._unsettled = be
                be.pack_to_host(arrays, buf[off:off + nbytes])  # one copy per chunk, maybe asynchronous
        except BaseException:
            self.settle()  # no copy may still land in a span given back
            self._pool.release(off, nbytes)
            raise
        self._entries[key] = (header, off, nbytes)
        self.used += nbytes
        return nbytes

    def get(self, key: bytes):
        """``(header, arrays)``: numpy views of the pool, valid until the entry is removed."""
        e = self._entries.get(key)
        if e is None:
            return None
        self.settle()
        header, off, n = e
        return header, serde.split_payload(header, self._buf[off:off + n])

    def payload(self, key: bytes) -> memoryview:
        """The entry's packed payload (a view of the pool)."""
        self.settle()
        _, off, n = self._entries[key]
        return memoryview(self._buf[off:off + n])

    def remove(self, key: bytes) -> int:
        """Drop ``key``'s entry; returns the bytes it took (0 when absent)."""
        e = self._entries.pop(key, None)
        if e is None:
            return 0
        self.settle()  # the span may be handed out again: no earlier copy may still land in it
        self._pool.release(e[1], e[2])
        self.used -= e[2]
        return e[2]

    def close(self) -> None:
        self.settle()  # no copy may land in memory being freed
        self._entries.clear()
        self._pool = _Pool(self.capacity)
        self.used = 0
        self._buf = None  # the one reference: the pool (pinned or not) is freed here


# --------------------------------------------------------------------------- disk and remote
class _SharedTier(Tier):
    """Byte bookkeeping of a tier other processes share (disk, remote): entry sizes we know of.

    The store's writer and reader threads update it concurrently, so the counts change under
    a lock (``used += ...`` is a read-modify-write that threads could interleave).
    """

    shared = True

    def __init__(self, capacity: int | None, enc_key: bytes | None):
        super().__init__(capacity)
        self.enc_key = enc_key
        self._sizes: dict[bytes, int] = {}
        self._acct = threading.Lock()

    def keys(self) -> list[bytes]:
        """The keys this process wrote, read or found at open (others may exist)."""
        with self._acct:
            return list(self._sizes)

    def knows(self, key: bytes) -> bool:
        """Whether this process has written or read ``key`` here (no I/O)."""
        return key in self._sizes

    def _account(self, key: bytes, size: int) -> None:
        """``key`` is now an entry of ``size`` bytes."""
        with self._acct:
            self.used += size - self._sizes.get(key, 0)
            self._sizes[key] = size

    def _forget(self, key: bytes) -> int:
        with self._acct:
            size = self._sizes.pop(key, 0)
            self.used -= size
        return size

    def read(self, key: bytes):
        """The raw frame bytes (a ``uint8`` array), or ``None`` when there is no such entry."""
        raise NotImplementedError

    def get(self, key: bytes, namespace: bytes):
        """``(header, payload)`` or ``None``.

        Raises ``serde.FrameError`` for a bad entry (and ``TierError`` for an unreachable server).
        """
        raw = self.read(key)
        if raw is None:
            self._forget(key)
            return None
        return serde.decode(raw, namespace, key, self.enc_key)


class DiskTier(_SharedTier):
    """One file per chunk under ``path`` (``<key[:2]>/<key>.lmkv``), each a ``serde`` frame.

    A file is written under a temporary name, fsync'd and renamed, so readers (in this or
    another process) see either no entry or a whole one. The byte count is what this
    process wrote or found at open; files that other processes add are found on ``get``.
    """

    kind = "disk"
    SUFFIX = ".lmkv"

    def __init__(self, path: str, capacity: int | None, enc_key: bytes | None = None, fsync: bool = True):
        super().__init__(capacity, enc_key)
        self.path = os.path.abspath(path)
        self.fsync = fsync
        os.makedirs(self.path, exist_ok=True)
        self._scan()

    @property
    def name(self) -> str:
        return f"disk:{self.path}"

    def _scan(self) -> None:
        with os.scandir(self.path) as subs:
            subdirs = [sub.path for sub in subs if sub.is_dir() and len(sub.name) == 2]
        for sub in subdirs:
            with os.scandir(sub) as files:
                files = list(files)
            for f in files:
                if f.name.endswith(self.SUFFIX):
                    try:
                        key = bytes.fromhex(f.name[:-len(self.SUFFIX)])
                        self._sizes[key] = f.stat().st_size
                    except (ValueError, OSError):
                        continue
                elif f.name.endswith(".tmp"):  # a writer that died: remove leftovers older than an hour
                    try:
                        if time.time() - f.stat().st_mtime > 3600:
                            os.unlink(f.path)
                    except OSError:
                        pass
        self.used = sum(self._sizes.values())

    def file(self, key: bytes) -> str:
        """The path of ``key``'s file (32-byte key; its hex name, under its first two hex digits)."""
        h = key.hex()
        return os.path.join(self.path, h[:2], h + self.SUFFIX)

    def has(self, key: bytes) -> bool:
        """Whether the entry exists (this process knows it, or its file is there)."""
        return key in self._sizes or os.path.exists(self.file(key))

    def put(self, key: bytes, header: serde.Header, payload) -> int:
        """Write the frame of ``payload``; raises ``OSError`` (disk full, I/O error)."""
        pieces = serde.encode(header, payload, self.enc_key)
        final = self.file(key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = f"{final}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            views = [memoryview(p).cast("B") for p in pieces]
            while views:
                n = os.writev(fd, views)
                while views and n >= views[0].nbytes:
                    n -= views[0].nbytes
                    views.pop(0)
                if views:
                    views[0] = views[0][n:]
            if self.fsync:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, final)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        size = serde.frame_size(pieces)
        self._account(key, size)
        return size

    def _open(self, key: bytes) -> int | None:
        """A descriptor of ``key``'s file set for a sequential read, or ``None`` (then forgotten)."""
        try:
            fd = os.open(self.file(key), os.O_RDONLY)
        except FileNotFoundError:
            self._forget(key)
            return None
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:  # only a hint: a filesystem that refuses it is still read
                pass
        return fd

    def read(self, key: bytes) -> np.ndarray | None:
        """The raw frame bytes (``uint8``), or ``None`` when there is no such file."""
        fd = self._open(key)
        if fd is None:
            return None
        try:
            size = os.fstat(fd).st_size
            buf = np.empty(size, np.uint8)
            got = _readv_all(fd, [memoryview(buf)])
        finally:
            os.close(fd)
        if key not in self._sizes:  # a file another process wrote
            self._account(key, size)
        return buf[:got]

    def read_into(self, key: bytes, namespace: bytes, segments: tuple, runs: list):
        """Read ``key``'s payload straight into the byte views ``runs`` (see ``serde.read_into``).

        Returns the header; ``None`` when there is no such file; ``False`` when the frame
        cannot be read this way (encrypted, other segments). Raises ``serde.FrameError``.
        """
        if self.enc_key is not None:
            return False
        fd = self._open(key)
        if fd is None:
            return None
        try:
            def read(n, views=None):
                if views is None:
                    return os.read(fd, n)
                return _readv_all(fd, views)
            header = serde.read_into(read, namespace, key, segments, runs)
        finally:
            os.close(fd)
        return False if header is None else header

    def remove(self, key: bytes) -> int:
        """Delete ``key``'s file; returns the bytes this tier counted for it."""
        try:
            os.unlink(self.file(key))
        except FileNotFoundError:
            pass
        return self._forget(key)


def _readv_all(fd: int, views: list) -> int:
    """``readv`` into ``views`` until they are full or the file ends; returns the bytes read."""
    views = [v for v in views if v.nbytes]
    total = 0
    while views:
        n = os.readv(fd, views[:1024])  # IOV_MAX on Linux and macOS
        if n == 0:
            break
        total += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total


# --------------------------------------------------------------------------- remote
class RemoteTier(_SharedTier):
    """Chunks on a Redis-protocol server (Redis, Valkey, Redis Cluster) through redis-py.

    ``url``: ``redis://host:port/db``, ``rediss://`` (TLS), ``valkey://`` (same as redis://)
    or ``redis+cluster://host:port`` (Redis Cluster). Query options: ``capacity=16GB`` (our
    own limit; by default the server's maxmemory policy rules), ``timeout=1.0`` (seconds per
    socket operation), ``connections=8`` and ``part=4MiB``.

    A frame is stored as parts of ``part`` bytes on ``connections`` connections in parallel:
    parts ``1..n-1`` first, part 0 (which starts with the frame's header) last, so a reader
    that finds part 0 finds a whole entry; a part lost later fails the checksum (a miss).
    After a connection error or timeout the tier is considered down for a short backoff
    (0.25 s doubling to 2 s): operations fail at once instead of waiting on every call,
    and redis-py reconnects on the first call after it.
    """

    kind = "remote"
    PREFIX = b"lmkv:"

    def __init__(self, url: str, enc_key: bytes | None = None):
        import redis  # lazily: only stores with a remote tier need redis-py

        u = urlparse(url)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        known = {"capacity", "timeout", "connections", "part"}
        if set(q) - known:
            raise ValueError(f"unknown option(s) {sorted(set(q) - known)} in remote url {url!r}; "
                             f"accepted: {sorted(known)}")
        super().__init__(parse_size(q["capacity"], "capacity") if "capacity" in q else None, enc_key)
        try:
            self.timeout = float(q.get("timeout", 1.0))
        except ValueError:
            raise ValueError(f"timeout must be a number of seconds > 0 in remote url {url!r}, "
                             f"got {q['timeout']!r}") from None
        # Measured on loopback (16-core host, 2 GiB of 32 MiB chunks): 8 connections and 4 MiB
        # parts read 2.2 GB/s and write 1.9, against 1.9 / 1.9 with 4 x 8 MiB.
        conns = q.get("connections", "8")
        self.connections = int(conns) if conns.isdigit() else 0
        self.part = parse_size(q.get("part", "4MiB"), "part")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0 in remote url {url!r}, got {self.timeout!r}")
        if self.connections < 1:
            raise ValueError(f"connections must be an integer >= 1 in remote url {url!r}, got {conns!r}")
        # geturl() writes unix:///path as unix:/path, which redis-py refuses.
        self.url = f"unix://{u.path}" if u.scheme.lower() == "unix" else u._replace(query="").geturl()
        self._redis = redis
        scheme = u.scheme.lower()
        from redis._parsers.encoders import Encoder
        from redis.connection import PythonRespSerializer

        # redis-py's hiredis packer copies every value (twice for a memoryview); the Python
        # packer sends large values as they are. Replies are still parsed by hiredis.
        packer = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
        opts = dict(socket_timeout=self.timeout, socket_connect_timeout=min(self.timeout, 0.5),
                    socket_read_size=1 << 20, retry_on_timeout=False, health_check_interval=0,
                    command_packer=packer)
        plain = self.url.replace(u.scheme + "://", "redis://" if scheme in ("valkey", "redis+cluster") else
                                 "rediss://" if scheme in ("valkeys", "rediss+cluster") else u.scheme + "://", 1)
        if scheme.endswith("+cluster"):
            from redis.cluster import RedisCluster

            self._client = RedisCluster.from_url(plain, **opts)
            self._direct = False  # the cluster client picks the node: replies go through redis-py
        elif scheme in ("redis", "rediss", "valkey", "valkeys", "unix"):
            # Readers ahead (the store's prefetch threads) and part transfers share the pool: a
            # blocking pool waits for a free connection instead of failing with "too many".
            pool = redis.BlockingConnectionPool.from_url(plain, max_connections=2 * self.connections + 8,
                                                          timeout=max(5.0, 5 * self.timeout), **opts)
            self._client = redis.Redis(connection_pool=pool)
            self._direct = scheme in ("redis", "valkey", "unix")  # plain sockets (recvmsg_into has no TLS form)
        else:
            raise ValueError(f"remote url must start with redis://, rediss://, valkey:// or redis+cluster://, "
                             f"got {url!r}")
        self._exec = ThreadPoolExecutor(self.connections, thread_name_prefix="lmcache-remote")
        self._down_until = 0.0
        self._backoff = 0.25
        self._closed = False

    @property
    def name(self) -> str:
        return f"remote:{self.url}"

    # -- availability
    def available(self) -> bool:
        """Whether the tier is open and not in a backoff after a connection failure."""
        return not self._closed and time.monotonic() >= self._down_until

    def _failed(self) -> None:
        self._down_until = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, 2.0)

    def _ok(self) -> None:
        self._backoff = 0.25

    def _call(self, fn):
        """Run ``fn()``; a connection problem marks the tier down and raises ``TierError``."""
        if not self.available():
            raise TierError(f"{self.name} is unavailable (retrying after a backoff)")
        try:
            out = fn()
        except (self._redis.ConnectionError, self._redis.TimeoutError, OSError) as e:
            self._failed()
            raise TierError(f"{self.name}: {type(e).__name__}: {e}") from None
        except self._redis.RedisError as e:  # a server refusal (out of memory, ...): the server is up
            raise TierError(f"{self.name}: {type(e).__name__}: {e}") from None
        self._ok()
        return out

    def _k(self, key: bytes, i: int) -> bytes:
        return self.PREFIX + key.hex().encode() + (b"" if i == 0 else b":%d" % i)

    # -- operations
    def has(self, key: bytes) -> bool:
        """Whether the server holds ``key`` (``False`` when unreachable)."""
        return bool(self.has_many([key])[0])

    def has_many(self, keys: list[bytes]) -> list[bool]:
        """One round trip: which of ``keys`` the server holds (all ``False`` when unreachable)."""
        if not keys:
            return []
        try:
            def run():
                p = self._client.pipeline(transaction=False)
                for k in keys:
                    p.exists(self._k(k, 0))
                return p.execute()
            return [bool(x) for x in self._call(run)]
        except TierError:
            return [False] * len(keys)

    def _parts(self, pieces: list) -> list:
        """Cut the frame into ``part``-sized values, each a list of byte views of ``pieces`` (no copy)."""
        views = [memoryview(p).cast("B") for p in pieces]
        total = sum(v.nbytes for v in views)
        parts, cur, cur_n = [], [], 0
        for v in views:
            off = 0
            while off < v.nbytes:
                take = min(self.part - cur_n, v.nbytes - off)
                cur.append(v[off:off + take])
                cur_n += take
                off += take
                if cur_n == self.part:
                    parts.append(cur)
                    cur, cur_n = [], 0
        if cur:
            parts.append(cur)
        assert sum(x.nbytes for p in parts for x in p) == total
        return parts

    def _set_from(self, name: bytes, views: list) -> None:
        """``SET name`` to the bytes of ``views`` sent as they are (a gather write: no joined copy).

        The reply is read by redis-py (a server refusal raises its ``ResponseError``). The
        connection is dropped on any error.
        """
        n = sum(v.nbytes for v in views)
        pool = self._client.connection_pool
        conn = pool.get_connection()
        done = False
        try:
            conn.send_packed_command([b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(name), name, n),
                                      *views, b"\r\n"], check_health=False)
            reply = conn.read_response()
            done = True
        except self._redis.ResponseError:
            done = True  # the server refused the value (out of memory, ...): the connection is fine
            raise
        finally:
            if not done:
                conn.disconnect()
            pool.release(conn)
        if reply not in (b"OK", "OK", True):
            raise self._redis.ResponseError(f"unexpected reply to SET: {reply!r}")

    def _parallel(self, fn, items) -> list:
        if len(items) == 1:
            return [fn(items[0])]
        futs = [self._exec.submit(fn, it) for it in items]
        out, err = [], None
        for f in futs:
            try:
                out.append(f.result())
            except BaseException as e:  # wait for all before raising: no part write left running
                err = err or e
        if err is not None:
            raise err
        return out

    def put(self, key: bytes, header: serde.Header, payload) -> int:
        """Store the frame of ``payload``; raises ``TierError`` (unreachable, timeout, server full)."""
        pieces = serde.encode(header, payload, self.enc_key)
        parts = self._parts(pieces)
        c = self._client

        def setter(ij):
            i, p = ij
            if self._direct:
                return self._set_from(self._k(key, i), p)
            return c.set(self._k(key, i), p[0] if len(p) == 1 else b"".join(p))

        def run():
            rest = list(enumerate(parts))[1:]
            # Several parts per connection: split the remaining parts over the connections.
            self._parallel(setter, rest)
            setter((0, parts[0]))
        self._call(run)
        size = serde.frame_size(pieces)
        self._account(key, size)
        return size

    def read(self, key: bytes) -> np.ndarray | None:
        """The whole frame (``uint8``), or ``None`` when the server has no part 0.

        Raises ``serde.FrameError`` when part 0 is not the start of a frame or gives lengths
        that its header contradicts (a corrupt length must not size the buffer).
        """
        c = self._client

        def run():
            first = c.get(self._k(key, 0))
            if first is None:
                return None
            total = serde.frame_length(first)
            part = len(first)
            if total <= part:
                return np.frombuffer(first, np.uint8)
            try:
                out = np.empty(total, np.uint8)
            except MemoryError:  # lengths not checkable against a header beyond part 0
                raise serde.FrameError(f"frame length {total} is corrupt (no memory for it)") from None
            out[:part] = np.frombuffer(first, np.uint8)
            idx = list(range(1, -(-total // part)))

            def getter(i):
                v = c.get(self._k(key, i))
                start = i * part
                if v is None or start + len(v) > total:
                    return 0
                out[start:start + len(v)] = np.frombuffer(v, np.uint8)
                return len(v)
            got = part + sum(self._parallel(getter, idx))
            return out if got == total else out[:got]  # a short frame fails decode: a miss
        return self._call(run)

    def read_into(self, key: bytes, namespace: bytes, segments: tuple, runs: list):
        """Read ``key``'s payload straight into the byte views ``runs``, the parts in parallel.

        Returns the header; ``None`` when the server has no such entry; ``False`` when the
        frame cannot be read this way (encrypted, other segments). Raises
        ``serde.FrameError`` (bad, short or foreign entry) or ``TierError``.
        """
        if self.enc_key is not None:
            return False
        c = self._client
        dst = [np.frombuffer(r, np.uint8) for r in runs]
        starts = np.cumsum([0] + [d.nbytes for d in dst]).tolist()
        # Socket scatter pays off for large runs (a full-precision cache: 64 KiB per head);
        # many small ones (scales of a quantized cache) go faster through one buffer.
        direct = self._direct and starts[-1] >= 32768 * len(dst)

        def run():
            f = {}  # the frame's geometry, known once part 0's header is parsed
            trailer = np.zeros(serde.TRAILER_SIZE, np.uint8)

            def views_for(off: int, n: int) -> list:
                """Byte views where frame bytes ``off:off + n`` past the header go (payload runs, then the trailer)."""
                head_end, pay_end = f["head_end"], f["pay_end"]
                out, lo, hi = [], max(off, head_end), min(off + n, pay_end)
                pos = lo - head_end
                while lo < hi:
                    r = bisect.bisect_right(starts, pos) - 1
                    within = pos - starts[r]
                    k = min(dst[r].nbytes - within, hi - lo)
                    out.append(memoryview(dst[r])[within:within + k])
                    lo, pos = lo + k, pos + k
                if off + n > pay_end:
                    out.append(memoryview(trailer)[max(off, pay_end) - pay_end:off + n - pay_end])
                return out

            def place(off: int, data) -> None:
                """Copy frame bytes ``data`` found at frame offset ``off`` to where they belong."""
                src = memoryview(data).cast("B")
                pos = max(off, f["head_end"]) - off
                for v in views_for(off, src.nbytes):
                    v[:] = src[pos:pos + v.nbytes]
                    pos += v.nbytes

            def opened(head, part: int) -> bool:
                """Parse part 0's start ``head`` (``part`` bytes long); ``False`` when it cannot go this way."""
                o = serde.open_head(head, namespace, key, segments)
                if o is None:
                    return False
                f["header"], f["head_end"], f["kind"], plen = o
                f["pay_end"] = f["head_end"] + plen
                f["total"], f["part"] = f["pay_end"] + serde.TRAILER_SIZE, part
                f["head"] = bytes(memoryview(head)[:f["head_end"]])
                if part > f["total"]:
                    raise serde.FrameError(f"remote entry of {part} bytes is longer than its {f['total']}-byte frame")
                return True

            if direct:
                # Part 0 too goes from the socket into the runs: only its first bytes (the
                # header, a few KiB) pass through a scratch buffer.
                def views0(n, head):
                    if len(head) < min(n, serde.PREFIX_SIZE) or not opened(head, n):
                        return None  # a header past the peek, or a frame to read another way
                    place(0, head)
                    return views_for(len(head), n - len(head))
                got0 = self._get_into(self._k(key, 0), views0, peek=self.PEEK)
            # part 0 as one reply: not direct, or no entry / one to read another way above
            if not direct or (got0 is None and "header" not in f):
                first = c.get(self._k(key, 0))
                if first is None:
                    return None
                if not opened(first, len(first)):
                    return False
                place(0, first)
            total, part = f["total"], f["part"]

            def getter(i):
                if direct:
                    got = self._get_into(self._k(key, i),
                                         lambda n, _h: views_for(i * part, n) if i * part + n <= total else None)
                    return got or 0
                v = c.get(self._k(key, i))
                if v is None or i * part + len(v) > total:
                    return 0
                place(i * part, v)
                return len(v)
            got = min(part, total) + sum(self._parallel(getter, list(range(1, -(-total // part)))))
            if got != total:
                raise serde.FrameError("remote entry is missing parts (evicted by the server?)")
            serde.check_runs(f["head"], f["kind"], runs, trailer)
            return f["header"]
        return self._call(run)

    #: Bytes of part 0 received into a scratch buffer to parse the header (it is a few KiB).
    PEEK = 1 << 16

    def _get_into(self, name: bytes, views_for, peek: int = 0) -> int | None:
        """``GET name`` with the value received straight into ``views_for(length, head)`` (socket scatter).

        redis-py sends the command and owns the connection; only this reply's bytes are read
        here, from the socket into their destination, instead of through the parser's buffers
        and a ``bytes`` object (two copies fewer). With ``peek``, the value's first ``peek``
        bytes are received into a scratch buffer first and passed as ``head``; the views then
        cover the rest. Returns the length, ``None`` for a missing key or a length
        ``views_for`` refuses. The connection is dropped on any error.
        """
        pool = self._client.connection_pool
        conn = pool.get_connection()
        done = False
        try:
            conn.send_command("GET", name)
            sock = conn._sock
            buf = b""
            while b"\r\n" not in buf:
                more = sock.recv(64 - len(buf) if len(buf) < 64 else 1)
                if not more:
                    raise ConnectionError("connection closed by the server")
                buf += more
            line, _, rest = buf.partition(b"\r\n")
            if line in (b"$-1", b"_"):  # no such key (RESP2, RESP3)
                done = True
                return None
            if not line.startswith(b"$"):
                raise self._redis.ResponseError(line.decode(errors="replace"))
            n = int(line[1:])
            rest = memoryview(rest)
            head = b""
            if peek:
                scratch = bytearray(min(n, peek))
                k = min(rest.nbytes, len(scratch))
                scratch[:k] = rest[:k]
                rest = rest[k:]
                self._recv_views(sock, [memoryview(scratch)[k:]])
                head = memoryview(scratch)
            views = views_for(n, head)
            if views is None:  # not what we expect: drain it, then report a miss
                left = n - len(head)
                views = [memoryview(bytearray(left))] if left < (1 << 30) else None
                if views is None:
                    return None
                result = None
            else:
                result = n
            tail = bytearray(2)
            views = [v for v in views if v.nbytes] + [memoryview(tail)]
            while rest.nbytes and views:  # bytes that came with the length line
                k = min(rest.nbytes, views[0].nbytes)
                views[0][:k] = rest[:k]
                rest = rest[k:]
                views[0] = views[0][k:]
                if not views[0].nbytes:
                    views.pop(0)
            self._recv_views(sock, views)
            if bytes(tail) != b"\r\n":
                raise ConnectionError("malformed reply")
            done = True
            return result
        finally:
            if not done:
                conn.disconnect()
            pool.release(conn)

    @staticmethod
    def _recv_views(sock, views: list) -> None:
        """Fill the byte views ``views`` from ``sock`` in order (``recvmsg_into``, 64 views a call)."""
        views = [v for v in views if v.nbytes]
        i = 0
        while i < len(views):
            k = sock.recvmsg_into(views[i:i + 64])[0]
            if k == 0:
                raise ConnectionError("connection closed by the server")
            while i < len(views) and k >= views[i].nbytes:
                k -= views[i].nbytes
                i += 1
            if k:
                views[i] = views[i][k:]

    def remove(self, key: bytes) -> int:
        """Delete ``key``'s parts (best effort: the server may be down); returns the bytes counted for it."""
        size = self._sizes.get(key, 0)
        n = -(-size // self.part) if size else 1

        def run():
            return self._client.delete(*[self._k(key, i) for i in range(n)])
        try:
            self._call(run)
        except TierError:
            pass
        return self._forget(key)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._exec.shutdown(wait=False, cancel_futures=True)
        try:  # closing the sockets also wakes a thread blocked on one
            if hasattr(self._client, "connection_pool"):
                self._client.connection_pool.disconnect()
            self._client.close()
        except Exception:
            pass


def make_tier(spec: Any, enc_key: bytes | None = None) -> Tier:
    """Build a tier from ``"device:4GB"``, ``"host:16GB"``, ``"disk:/path:200GB"``, a redis url or a ``Tier``."""
    if isinstance(spec, Tier):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a tier must be a string like 'host:16GB' or a Tier, got {type(spec).__name__}")
    kind, _, rest = spec.partition(":")
    kind = kind.lower()
    if kind in ("device", "host"):
        cap = parse_size(rest, f"the capacity in {spec!r}")
        return DeviceTier(cap) if kind == "device" else HostTier(cap)
    if kind == "disk":
        path, sep, cap = rest.rpartition(":")
        if not sep or not path:
            raise ValueError(f"a disk tier is 'disk:<directory>:<capacity>', got {spec!r}")
        return DiskTier(path, parse_size(cap, f"the capacity in {spec!r}"), enc_key)
    if kind in ("redis", "rediss", "valkey", "valkeys", "redis+cluster", "rediss+cluster", "unix"):
        return RemoteTier(spec, enc_key)
    raise ValueError(f"unknown tier {spec!r}: expected 'device:<size>', 'host:<size>', 'disk:<dir>:<size>' "
                     f"or a redis:// / valkey:// / redis+cluster:// url")
