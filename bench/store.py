"""Store throughput per tier, next to the raw ceiling of the same bytes measured in the same run.

Workload (defaults): 64 chunks of 256 tokens of a Llama-3-8B-shaped KV (32 layers x K/V x
8 KV heads x 128, float16): 2 GiB, kept in full precision (``--bits none``) so the bytes
are the model's; ``--bits 4`` stores the 4-bit blocks instead. Per tier (each measured in
a store holding only that tier):

* device (``--device cuda``): put/get against a device-to-device copy of the same arrays;
* host: put/get against memcpy of the same bytes into a touched buffer;
* disk: put (until fsync'd) and cold get (page cache dropped) against writing each chunk's
  bytes to its own file with fsync, and reading those files back cold;
* remote: put (until the server has it) and get against redis-py SET/GET of each chunk's
  bytes on one connection, sequentially, to a server this script starts on loopback
  (``--remote-unix`` measures a unix socket to it as well).

With ``--device cuda`` the torch backend's host hooks move the chunks (pinned pool, one
gather kernel and one device-to-host copy per chunk; see ``Backend.pack_to_host``) and the
host ceiling is a device-to-host / host-to-device copy of the same arrays into the same
kind of pinned memory. The host rows also give CPU seconds per byte against memcpy's,
which a machine shared with other jobs disturbs less than wall time.

    python bench/store.py [--device cuda] [--chunks 64] [--tiers host,disk,remote]

Writes bench/results/store-<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from _common import cpu_name  # noqa: E402

import lmcache  # noqa: E402
from lmcache.serde import _np_dtype as serde_dtype  # noqa: E402
from lmcache.store import Store, export_chunk  # noqa: E402


def short(name: str) -> str:
    name = re.sub(r"\(R\)|\(TM\)|CPU|Processor|@.*|[0-9]+-Core", "", name)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def drop_caches(paths: list[str]) -> str:
    """Drop the page cache: /proc/sys/vm/drop_caches if permitted, else posix_fadvise(DONTNEED)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise(DONTNEED)"


def files_under(d: str) -> list[str]:
    return [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]


class Workload:
    def __init__(self, args, be_name: str, device: str | None):
        self.args = args
        self.tokens = args.chunks * args.chunk
        self.be_name, self.device = be_name, device
        rng = np.random.default_rng(0)
        self.ids = rng.integers(0, 128000, self.tokens)
        shape = (1, args.kv_heads, self.tokens, args.head_dim)
        bits = None if args.bits == "none" else int(args.bits)
        self.cache_kw = dict(backend=be_name, device=device, bits=bits, group_size=64, residual=128)
        self.cache = lmcache.Cache(**self.cache_kw)
        self.layers = []  # the per-layer K and V arrays (contiguous), the raw copies' source
        base = rng.standard_normal((args.kv_heads, args.chunk, args.head_dim)).astype(args.dtype)
        be = None
        for i in range(args.layers):
            # Cheap distinct data: a tiled random block times a per-layer factor.
            k = np.tile(base, (1, args.chunks, 1)).reshape(shape) * np.asarray(1 + i / 64, args.dtype)
            v = -k
            if be_name != "numpy":
                be = self.cache.backend or lmcache.backends.get_backend(be_name, device)
                k, v = be.from_numpy(k, args.dtype, device), be.from_numpy(v, args.dtype, device)
            self.cache.update(i, k, v)
            self.layers += [k, v]
        self.be = self.cache.backend
        self.chunk_bytes = [int(sum(self.be.nbytes(a) for a in export_chunk(self.cache, i * args.chunk,
                                                                            (i + 1) * args.chunk)))
                            for i in range(args.chunks)]
        self.total = sum(self.chunk_bytes)

    def fresh(self):
        return lmcache.Cache(**self.cache_kw)

    def chunk_payloads(self):
        """Each chunk's bytes as one contiguous host buffer (what the raw disk/remote copies move)."""
        for i in range(self.args.chunks):
            arrs = export_chunk(self.cache, i * self.args.chunk, (i + 1) * self.args.chunk)
            buf = np.empty(self.chunk_bytes[i], np.uint8)
            off = 0
            for a in arrs:
                h = a if isinstance(a, np.ndarray) else self.be.to_host(a)
                n = h.nbytes
                buf[off:off + n] = np.ascontiguousarray(h).view(np.uint8).reshape(-1)
                off += n
            yield buf


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def sync(be) -> None:
    """Wait for the device: copies to and from a GPU may still be running when a call returns."""
    if be is not None:
        be.synchronize()  # the backend's side stream of host copies
    if getattr(be, "name", None) == "torch" and "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # and everything else queued on the device


# The process CPU seconds (all threads) of the last timed() call. On a machine shared with
# other jobs the wall time depends on the CPU share one gets; CPU time per byte does less.
LAST_CPU_S = [0.0]


def timed(fn, be=None) -> float:
    """Wall seconds of ``fn()`` (device work included); its process CPU seconds go to ``LAST_CPU_S``."""
    sync(be)
    c, t = time.process_time(), time.perf_counter()
    fn()
    sync(be)
    LAST_CPU_S[0] = time.process_time() - c
    return time.perf_counter() - t


def run_store(w: Workload, spec: str, before_get=None, **kw) -> dict:
    """put (until flushed) and get through a fresh store holding only ``spec``."""
    st = Store(spec, chunk_size=w.args.chunk, namespace="bench-llama3-8b-shape", backend=w.be, **kw)
    dt_put = timed(lambda: (st.put(w.ids, w.cache), st.flush()), w.be)
    cpu_put = LAST_CPU_S[0]
    assert st.lookup(w.ids) == w.tokens, "not every chunk was stored"
    if before_get is not None:
        before_get()
    c = w.fresh()
    dt_get = timed(lambda: st.get(w.ids, c), w.be)
    cpu_get = LAST_CPU_S[0]
    assert c.seq_len(0) == w.tokens, f"get loaded {c.seq_len(0)} of {w.tokens} tokens: {st.stats()}"
    for i in (0, w.args.chunks // 2, w.args.chunks - 1):  # the bytes came back as they went
        a0, a1 = (export_chunk(x, i * w.args.chunk, (i + 1) * w.args.chunk) for x in (w.cache, c))
        for p, q in zip(a0, a1):
            p, q = (y if isinstance(y, np.ndarray) else w.be.to_numpy(y) for y in (p, q))
            assert np.array_equal(p, q), f"chunk {i} came back different from {spec}"
    stats = st.stats()
    st.close()
    c = None  # noqa: F841 - frees the loaded cache
    gc.collect()
    return {"put_gbps": gbps(w.total, dt_put), "get_gbps": gbps(w.total, dt_get),
            "put_s": dt_put, "get_s": dt_get, "put_cpu_s": cpu_put, "get_cpu_s": cpu_get,
            "errors": stats["errors"], "put_failures": stats["put_failures"]}


def best_of(results: list[dict]) -> dict:
    """The fastest put and the fastest get among repeats (each repeat a fresh store)."""
    out = dict(results[0])
    for key in ("put", "get"):
        r = max(results, key=lambda d: d[f"{key}_gbps"])  # noqa: B023
        out[f"{key}_gbps"], out[f"{key}_s"] = r[f"{key}_gbps"], r[f"{key}_s"]
        out[f"{key}_cpu_s"] = r[f"{key}_cpu_s"]
    out["errors"] = sum(d["errors"] for d in results)
    out["put_failures"] = sum(d["put_failures"] for d in results)
    out["repeats"] = len(results)
    return out


def bench_host(w: Workload, repeat: int) -> dict:
    """Raw memcpy and the store, interleaved ``repeat`` times: both see the same machine load."""
    # The raw copies move the same bytes: the cache's K/V arrays in full precision, else each
    # chunk's compressed payload as one contiguous array.
    be = w.be
    sources = w.layers if w.args.bits == "none" else \
        [be.from_numpy(p, None, w.device) for p in w.chunk_payloads()]
    srcs = sources if w.be_name == "numpy" else None
    # The same host memory the store's pool gets: pinned where the backend uses a GPU.
    dst = be.host_buffer(w.total)
    views, off = [], 0
    for a in sources:
        n = be.nbytes(a)
        views.append(dst[off:off + n].view(serde_dtype(be.dtype_name(a))).reshape(tuple(a.shape)))
        off += n
    if srcs is None:  # a device backend: the ceiling is a device-to-host (and back) copy of whole arrays
        back = [be.empty(tuple(a.shape), be.dtype_name(a), w.device) for a in sources]
    raw, raw_back, runs, raw_cpu = [], [], [], []
    for _ in range(repeat):
        if srcs is not None:
            raw.append(timed(lambda: [np.copyto(d, s) for d, s in zip(views, srcs)]))
            raw_cpu.append(LAST_CPU_S[0])
        else:
            raw.append(timed(lambda: [be.copy_to_host(s, d) for d, s in zip(views, sources)], be))
            raw_back.append(timed(lambda: [be.copy_from_host(b, 0, d, d.ndim - 1) for b, d in zip(back, views)], be))
        runs.append(run_store(w, f"host:{int(w.total * 1.02) + (64 << 20)}"))
    out = best_of(runs)
    out["pinned"] = bool(w.be.pins_host_memory())
    dst = views = None  # noqa: F841 - frees the raw copies' buffer
    if srcs is not None:
        out["memcpy_gbps"] = gbps(w.total, min(raw))
        out["put_vs_raw"] = out["put_gbps"] / out["memcpy_gbps"]
        out["get_vs_raw"] = out["get_gbps"] / out["memcpy_gbps"]
        # CPU seconds per byte, least of the repeats: what the copies cost whatever share of
        # the CPUs the run got (the store's copies may run on several threads: all counted).
        out["memcpy_cpu_s"] = min(raw_cpu)
        out["put_cpu_s"] = min(r["put_cpu_s"] for r in runs)
        out["get_cpu_s"] = min(r["get_cpu_s"] for r in runs)
        out["put_vs_raw_cpu"] = out["memcpy_cpu_s"] / out["put_cpu_s"]
        out["get_vs_raw_cpu"] = out["memcpy_cpu_s"] / out["get_cpu_s"]
    else:
        out["d2h_gbps"] = gbps(w.total, min(raw))
        out["h2d_gbps"] = gbps(w.total, min(raw_back))
        out["put_vs_raw"] = out["put_gbps"] / out["d2h_gbps"]
        out["get_vs_raw"] = out["get_gbps"] / out["h2d_gbps"]
    return out


def bench_device(w: Workload, repeat: int) -> dict:
    be = w.be
    sources = w.layers if w.args.bits == "none" else \
        [be.from_numpy(p, None, w.device) for p in w.chunk_payloads()]
    raw, runs = [], []
    for _ in range(repeat):
        raw.append(timed(lambda: [be.concat([a], 0) for a in sources], be))
        runs.append(run_store(w, f"device:{int(w.total * 1.02) + (64 << 20)}"))
    out = best_of(runs)
    out["copy_gbps"] = gbps(w.total, min(raw))
    out["put_vs_raw"] = out["put_gbps"] / out["copy_gbps"]
    out["get_vs_raw"] = out["get_gbps"] / out["copy_gbps"]
    return out


def bench_disk(w: Workload, root: str) -> dict:
    raw_dir = os.path.join(root, "raw")
    os.makedirs(raw_dir, exist_ok=True)
    paths = []

    def write_raw():
        for i, buf in enumerate(payloads):
            p = os.path.join(raw_dir, f"{i}.bin")
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            mv, n = memoryview(buf), 0
            while n < buf.nbytes:
                n += os.write(fd, mv[n:])
            os.fsync(fd)
            os.close(fd)
            paths.append(p)

    def read_raw():
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            size = os.fstat(fd).st_size
            buf = np.empty(size, np.uint8)
            mv, n = memoryview(buf), 0
            while n < size:
                n += os.readv(fd, [mv[n:]])
            os.close(fd)

    payloads = list(w.chunk_payloads())
    dt_w = timed(write_raw)
    payloads = None  # noqa: F841 - frees the copies
    gc.collect()
    how = drop_caches(paths)
    dt_r = timed(read_raw)
    shutil.rmtree(raw_dir)
    store_dir = os.path.join(root, "store")
    out = run_store(w, f"disk:{store_dir}:{int(w.total * 1.1) + (64 << 20)}",
                    before_get=lambda: drop_caches(files_under(store_dir)))
    shutil.rmtree(store_dir, ignore_errors=True)
    out.update(raw_write_fsync_gbps=gbps(w.total, dt_w), raw_cold_read_gbps=gbps(w.total, dt_r), cache_drop=how)
    out["put_vs_raw"] = out["put_gbps"] / out["raw_write_fsync_gbps"]
    out["get_vs_raw"] = out["get_gbps"] / out["raw_cold_read_gbps"]
    return out


def bench_remote(w: Workload, url: str | None, opts: str, repeat: int, unix: bool = False) -> dict:
    """Raw redis-py SET/GET of each chunk's bytes on one connection and the store, interleaved ``repeat`` times."""
    import redis

    server, sock_dir = None, None
    if url is None:
        from redis_server import RedisServer

        # Valkey's I/O threads spin while they wait: they help with cores to spare, and take
        # the client's core on a small machine (measured on 2 cores: slower with them).
        cpus = os.cpu_count() or 1
        extra = ["--io-threads", str(min(4, cpus // 4))] if cpus >= 8 else []
        if unix:
            sock_dir = tempfile.mkdtemp(prefix="lmcache-sock-")
            extra += ["--unixsocket", os.path.join(sock_dir, "s"), "--unixsocketperm", "700"]
        server = RedisServer(extra=extra).start()
        url = f"unix://{os.path.join(sock_dir, 's')}" if unix else server.url
    raw_set, raw_get, runs = [], [], []
    try:
        r = redis.Redis.from_url(url)
        payloads = [p.tobytes() for p in w.chunk_payloads()]
        for _ in range(repeat):
            r.flushall()
            raw_set.append(timed(lambda: [r.set(f"raw:{i}", p) for i, p in enumerate(payloads)]))
            raw_get.append(timed(lambda: [r.get(f"raw:{i}") for i in range(w.args.chunks)]))
            r.flushall()
            gc.collect()
            runs.append(run_store(w, url + opts))
        payloads = None  # noqa: F841 - frees the copies
        r.flushall()
        r.close()
    finally:
        if server is not None:
            server.stop()
        if sock_dir is not None:
            shutil.rmtree(sock_dir, ignore_errors=True)
    out = best_of(runs)
    out.update(raw_set_gbps=gbps(w.total, min(raw_set)), raw_get_gbps=gbps(w.total, min(raw_get)),
               url_options=opts, socket="unix" if unix else "tcp loopback" if server is not None else url)
    out["put_vs_raw"] = out["put_gbps"] / out["raw_set_gbps"]
    out["get_vs_raw"] = out["get_gbps"] / out["raw_get_gbps"]
    return out


LOAD_START = (0.0, 0.0, 0.0)

# Freed memory stays in the process heap, so each get's new cache arrays reuse pages that are
# already mapped: on a VM a first touch of fresh memory costs more than the copy itself, and
# both the raw copies and the store's would pay it at random. Set before the first allocation
# by re-executing this script (--no-malloc-tuning keeps the system's defaults).
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def main() -> None:
    if "--no-malloc-tuning" not in sys.argv and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    global LOAD_START
    LOAD_START = os.getloadavg()  # others may share the machine: say how busy it was
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (numpy backend) or cuda (torch backend)")
    ap.add_argument("--backend", default=None, help="backend name (default: numpy on cpu, torch otherwise)")
    ap.add_argument("--tiers", default=None, help="comma list of device,host,disk,remote")
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=256, help="tokens per chunk")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--bits", default="none", help="none (full precision), 2, 4 or 8")
    ap.add_argument("--disk-dir", default=None, help="directory for the disk tier (default: a temp dir)")
    ap.add_argument("--redis-url", default=None, help="an existing server (default: start one on loopback)")
    ap.add_argument("--remote-unix", action="store_true",
                    help="also measure the remote tier over a unix socket to the same kind of server")
    ap.add_argument("--remote-opts", default="", help="query options of the remote url (default: the tier's)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N (raw and store interleaved)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc at its defaults")
    args = ap.parse_args()

    be_name = args.backend or ("numpy" if args.device == "cpu" else "torch")
    device = None if args.device == "cpu" else args.device
    tiers = (args.tiers or ("device,host,disk,remote" if device else "host,disk,remote")).split(",")
    w = Workload(args, be_name, device)
    if device:
        hook = getattr(w.be, "device_name", None)
        dev_name = hook() if hook else args.device
        if hook is None and be_name == "torch" and device.startswith("cuda"):
            import torch

            dev_name = torch.cuda.get_device_name(torch.device(device))
        dev_name = short(dev_name)
    else:
        dev_name = "cpu-" + short(cpu_name())
    print(f"workload: {args.chunks} chunks x {args.chunk} tokens, {args.layers} layers x 2 x {args.kv_heads} x "
          f"{args.head_dim} {args.dtype}, bits={args.bits}: {w.total / 2**30:.2f} GiB; backend {be_name}, "
          f"device {dev_name}")
    results = {}
    root = args.disk_dir or tempfile.mkdtemp(prefix="lmcache-bench-", dir="/var/tmp" if os.path.isdir("/var/tmp")
                                              else None)
    try:
        for t in tiers:
            if t not in ("device", "host", "disk", "remote"):
                raise SystemExit(f"unknown tier {t!r}")
            t0 = time.perf_counter()
            try:
                if t == "device":
                    results[t] = bench_device(w, args.repeat)
                elif t == "host":
                    results[t] = bench_host(w, args.repeat)
                elif t == "disk":
                    results[t] = bench_disk(w, root)
                else:
                    results[t] = bench_remote(w, args.redis_url, args.remote_opts, args.repeat)
                    if args.remote_unix:
                        results["remote-unix"] = bench_remote(w, None, args.remote_opts, args.repeat, unix=True)
            except Exception as e:  # noqa: BLE001 - one tier failing (no server, no disk) keeps the others
                results[t] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{t}: failed: {results[t]['error']}", file=sys.stderr)
            results[t]["seconds"] = time.perf_counter() - t0
            gc.collect()
    finally:
        if args.disk_dir is None:
            shutil.rmtree(root, ignore_errors=True)

    rows = []
    for t, r in results.items():
        if "error" in r:
            rows.append((t, "-", "-", r["error"][:60], "-"))
            continue
        if t == "device":
            raw = f"copy {r['copy_gbps']:.2f}"
        elif t == "host" and "d2h_gbps" in r:
            raw = f"D2H {r['d2h_gbps']:.2f} / H2D {r['h2d_gbps']:.2f}" + (" (pinned)" if r["pinned"] else "")
        elif t == "host":
            raw = f"memcpy {r['memcpy_gbps']:.2f}"
        elif t == "disk":
            raw = f"write+fsync {r['raw_write_fsync_gbps']:.2f} / cold read {r['raw_cold_read_gbps']:.2f}"
        else:
            raw = f"redis-py SET {r['raw_set_gbps']:.2f} / GET {r['raw_get_gbps']:.2f}"
        rel = (f"{r['put_vs_raw']:.0%} / {r['get_vs_raw']:.0%}" if "put_vs_raw" in r else "-")
        if "put_vs_raw_cpu" in r:
            rel += f" (CPU time {r['put_vs_raw_cpu']:.0%} / {r['get_vs_raw_cpu']:.0%})"
        rows.append((t, f"{r['put_gbps']:.2f}", f"{r['get_gbps']:.2f}", raw, rel))
    head = ("tier", "put GB/s", "get GB/s", "raw ceiling (GB/s)", "put/get vs raw")
    widths = [max(len(x[i]) for x in rows + [head]) for i in range(5)]
    for row in [head] + rows:
        print("  ".join(c.ljust(wd) for c, wd in zip(row, widths)))
    if "cache_drop" in results.get("disk", {}):
        print(f"disk cold read: page cache dropped with {results['disk']['cache_drop']}")

    out = {"bench": "store", "device": dev_name, "backend": be_name, "cpu": cpu_name(), "cpus": os.cpu_count(),
           "workload": {"chunks": args.chunks, "chunk_tokens": args.chunk, "layers": args.layers,
                        "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": args.dtype, "bits": args.bits,
                        "bytes": w.total},
           "results": results, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "python": platform.python_version(), "numpy": np.__version__,
           "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV}, "load_avg_start": LOAD_START,
           "load_avg": os.getloadavg(),
           "command": " ".join(sys.argv)}
    path = args.out or os.path.join(ROOT, "bench", "results", f"store-{dev_name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
