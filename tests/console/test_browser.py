"""The console in a real headless Chromium against a real ``gateway run`` process.

An operator signs in, grants credits, creates a key and copies it from the
one-time dialog; the key is used through the proxy, shows up on the usage page,
is revoked in the UI and refused by the proxy; a team token cannot reach another
team's pages. The tables of every page fit windows 1024, 1280 and 1440 pixels wide
with long names, without sideways scrolling. Screenshots of each page go to
``test-artifacts/console/``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

from ..conftest import ADMIN_TOKEN, Upstream
from ..procs import GatewayProcess

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("/usr/bin/chromium is missing: scripts/test installs it (apt-get)")
        pytest.skip("/usr/bin/chromium is missing: apt-get install chromium")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield launched
        await launched.close()


@pytest.fixture
async def gateway(tmp_path: Path, upstream: Upstream) -> AsyncIterator[GatewayProcess]:
    process = GatewayProcess(
        tmp_path,
        {
            "storage": f"sqlite:///{tmp_path / 'gateway.db'}",
            "upstreams": {"assess": {"url": upstream.url, "timeout_seconds": 5}},
            "routes": [{"path": "/api/v1/assess", "methods": ["POST"], "upstream": "assess"}],
            "usage": {"flush_interval_seconds": 0.2},
            "keys": {"invalidation_poll_seconds": 0.1},
            "logging": {"access_log": False},
            # Short windows and low thresholds, so the test raises real anomaly signals.
            "anomalies": {
                "window_seconds": 1,
                "baseline_windows": 1,
                "rate_spike_factor": 1.5,
                "rate_spike_min_requests": 2,
                "auth_failure_threshold": 1,
            },
        },
    )
    await process.start()
    yield process
    assert await process.stop() == 0, process.log()
    assert "console request failed" not in process.log(), process.log()


async def admin_api(gw: GatewayProcess, method: str, path: str, body: Any = None) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            gw.admin_url + path,
            json=body,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as resp,
    ):
        assert resp.status < 300, await resp.text()
        return await resp.json()


async def proxy(gw: GatewayProcess, key: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + "/api/v1/assess",
            json={"text": "hi"},
            headers={"Authorization": f"Bearer {key}"},
        ) as resp,
    ):
        return resp.status, await resp.json()


# What every page must have: a language, one main landmark and a banner, a label on
# every form control, and a name on every link and button.
ACCESSIBILITY = """() => {
  const problems = [];
  if (!document.documentElement.lang) problems.push("no lang");
  if (document.querySelectorAll("main").length !== 1) problems.push("not one main");
  if (!document.querySelector("body > header")) problems.push("no banner");
  for (const el of document.querySelectorAll("input:not([type=hidden]), select, textarea")) {
    if (!el.labels || el.labels.length === 0) problems.push("unlabelled " + el.outerHTML);
  }
  for (const el of document.querySelectorAll("a, button")) {
    if (!el.textContent.trim() && !el.getAttribute("aria-label")) problems.push("nameless " + el.outerHTML);
  }
  return problems;
}"""


async def shot(page: Page, name: str, full_page: bool = True) -> None:
    assert await page.evaluate(ACCESSIBILITY) == [], name
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)


async def test_operator_and_team_token_in_a_browser(
    browser: Browser, gateway: GatewayProcess, upstream: Upstream
) -> None:
    acme = await admin_api(gateway, "POST", "/admin/v1/teams", {"name": "Acme Corp"})
    globex = await admin_api(gateway, "POST", "/admin/v1/teams", {"name": "Globex"})
    await admin_api(
        gateway, "POST", f"/admin/v1/teams/{globex['id']}/keys", {"name": "globex prod"}
    )
    console = gateway.admin_url + "/console"

    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=gateway.admin_url)
    page = await context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))

    # Sign in with the admin token, from the keyboard.
    await page.goto(console)
    await expect(page).to_have_url(console + "/sign-in")
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await shot(page, "sign-in")
    await page.get_by_label("Token").fill(ADMIN_TOKEN)
    await page.get_by_label("Token").press("Enter")
    await expect(page).to_have_url(console + "/teams")
    await expect(page.get_by_role("link", name="Globex").first).to_be_visible()

    # Pick the team, grant credits with a reason.
    await page.get_by_label("Team", exact=True).select_option(label="Acme Corp")
    await page.get_by_role("button", name="Open").click()
    await expect(page.get_by_role("heading", name="API Keys")).to_be_visible()
    await page.get_by_role("link", name="Credits").click()
    await page.get_by_label("Amount").fill("100")
    await page.get_by_label("Reason").fill("initial purchase")
    await page.get_by_role("button", name="Grant").click()
    await expect(page.get_by_role("status").filter(has_text="New balance: 100")).to_be_visible()
    await expect(page.locator('.balance[data-environment="live"] .value')).to_have_text("100")
    await shot(page, "credits")

    # Create a key; read it from the one-time dialog and copy it.
    await page.get_by_role("link", name="API Keys").click()
    # The new page must be in place before the keyboard is used on it.
    await expect(page.get_by_role("heading", name="API Keys", exact=True)).to_be_visible()
    await page.wait_for_load_state("load")
    # Keyboard: the first Tab reaches the skip link, which moves focus to the content.
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    outline = await page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid"  # a visible focus indicator
    await page.keyboard.press("Enter")
    await expect(page.locator("main")).to_be_focused()
    await page.get_by_label("Name").fill("production server")
    await page.get_by_label("Environment").select_option("live")
    await page.get_by_role("button", name="Create API Key").click()
    dialog = page.get_by_role("dialog", name="Your new API key")
    await expect(dialog).to_be_visible()
    await expect(dialog).to_contain_text("won't be shown again")
    secret = await dialog.get_by_label("API key").input_value()
    assert secret.startswith("ckiq_live_") and len(secret) == 48
    await expect(dialog.get_by_label("API key")).to_be_focused()
    await dialog.get_by_role("button", name="Copy").click()
    await expect(page.locator("#copy-status")).to_have_text("Copied to the clipboard.")
    assert await page.evaluate("navigator.clipboard.readText()") == secret
    await shot(page, "key-created", full_page=False)
    await dialog.get_by_role("link", name="I have copied the key").click()
    row = page.locator("tr", has_text="production server")
    await expect(row).to_contain_text(secret[:14])
    assert secret not in await page.content()

    # Use the key through the proxy: three answers; after a quiet second (the key's
    # baseline), a burst with one upstream failure, which is a rate spike; one bad key.
    for _ in range(3):
        assert (await proxy(gateway, secret))[0] == 200
    await asyncio.sleep(2.1)
    upstream.status = 500
    assert (await proxy(gateway, secret))[0] == 500
    upstream.status = 200
    for _ in range(2):
        assert (await proxy(gateway, secret))[0] == 200
    assert (await proxy(gateway, "ckiq_live_" + "x" * 38))[0] == 401

    # The usage page shows them once the counters are flushed.
    await page.get_by_role("link", name="Usage").click()
    requests = page.locator('.stat[data-stat="requests"] .value')
    markers = page.locator("svg.chart-svg g.anomaly")
    for _ in range(50):
        if await requests.text_content() == "6" and await markers.count():
            break
        await asyncio.sleep(0.1)
        await page.reload()
    await expect(requests).to_have_text("6")
    await expect(page.locator('.stat[data-stat="credits"] .value')).to_have_text("5")
    assert await markers.count() >= 1
    await expect(page.locator("#anomalies-title + p + ul")).to_contain_text("Rate spike")
    await expect(page.locator("#failures-title ~ ul")).to_contain_text("Refused credentials")
    assert await page.locator("svg.chart-svg rect.o-ok").count() == 1
    assert await page.locator("svg.chart-svg rect.o-upstream_error").count() == 1
    await expect(page.get_by_role("img", name="Requests per hour by outcome")).to_be_visible()
    await expect(page.locator("#top-title + .table-wrap")).to_contain_text("production server")
    await expect(
        page.get_by_role("heading", name="Authentication failures, all teams")
    ).to_be_visible()
    await shot(page, "usage")
    await page.get_by_label("Period", exact=True).select_option("7d")
    await page.get_by_role("button", name="Show").click()
    await expect(
        page.get_by_role("heading", name="Requests by outcome, per day (UTC)")
    ).to_be_visible()
    assert await page.locator("svg.chart-svg g.bar").count() == 7

    # Revoke it in the UI (with confirmation); the proxy refuses it within a second.
    await page.get_by_role("link", name="API Keys").click()
    await expect(row).not_to_contain_text("Never")  # last used is filled in
    await shot(page, "keys")
    await row.get_by_role("link", name="Revoke… key production server").click()
    await expect(page.get_by_role("heading", name="Revoke this API key?")).to_be_visible()
    await shot(page, "revoke-confirm")
    await page.get_by_role("button", name="Revoke key").click()
    await expect(page.get_by_role("status")).to_contain_text("is revoked")
    await expect(row).to_contain_text("Revoked")
    for _ in range(40):
        status, body = await proxy(gateway, secret)
        if status == 401:
            break
        await asyncio.sleep(0.05)
    assert (status, body) == (401, {"error": "Invalid API key"})

    await page.get_by_role("button", name="Sign out").click()
    await expect(page).to_have_url(console + "/sign-in")
    assert problems == []

    # A team token sees its own team only.
    token = await admin_api(gateway, "POST", f"/admin/v1/teams/{acme['id']}/tokens", {"name": "t"})
    team_context = await browser.new_context()
    team_page = await team_context.new_page()
    await team_page.goto(console + "/sign-in")
    await team_page.get_by_label("Token").fill(token["token"])
    await team_page.get_by_role("button", name="Sign in").click()
    await expect(team_page).to_have_url(f"{console}/teams/{acme['id']}/keys")
    await expect(team_page.locator("tr", has_text="production server")).to_be_visible()
    assert await team_page.get_by_label("Team", exact=True).count() == 0
    for path in ("keys", "credits", "usage"):
        response = await team_page.goto(f"{console}/teams/{globex['id']}/{path}")
        assert response is not None and response.status == 404
        await expect(team_page.get_by_role("heading", name="Not found")).to_be_visible()
        assert "globex prod" not in await team_page.content()
    await shot(team_page, "team-token-other-team-404")
    await team_page.goto(f"{console}/teams/{acme['id']}/credits")
    await expect(team_page.get_by_role("heading", name="Credits")).to_be_visible()
    assert await team_page.get_by_role("button", name="Grant").count() == 0
    await team_context.close()
    await context.close()


# The console's tables must fit the common desktop widths without sideways scrolling.
WIDTHS = (1024, 1280, 1440)
# A key name at its limit (100 characters), with spaces, and one that has none.
LONG_NAME = (
    "Production assessment worker for the customer portal, EU West region, blue/green slot A #"
)
LONG_NAME = LONG_NAME + "x" * (100 - len(LONG_NAME))
UNBROKEN_NAME = ("nightly-regression-suite-" * 4)[:100]
LONG_TEAM = ("Northwind Logistics International — Customer Data Platform, EU West Billing " * 2)[
    :100
]

# Everything that scrolls sideways: the page, and the box around each table.
OVERFLOW = """() => {
  const problems = [];
  const root = document.documentElement;
  if (root.scrollWidth > window.innerWidth) {
    problems.push(`page: scrollWidth ${root.scrollWidth} > innerWidth ${window.innerWidth}`);
  }
  for (const table of document.querySelectorAll("table")) {
    const box = table.parentElement;
    if (box.scrollWidth > box.clientWidth) {
      const name = box.getAttribute("aria-label") || box.getAttribute("aria-labelledby");
      problems.push(`table ${name}: scrollWidth ${box.scrollWidth} > clientWidth ${box.clientWidth}`);
    }
  }
  return problems;
}"""


async def overflow(page: Page, name: str, width: int) -> list[str]:
    """What scrolls sideways at this width; a screenshot for people to look at."""
    assert await page.evaluate("window.innerWidth") == width
    # Every table is checked, including the one folded away in a <details>.
    await page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
    await shot(page, f"{name}-{width}")
    return [f"{name} at {width}px: {p}" for p in await page.evaluate(OVERFLOW)]


async def cut_off(page: Page, what: str, width: int, height: int, locator: Locator) -> list[str]:
    """Whether ``locator`` sticks out of the viewport or out of its table's box once the
    page is scrolled to it vertically (scrolling sideways would hide what this looks for)."""
    await locator.evaluate(
        "el => window.scrollTo(0, el.getBoundingClientRect().top + window.scrollY - 200)"
    )
    box = await locator.bounding_box()
    assert box is not None
    wrap = await locator.evaluate(
        "el => { const r = el.closest('.table-wrap').getBoundingClientRect();"
        " return {left: r.left, right: r.right}; }"
    )
    left, right = box["x"], box["x"] + box["width"]
    inside = (
        max(0, wrap["left"]) <= left
        and right <= min(width, wrap["right"])
        and box["y"] >= 0
        and box["y"] + box["height"] <= height
    )
    return [] if inside else [f"{what} at {width}px: {box} outside {wrap} / {width}x{height}"]


async def test_tables_fit_desktop_widths(
    browser: Browser, gateway: GatewayProcess, upstream: Upstream
) -> None:
    team = await admin_api(gateway, "POST", "/admin/v1/teams", {"name": LONG_TEAM})
    await admin_api(gateway, "POST", "/admin/v1/teams", {"name": "Acme Corp"})
    tid = team["id"]
    await admin_api(
        gateway,
        "POST",
        f"/admin/v1/teams/{tid}/credits",
        {"amount": 1000, "environment": "live", "reason": "Invoice 2025-031: " + "annual " * 60},
    )
    await admin_api(
        gateway,
        "POST",
        f"/admin/v1/teams/{tid}/credits",
        {"amount": -5, "environment": "live", "reason": "x" * 500},
    )

    async def key(name: str, **extra: Any) -> Any:
        return await admin_api(
            gateway, "POST", f"/admin/v1/teams/{tid}/keys", {"name": name, **extra}
        )

    used = await key(LONG_NAME)
    unbroken = await key(UNBROKEN_NAME, environment="test")
    await key("web", expires_at="2099-12-31T23:59:00Z")
    rotated = await key(LONG_NAME.replace("Production", "Staging   "))
    await admin_api(
        gateway, "POST", f"/admin/v1/keys/{rotated['id']}/rotate", {"grace_seconds": 86400}
    )
    revoked = await key("Old integration " + "y" * 84)
    await admin_api(gateway, "POST", f"/admin/v1/keys/{revoked['id']}/revoke")
    disabled = await key("Disabled " + "z" * 91)
    await admin_api(gateway, "PATCH", f"/admin/v1/keys/{disabled['id']}", {"disabled": True})

    # Usage in several outcomes, a rate spike and refused credentials, for the usage page.
    assert (await proxy(gateway, used["key"]))[0] == 200
    await asyncio.sleep(2.1)
    for status in (200, 200, 500, 404, 200):
        upstream.status = status
        await proxy(gateway, used["key"])
    upstream.status = 200
    await proxy(gateway, unbroken["key"])
    for bad in ("ckiq_live_" + "x" * 38, "ckiq_test_" + "q" * 38, "not-a-key"):
        assert (await proxy(gateway, bad))[0] == 401
    for _ in range(100):
        report = await admin_api(gateway, "GET", f"/admin/v1/teams/{tid}/usage")
        if report["totals"]["total"] >= 7:
            break
        await asyncio.sleep(0.1)
    assert report["totals"]["total"] >= 7, report

    console = gateway.admin_url + "/console"
    context = await browser.new_context(viewport={"width": WIDTHS[0], "height": 900})
    page = await context.new_page()
    await page.goto(console + "/sign-in")
    await page.get_by_label("Token").fill(ADMIN_TOKEN)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page).to_have_url(console + "/teams")

    pages = {
        "teams": console + "/teams",
        "keys": f"{console}/teams/{tid}/keys",
        "credits": f"{console}/teams/{tid}/credits",
        "usage": f"{console}/teams/{tid}/usage",
        "requests": f"{console}/teams/{tid}/requests",
    }
    problems: list[str] = []
    for width in WIDTHS:
        await page.set_viewport_size({"width": width, "height": 900})
        for name, url in pages.items():
            await page.goto(url)
            await expect(page.locator(".table-wrap table").last).to_be_visible()
            problems += await overflow(page, name, width)
        # Every row's buttons, the long names' rows among them.
        await page.goto(pages["keys"])
        for key_id, name in ((used["id"], LONG_NAME), (unbroken["id"], UNBROKEN_NAME)):
            await expect(page.locator(f'tr[data-key-id="{key_id}"]')).to_contain_text(name)
        buttons = page.locator("tbody tr").get_by_role("link", name="Revoke…")
        assert await buttons.count() == 6  # all but the revoked key
        for label in ("Revoke…", "Rotate…"):
            for button in await page.locator("tbody tr").get_by_role("link", name=label).all():
                what = await button.text_content() or label
                problems += await cut_off(page, what[:30], width, 900, button)
    await context.close()
    assert problems == []
