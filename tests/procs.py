"""Real gateway processes for tests that need one: separate RSS, signals, replicas."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .conftest import ADMIN_TOKEN
from .services import free_port

__all__ = ["GatewayProcess", "free_port", "rss_bytes"]


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


class GatewayProcess:
    """``gateway run`` in a child process with its own config file."""

    def __init__(self, tmp_path: Path, config: dict[str, Any], name: str = "gw") -> None:
        self.port = free_port()
        self.status_port = free_port()
        self.admin_port = free_port()
        self.config_path = tmp_path / f"{name}.yaml"
        full = {
            "listen": f"127.0.0.1:{self.port}",
            "status": {"listen": f"127.0.0.1:{self.status_port}"},
            "admin": {"listen": f"127.0.0.1:{self.admin_port}", "token": ADMIN_TOKEN},
            "shutdown": {"readiness_delay_seconds": 0, "drain_seconds": 5},
            **config,
        }
        self.config_path.write_text(yaml.safe_dump(full))
        self.log_path = tmp_path / f"{name}.log"
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, *extra: str, timeout: float = 20.0) -> None:
        log = self.log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "run",
            "--config",
            str(self.config_path),
            *extra,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.process.returncode is not None:
                    raise RuntimeError(f"gateway exited early:\n{self.log_path.read_text()}")
                try:
                    async with session.get(self.status_url + "/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"gateway not ready:\n{self.log_path.read_text()}")
                await asyncio.sleep(0.1)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process is None or self.process.returncode is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            return await self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""
