"""Odd form input on the console: a page with a 4xx, never a 500 (issue 16)."""

from __future__ import annotations

import pytest

from .conftest import Console, hidden
from .test_http import signed_in


@pytest.mark.parametrize("amount", ["²", "٣", "+-5", "--5", "9" * 5000, "1e3", " "])
async def test_odd_grant_amounts_are_422(console: Console, amount: str) -> None:
    team = await console.team("acme")
    browser = await signed_in(console)
    credits = f"/console/teams/{team}/credits"
    resp = await browser.post(credits, {"amount": amount, "environment": "live", "reason": "x"})
    text = await resp.text()
    assert resp.status == 422, (resp.status, text[:500])
    assert "Amount" in text
    balances = await console.api("GET", f"/admin/v1/teams/{team}/credits")
    assert balances["balances"]["live"] == 0


async def test_a_sign_in_token_of_undecodable_bytes_is_refused(console: Console) -> None:
    browser = await console.browser()
    form = await browser.client.get("/console/sign-in")
    nonce = hidden(await form.text(), "nonce")
    resp = await browser.client.post(
        "/console/sign-in",
        data=b"nonce=" + nonce.encode() + b"&token=\xff\xfe",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        allow_redirects=False,
    )
    assert 400 <= resp.status < 500, resp.status


async def test_key_names_with_control_characters_are_refused(console: Console) -> None:
    team = await console.team("acme")
    browser = await signed_in(console)
    keys = f"/console/teams/{team}/keys"
    resp = await browser.post(keys, {"name": "a\x00b", "environment": "live"})
    assert resp.status == 422, resp.status
    listed = await console.api("GET", f"/admin/v1/teams/{team}/keys")
    assert listed["items"] == []


async def test_an_odd_page_link_is_a_4xx(console: Console) -> None:
    team = await console.team("acme")
    browser = await signed_in(console)
    for path in (
        f"/console/teams/{team}/keys?after=%00",
        f"/console/teams/{team}/credits?before=%FF",
    ):
        resp = await browser.client.get(path, allow_redirects=False)
        assert 400 <= resp.status < 500, (path, resp.status)
