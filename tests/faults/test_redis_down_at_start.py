"""Redis unreachable when the gateway starts, for each ``on_unavailable`` policy.

A real ``gateway run`` process is pointed at a loopback port where nothing
listens yet (the port of a throwaway redis-server, not started). What must
hold (ARCHITECTURE "Failure policy"):

- the gateway starts and keeps running, with one warning line about the
  limiter in its log and no traceback;
- ``fail_closed``: ``/readyz`` answers 503 with the limiter named as the
  backend that is down, and a request that needs the limiter gets
  503 ``{"error": ...}`` without reaching the upstream;
- ``fallback`` and ``fail_open``: ``/readyz`` answers 200, degraded, and
  requests are served;
- once Redis answers on that port, the same process turns ready and not
  degraded by itself, and requests pass (decided in Redis again).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.procs import GatewayProcess
from tests.services import RedisServer, free_port

from .fixtures import Spawner
from .harness import ASSESS, Admin, FaultyUpstream, bearer, gateway_config, metric_total, wait_for

RECOVERY_TIMEOUT = 20.0  # a bound on waiting, not a measured figure


async def _readyz(session: aiohttp.ClientSession, gateway: GatewayProcess) -> tuple[int, Any]:
    async with session.get(gateway.status_url + "/readyz") as resp:
        return resp.status, await resp.json()


async def _launch(gateway: GatewayProcess, session: aiohttp.ClientSession) -> None:
    """``gateway run``, waiting until the status listener answers at all (503 included).

    ``GatewayProcess.start`` waits for a 200, which a gateway that fails closed
    never gives while Redis is down.
    """
    with gateway.log_path.open("ab") as log:
        gateway.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "run", "--config", str(gateway.config_path),
            stdout=log, stderr=log,
        )  # fmt: skip

    async def answering() -> bool:
        assert gateway.process is not None
        if gateway.process.returncode is not None:
            pytest.fail(f"gateway exited (code {gateway.process.returncode}):\n{gateway.log()}")
        try:
            await _readyz(session, gateway)
        except aiohttp.ClientConnectionError:
            return False
        return True

    await wait_for(answering, timeout=RECOVERY_TIMEOUT)


async def _assess(session: aiohttp.ClientSession, gateway: GatewayProcess, key: str) -> Any:
    async with session.post(gateway.url + ASSESS, headers=bearer(key), data=b"{}") as resp:
        return resp.status, await resp.json()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("policy", ["fail_closed", "fallback", "fail_open"])
async def test_gateway_starts_with_redis_down_and_recovers_by_itself(
    tmp_path: Path,
    fault_upstream: FaultyUpstream,
    session: aiohttp.ClientSession,
    spawn: Spawner,
    policy: str,
) -> None:
    redis = RedisServer(tmp_path / "redis", port=free_port())
    assert not redis.running
    limiter = {"url": redis.url, "on_unavailable": policy, "retry_interval_seconds": 0.2}
    storage = f"sqlite:///{tmp_path / 'gateway.db'}"
    gateway = spawn(gateway_config(storage, fault_upstream, limiter=limiter))
    try:
        await _launch(gateway, session)
        admin = Admin(session, gateway)
        await admin.team("acme", credits=100)
        key, _ = await admin.key("acme", rate_limit=600)

        status, ready = await _readyz(session, gateway)
        down = ready["backends"]["limiter"]
        assert down["ok"] is False and down["kind"] == "redis" and down["policy"] == policy
        assert down["error"]
        assert ready["backends"]["storage"]["ok"] is True
        assert ready["degraded"] is True
        answered, body = await _assess(session, gateway, key)
        if policy == "fail_closed":
            assert (status, ready["ready"]) == (503, False)
            assert answered == 503 and isinstance(body["error"], str) and body["error"]
            assert fault_upstream.received[ASSESS] == 0
        else:
            assert (status, ready["ready"]) == (200, True)
            assert answered == 200 and fault_upstream.received[ASSESS] == 1
        decided_in_redis = await metric_total(
            session, gateway, "gateway_rate_limit_decisions_total", limiter="redis"
        )

        await asyncio.to_thread(redis.start)

        async def recovered() -> bool:
            status, ready = await _readyz(session, gateway)
            return status == 200 and ready["degraded"] is False

        await wait_for(recovered, timeout=RECOVERY_TIMEOUT)
        _, ready = await _readyz(session, gateway)
        assert ready["backends"]["limiter"]["ok"] is True
        assert "error" not in ready["backends"]["limiter"]
        answered, body = await _assess(session, gateway, key)
        assert answered == 200, body
        assert (
            await metric_total(
                session, gateway, "gateway_rate_limit_decisions_total", limiter="redis"
            )
            > decided_in_redis
        )

        # The same process throughout: never restarted, never exited.
        assert gateway.process is not None and gateway.process.returncode is None
        log = gateway.log()
        assert "Traceback" not in log
        warnings = [
            line for line in log.splitlines() if '"warning"' in line and "rate limiter" in line
        ]
        assert len(warnings) == 1, log
    finally:
        await asyncio.to_thread(redis.stop)
