"""The real services tests talk to: where the shared ones are, and throwaway ones to start.

Plain helpers, no fixtures (those live in the conftest files). ``scripts/services``
exports the addresses of the shared servers; throwaway servers run on free
loopback ports in a directory of their own and must be stopped by their owner.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "POSTGRES_DSN_ENV",
    "REDIS_URL_ENV",
    "RedisCluster",
    "RedisServer",
    "free_port",
    "postgres_dsn",
    "redis_ping",
    "redis_url",
    "start_redis_cluster",
]

REDIS_URL_ENV = "GATEWAY_TEST_REDIS_URL"
POSTGRES_DSN_ENV = "GATEWAY_TEST_POSTGRES_DSN"
_START_TIMEOUT = 10.0
# Cluster nodes talk to each other on their port + 10000.
_CLUSTER_BUS_OFFSET = 10000


def redis_url() -> str:
    """The shared test Redis (``scripts/services`` exports it)."""
    return os.environ.get(REDIS_URL_ENV) or "redis://127.0.0.1:6379/0"


def postgres_dsn() -> str:
    """The shared test PostgreSQL (``scripts/services`` exports it)."""
    return os.environ.get(POSTGRES_DSN_ENV) or "postgresql://postgres@127.0.0.1:5432/postgres"


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


# Ports handed out by this process: a port is free until its server binds it, so
# two callers in a row must not get the same one.
_handed_out: set[int] = set()
# Listening ports come from below the kernel's ephemeral range: a port picked from
# inside it can be taken, before the server binds it, by any outgoing connection
# (a gateway's pool to PostgreSQL, say) - CI once failed on exactly that.
_LISTEN_LOW = 12000
_rng = random.Random(os.getpid() ^ time.time_ns())


def free_port(cluster_bus: bool = False) -> int:
    """A loopback port nothing listens on (and, for a cluster node, its bus port too)."""
    ephemeral_low, ephemeral_high = _ephemeral_range()
    high = min(ephemeral_low, 65536) - 1 - (_CLUSTER_BUS_OFFSET if cluster_bus else 0)
    if high - _LISTEN_LOW < 1000:  # an unusual kernel range: fall back to above it
        low, high = ephemeral_high + 1, 65535 - (_CLUSTER_BUS_OFFSET if cluster_bus else 0)
    else:
        low = _LISTEN_LOW
    for _ in range(1000):
        port = _rng.randint(low, high)
        if port in _handed_out or not _bindable(port):
            continue
        if cluster_bus and not _bindable(port + _CLUSTER_BUS_OFFSET):
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {low}-{high}")


def redis_ping(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """Whether a Redis answers PING on ``host:port`` (raw RESP: no client state to clean up)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found on PATH: run the tests through scripts/test")
    return path


@dataclass
class RedisServer:
    """A throwaway ``redis-server`` on loopback; ``stop()`` and ``start()`` keep its port."""

    directory: Path
    port: int = 0
    cluster: bool = False
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start on ``port``, or on a free port when it is 0 (trying again if one is taken)."""
        fixed = self.port != 0
        for _ in range(1 if fixed else 5):
            if not fixed:
                self.port = free_port(cluster_bus=self.cluster)
            if self._spawn():
                return
            if fixed:
                break
        logfile = self.directory / "redis.log"
        log = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")

    def _spawn(self) -> bool:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            _binary("redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--logfile", "redis.log",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
        ]  # fmt: skip
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        self._process = subprocess.Popen(
            args, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            if redis_ping(self.port):
                return True
            time.sleep(0.02)
        self.stop()
        return False

    def stop(self) -> None:
        """Stop the server (a no-op when it is not running); returns once it has exited."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=_START_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass
class RedisCluster:
    """A throwaway Redis Cluster of primaries only, every slot covered."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_redis_cluster(directory: Path, size: int = 3) -> RedisCluster:
    """Start ``size`` cluster-enabled servers and join them; stop them all on any failure."""
    cluster = RedisCluster([RedisServer(directory / f"node{i}", cluster=True) for i in range(size)])
    try:
        for node in cluster.nodes:
            node.start()
        subprocess.run(
            [
                _binary("redis-cli"), "--cluster", "create",
                *(f"127.0.0.1:{node.port}" for node in cluster.nodes),
                "--cluster-replicas", "0", "--cluster-yes",
            ],
            check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        )  # fmt: skip
        _wait_for_cluster(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for_cluster(cluster: RedisCluster) -> None:
    # `--cluster create` returns once the slots are assigned; every node must also
    # have heard of the others before a client sees a consistent slot map.
    cli = _binary("redis-cli")
    deadline = time.monotonic() + _START_TIMEOUT
    pending = list(cluster.nodes)
    while pending:
        info = subprocess.run(
            [cli, "-h", "127.0.0.1", "-p", str(pending[0].port), "cluster", "info"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=5,
        ).stdout  # fmt: skip
        if "cluster_state:ok" in info and f"cluster_known_nodes:{len(cluster.nodes)}" in info:
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise RuntimeError(f"Redis Cluster did not become ready:\n{info}")
        time.sleep(0.05)
