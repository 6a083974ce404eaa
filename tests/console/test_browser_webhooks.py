"""The console's Webhooks page in a real headless Chromium against a real ``gateway run``:
an operator sends a test event with the page's button, a real receiver on loopback gets
it signed, and the page then lists the delivery with its answer."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from playwright.async_api import Browser, expect

from tests.events.test_worker import Receiver, receiver, verify

from ..conftest import ADMIN_TOKEN
from ..procs import GatewayProcess
from .test_browser import admin_api, browser, shot

__all__ = ["browser", "receiver"]

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    process = GatewayProcess(
        tmp_path,
        {
            "storage": f"sqlite:///{tmp_path / 'gateway.db'}",
            "upstreams": {"assess": {"url": "http://127.0.0.1:9"}},
            "routes": [{"path": "/api/v1/assess", "methods": ["POST"], "upstream": "assess"}],
            "logging": {"access_log": False},
            "webhooks": {"allow_private_addresses": True, "poll_interval_seconds": 0.1},
        },
    )
    await process.start()
    yield process
    assert await process.stop() == 0, process.log()
    assert "console request failed" not in process.log(), process.log()


async def test_send_a_test_event_from_the_webhooks_page(
    browser: Browser, gateway: GatewayProcess, receiver: Receiver
) -> None:
    team = await admin_api(gateway, "POST", "/admin/v1/teams", {"name": "acme"})
    hook = await admin_api(gateway, "POST", f"/admin/v1/teams/{team['id']}/webhooks",
                           {"url": receiver.url, "events": ["credits.low"],
                            "description": "billing alerts"})  # fmt: skip
    await admin_api(gateway, "PUT", f"/admin/v1/teams/{team['id']}/alerts",
                    {"low_balance_threshold": 100})  # fmt: skip
    context = await browser.new_context()
    page = await context.new_page()
    console = gateway.admin_url + "/console"
    await page.goto(console + "/sign-in")
    await page.get_by_label("Token").fill(ADMIN_TOKEN)
    await page.get_by_role("button", name="Sign in").click()
    await page.goto(f"{console}/teams/{team['id']}/keys")
    await page.get_by_role("link", name="Webhooks").click()
    await expect(page.get_by_role("heading", name=receiver.url)).to_be_visible()
    await expect(page.get_by_text("live: below 100")).to_be_visible()
    await expect(page.get_by_text("No deliveries yet.")).to_be_visible()
    await page.get_by_role("button", name="Send test event").click()
    await expect(page.locator(".flash-ok")).to_contain_text("Test event evt_")
    deadline = time.monotonic() + 10
    while not receiver.got:
        assert time.monotonic() < deadline, gateway.log()[-2000:]
        await page.wait_for_timeout(50)
    headers, body = receiver.got[0]
    assert verify(hook["secret"], headers, body)
    assert orjson.loads(body)["type"] == "webhook.test"
    await page.reload()
    row = page.locator("tbody tr").first
    await expect(row).to_contain_text("webhook.test")
    await expect(row).to_contain_text("delivered")
    await expect(row).to_contain_text("200")
    await shot(page, "webhooks")
    await context.close()
