"""The console over plain HTTP (no browser): sessions, cookies, headers, CSRF, scopes."""

from __future__ import annotations

import re
import ssl
import subprocess
import time
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from gateway.anomaly import Anomaly
from gateway.console import SESSIONS
from gateway.console._chart import Bucket, stacked_bars
from gateway.listeners import create_admin_app

from ..conftest import ADMIN_TOKEN, MakeGateway, bearer
from .conftest import Console, ConsoleClient, hidden


def session_cookie(resp: aiohttp.ClientResponse) -> str:
    """The raw Set-Cookie header that carries the session."""
    headers = [h for h in resp.headers.getall("Set-Cookie", []) if "console_session=" in h]
    assert len(headers) == 1, resp.headers
    return headers[0]


async def signed_in(console: Console, token: str = ADMIN_TOKEN) -> ConsoleClient:
    browser = await console.browser()
    resp = await browser.sign_in(token)
    assert resp.status == 303, await resp.text()
    return browser


async def test_session_cookie_attributes(console: Console) -> None:
    browser = await console.browser()
    resp = await browser.sign_in(ADMIN_TOKEN)
    assert resp.status == 303 and resp.headers["Location"] == "/console/teams"
    raw = session_cookie(resp)
    attributes = {part.strip().split("=")[0].lower() for part in raw.split(";")[1:]}
    assert attributes >= {"httponly", "samesite", "path", "max-age"}
    assert "secure" not in attributes  # plain HTTP: a Secure cookie would never come back
    morsel = SimpleCookie(raw)["console_session"]
    assert morsel["samesite"] == "Strict" and morsel["path"] == "/console"
    assert morsel["max-age"] == str(8 * 3600)
    # A random id, never the token itself.
    assert ADMIN_TOKEN not in raw and len(morsel.value) >= 40
    assert len(console.server.app[SESSIONS]) == 1
    # The sign-in nonce cookie is scoped the same way and cleared once used.
    form = await (await console.browser()).client.get("/console/sign-in")
    nonce = SimpleCookie(form.headers["Set-Cookie"])["console_signin"]
    assert nonce["httponly"] and nonce["samesite"] == "Strict" and nonce["path"] == "/console"


async def test_cookie_is_secure_over_tls(
    console: Console, tmp_path: Path, aiohttp_client: Any
) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = TestServer(create_admin_app(console.harness.gateway), host="127.0.0.1")
    await server.start_server(ssl=context)
    try:
        client = await aiohttp_client(server, connector=aiohttp.TCPConnector(ssl=False))
        browser = ConsoleClient(client)
        resp = await browser.sign_in(ADMIN_TOKEN)
        assert resp.status == 303
        assert "secure" in session_cookie(resp).lower()
        assert (await client.get("/console/teams", allow_redirects=False)).status == 200
    finally:
        await server.close()


async def test_cookie_is_secure_behind_a_trusted_tls_proxy(
    console: Console, make_gateway: MakeGateway, aiohttp_client: Any
) -> None:
    https = {"X-Forwarded-Proto": "https"}
    # From an address that is not a trusted proxy the header means nothing.
    browser = await console.browser()
    form = await browser.client.get("/console/sign-in", headers=https)
    assert "secure" not in form.headers["Set-Cookie"].lower()
    harness = await make_gateway(trusted_proxies=["127.0.0.0/8"])
    client = await aiohttp_client(create_admin_app(harness.gateway))
    form = await client.get("/console/sign-in", headers=https)
    assert "secure" in form.headers["Set-Cookie"].lower()
    nonce = hidden(await form.text(), "nonce")
    # A client keeps Secure cookies to itself over plain HTTP: send it as the browser would.
    resp = await client.post(
        "/console/sign-in",
        data={"nonce": nonce, "token": ADMIN_TOKEN},
        headers={**https, "Cookie": f"console_signin={nonce}"},
        allow_redirects=False,
    )
    assert resp.status == 303 and "secure" in session_cookie(resp).lower()


async def test_security_headers_and_csp(console: Console) -> None:
    team = await console.team("acme")
    browser = await signed_in(console)
    pages = [
        "/console/sign-in",
        "/console/teams",
        f"/console/teams/{team}/keys",
        f"/console/teams/{team}/credits",
        f"/console/teams/{team}/usage",
        f"/console/teams/{team}/usage?range=30d",
        "/console/teams/no-such-team/keys",
    ]
    for path in pages:
        resp = await browser.client.get(path, allow_redirects=False)
        assert resp.status in (200, 303, 404), path
        csp = resp.headers["Content-Security-Policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["default-src"] == "'self'"
        assert directives["frame-ancestors"] == "'none'"
        assert directives["form-action"] == "'self'"
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert resp.headers["Cache-Control"] == "no-store"
        html = await resp.text()
        # Nothing the policy would block: no inline script, style element or attribute,
        # no event handler attribute, nothing from another origin.
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), path
        assert "<style" not in html and " style=" not in html, path
        assert not re.search(r"\son[a-z]+=", html), path
        for url in re.findall(r'(?:src|href|action)="([^"]*)"', html):
            assert url.startswith("/console") or url.startswith("#"), (path, url)
    for name, kind in (("console.css", "text/css"), ("console.js", "text/javascript")):
        resp = await browser.client.get(f"/console/static/{name}")
        assert resp.status == 200 and resp.content_type == kind
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert (await browser.client.get("/console/static/../__init__.py")).status == 404
    assert (await browser.client.get("/console/static/nope.js")).status == 404


async def test_csrf_is_refused(console: Console) -> None:
    team = await console.team("acme")
    browser = await signed_in(console)
    keys = f"/console/teams/{team}/keys"
    html = await browser.page(keys)
    csrf, nonce = hidden(html, "csrf"), hidden(html, "nonce")
    attempts: list[tuple[dict[str, str], dict[str, str]]] = [
        ({"nonce": nonce, "name": "x", "environment": "live"}, {}),
        ({"csrf": "forged", "nonce": nonce, "name": "x", "environment": "live"}, {}),
        ({"csrf": csrf, "nonce": nonce, "name": "x"}, {"Sec-Fetch-Site": "cross-site"}),
        ({"csrf": csrf, "nonce": nonce, "name": "x"}, {"Sec-Fetch-Site": "same-site"}),
        ({"csrf": csrf, "nonce": nonce, "name": "x"}, {"Origin": "http://evil.example"}),
    ]
    for data, headers in attempts:
        resp = await browser.client.post(keys, data=data, headers=headers, allow_redirects=False)
        assert resp.status == 403, (data, headers, resp.status)
        assert "Request refused" in await resp.text()
    listed = await console.api("GET", f"/admin/v1/teams/{team}/keys")
    assert listed["items"] == []
    # Another session's token is no good either.
    other = await signed_in(console)
    other_csrf = hidden(await other.page(keys), "csrf")
    resp = await browser.client.post(
        keys, data={"csrf": other_csrf, "nonce": nonce, "name": "x"}, allow_redirects=False
    )
    assert resp.status == 403
    # What a browser sends for the console's own form passes.
    resp = await browser.client.post(
        keys,
        data={"csrf": csrf, "nonce": nonce, "name": "ok", "environment": "live"},
        headers={"Sec-Fetch-Site": "same-origin", "Origin": "null"},
    )
    assert resp.status == 200
    assert len((await console.api("GET", f"/admin/v1/teams/{team}/keys"))["items"]) == 1
    # Sign-out and sign-in are state changes too.
    resp = await browser.client.post("/console/sign-out", data={}, allow_redirects=False)
    assert resp.status == 403
    fresh = await console.browser()
    resp = await fresh.client.post(
        "/console/sign-in", data={"token": ADMIN_TOKEN, "nonce": "guessed"}, allow_redirects=False
    )
    assert resp.status == 403 and "console_session" not in resp.headers.get("Set-Cookie", "")


async def test_session_expiry(console: Console) -> None:
    team = await console.team("acme")
    keys = f"/console/teams/{team}/keys"
    browser = await signed_in(console)
    for _ in range(8):  # active use keeps it alive up to the absolute lifetime
        console.clock.now += 3599
        await browser.page(keys)
    console.clock.now += 3600 * 8 - 8 * 3599
    resp = await browser.client.get(keys, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/console/sign-in"
    # Idle for an hour: gone as well.
    browser = await signed_in(console)
    await browser.page(keys)
    console.clock.now += 3600
    resp = await browser.client.get(keys, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/console/sign-in"
    # A POST without a live session changes nothing.
    resp = await browser.client.post(keys, data={"name": "x"}, allow_redirects=False)
    assert resp.status == 303
    assert (await console.api("GET", f"/admin/v1/teams/{team}/keys"))["items"] == []


async def test_sign_out(console: Console) -> None:
    browser = await signed_in(console)
    cookie = browser.client.session.cookie_jar.filter_cookies(browser.client.make_url("/console"))
    old = cookie["console_session"].value
    resp = await browser.post("/console/sign-out", {}, form_page="/console/teams")
    assert resp.status == 303 and resp.headers["Location"] == "/console/sign-in"
    cleared = SimpleCookie(session_cookie(resp))["console_session"]
    assert cleared.value == "" and cleared["max-age"] == "0" and cleared["path"] == "/console"
    assert len(console.server.app[SESSIONS]) == 0
    # The old cookie, replayed by hand, is dead on the server too.
    replay = await console.browser()
    resp = await replay.client.get(
        "/console/teams", headers={"Cookie": f"console_session={old}"}, allow_redirects=False
    )
    assert resp.status == 303 and resp.headers["Location"] == "/console/sign-in"


async def test_sign_in_accepts_what_the_admin_api_accepts(console: Console) -> None:
    await console.team("mine")
    token = (await console.api("POST", "/admin/v1/teams/mine/tokens", {"name": "ci"}))["token"]
    revoked = await console.api("POST", "/admin/v1/teams/mine/tokens", {"name": "old"})
    await console.api("POST", f"/admin/v1/tokens/{revoked['id']}/revoke")
    candidates = [
        ADMIN_TOKEN,
        f"  {ADMIN_TOKEN}  ",
        token,
        revoked["token"],
        ADMIN_TOKEN[:-1],
        ADMIN_TOKEN + "x",
        token[:-1] + ("A" if token[-1] != "A" else "B"),
        "",
        "ckiq_mgmt_" + "0" * 38,
    ]
    for candidate in candidates:
        api = await (await console.browser()).client.get(
            "/admin/v1/teams", headers={"Authorization": f"Bearer {candidate}"}
        )
        resp = await (await console.browser()).sign_in(candidate)
        assert (api.status == 200) == (resp.status == 303), (candidate, api.status, resp.status)
        if resp.status != 303:
            assert resp.status == 403 and "was not accepted" in await resp.text()


async def test_wrong_tokens_are_throttled(console: Console) -> None:
    browser = await console.browser()
    for _ in range(10):
        assert (await browser.sign_in("wrong-token-but-long-enough")).status == 403
    resp = await browser.sign_in(ADMIN_TOKEN)
    assert resp.status == 429 and "Too many" in await resp.text()


async def test_team_token_sees_only_its_own_team(console: Console) -> None:
    mine = await console.team("mine")
    other = await console.team("other")
    token = (await console.api("POST", f"/admin/v1/teams/{mine}/tokens", {"name": "t"}))["token"]
    other_key = await console.api("POST", f"/admin/v1/teams/{other}/keys", {"name": "theirs"})
    browser = await signed_in(console, token)
    assert (await browser.client.get("/console", allow_redirects=False)).headers[
        "Location"
    ] == f"/console/teams/{mine}/keys"
    resp = await browser.client.get("/console/teams", allow_redirects=False)
    assert resp.headers["Location"] == f"/console/teams/{mine}/keys"
    own = await browser.page(f"/console/teams/{mine}/keys")
    assert "mine" in own and "other" not in own and 'id="team-picker"' not in own
    for page in ("keys", "credits", "usage", "usage?range=7d"):
        html = await browser.page(f"/console/teams/{other}/{page}", expect=404)
        assert "theirs" not in html and "other" not in html
    await browser.page("/console/teams/other/keys", expect=404)  # by name as well
    await browser.page(f"/console/go?team={other}", expect=404)
    key_pages = f"/console/teams/{other}/keys/{other_key['id']}"
    await browser.page(key_pages + "/revoke", expect=404)
    await browser.page(key_pages + "/rotate", expect=404)
    # Another team's key under one's own team's path does not exist either.
    await browser.page(f"/console/teams/{mine}/keys/{other_key['id']}/revoke", expect=404)
    csrf = hidden(own, "csrf")
    for path in (f"/console/teams/{other}/keys", key_pages + "/revoke", key_pages + "/rotate"):
        resp = await browser.client.post(
            path, data={"csrf": csrf, "name": "x", "grace_seconds": "0"}, allow_redirects=False
        )
        assert resp.status == 404, path
    revoke_own_path = f"/console/teams/{mine}/keys/{other_key['id']}/revoke"
    resp = await browser.client.post(revoke_own_path, data={"csrf": csrf}, allow_redirects=False)
    assert resp.status == 404
    listed = await console.api("GET", f"/admin/v1/teams/{other}/keys")
    assert [k["status"] for k in listed["items"]] == ["active"]
    # Credits: no grant form for a team token, and a forged grant is refused.
    credits = await browser.page(f"/console/teams/{mine}/credits")
    assert "Grant credits" not in credits and 'name="amount"' not in credits
    resp = await browser.client.post(
        f"/console/teams/{mine}/credits",
        data={"csrf": csrf, "nonce": "x", "amount": "100", "reason": "free money"},
        allow_redirects=False,
    )
    assert resp.status == 403
    balances = await console.api("GET", f"/admin/v1/teams/{mine}/credits")
    assert balances["balances"]["live"] == 0
    # Operators-only sections are not on a team token's usage page.
    assert "Authentication failures" not in await browser.page(f"/console/teams/{mine}/usage")


async def test_revoked_team_token_ends_its_sessions(console: Console) -> None:
    mine = await console.team("mine")
    created = await console.api("POST", f"/admin/v1/teams/{mine}/tokens", {"name": "t"})
    browser = await signed_in(console, created["token"])
    await browser.page(f"/console/teams/{mine}/keys")
    await console.api("POST", f"/admin/v1/tokens/{created['id']}/revoke")
    resp = await browser.client.get(f"/console/teams/{mine}/keys", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/console/sign-in"


async def test_key_is_shown_once(console: Console) -> None:
    team = await console.team("acme")
    browser = await signed_in(console)
    keys = f"/console/teams/{team}/keys"
    html = await browser.page(keys)
    data = {
        "csrf": hidden(html, "csrf"),
        "nonce": hidden(html, "nonce"),
        "name": "prod",
        "environment": "test",
    }
    resp = await browser.client.post(keys, data=data, allow_redirects=False)
    assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
    created = await resp.text()
    secret = hidden(created.replace('readonly value="', 'name="secret" value="'), "secret")
    assert secret.startswith("ckiq_test_") and created.count(secret) == 1
    assert "won't be shown again" in created
    # Never again: not on the list, not after a reload, not from the same form twice.
    assert secret not in await browser.page(keys)
    resp = await browser.client.post(keys, data=data)
    again = await resp.text()
    assert secret not in again and "already sent" in again
    listed = await console.api("GET", f"/admin/v1/teams/{team}/keys")
    assert len(listed["items"]) == 1 and listed["items"][0]["environment"] == "test"
    assert not any(secret in repr(s) for s in console.server.app[SESSIONS])
    audit = await console.api("GET", "/admin/v1/audit")
    assert audit["items"][0]["action"] == "key.create"
    assert audit["items"][0]["details"]["via"] == "console" and secret not in str(audit)
    # Bad input is named next to its field.
    html = await browser.page(keys)
    resp = await browser.client.post(
        keys, data={"csrf": hidden(html, "csrf"), "nonce": hidden(html, "nonce"), "name": ""}
    )
    assert resp.status == 422 and 'aria-invalid="true"' in await resp.text()


async def test_rotate_with_grace(console: Console) -> None:
    team = await console.team("acme")
    old = await console.api("POST", f"/admin/v1/teams/{team}/keys", {"name": "k"})
    await console.api("POST", f"/admin/v1/teams/{team}/credits", {"amount": 5, "reason": "x"})
    browser = await signed_in(console)
    rotate = f"/console/teams/{team}/keys/{old['id']}/rotate"
    resp = await browser.post(rotate, {"grace_seconds": "3600"})
    assert resp.status == 200
    html = await resp.text()
    assert "won't be shown again" in html and "keeps working until" in html
    listed = (await console.api("GET", f"/admin/v1/teams/{team}/keys"))["items"]
    assert len(listed) == 2
    previous = next(k for k in listed if k["id"] == old["id"])
    assert previous["expires_at"] is not None and previous["status"] == "active"
    await console.harness.gateway.keys.poll_once()
    public = console.harness.client
    assert (await public.post("/api/v1/assess", headers=bearer(old["key"]))).status == 200


async def test_grant_credits(console: Console) -> None:
    team = await console.team("acme")
    browser = await signed_in(console)
    credits = f"/console/teams/{team}/credits"
    resp = await browser.post(credits, {"amount": "0", "environment": "live", "reason": "x"})
    assert resp.status == 422 and "must not be 0" in await resp.text()
    resp = await browser.post(credits, {"amount": "ten", "environment": "live", "reason": "x"})
    assert resp.status == 422 and "must be an integer" in await resp.text()
    resp = await browser.post(credits, {"amount": "5", "environment": "live", "reason": ""})
    assert resp.status == 422 and "Reason is required" in await resp.text()
    resp = await browser.post(credits, {"amount": "-5", "environment": "live", "reason": "x"})
    assert resp.status == 409
    resp = await browser.post(
        credits, {"amount": "250", "environment": "live", "reason": "invoice 7"}
    )
    assert resp.status == 303
    html = await browser.page(credits)
    assert "New balance: 250" in html and "invoice 7" in html and "+250" in html
    balances = await console.api("GET", f"/admin/v1/teams/{team}/credits")
    assert balances["balances"]["live"] == 250
    audit = (await console.api("GET", "/admin/v1/audit"))["items"][0]
    assert audit["action"] == "credits.grant" and audit["actor"] == "admin"


async def test_values_are_escaped(console: Console) -> None:
    team = await console.team('<script>alert("x")</script>')
    await console.api(
        "POST", f"/admin/v1/teams/{team}/keys", {"name": "<img src=x onerror=alert(1)>"}
    )
    browser = await signed_in(console)
    for path in ("/console/teams", f"/console/teams/{team}/keys", f"/console/teams/{team}/usage"):
        html = await browser.page(path)
        assert "<script>alert" not in html and "<img src=x" not in html
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html


async def test_usage_page_counts_requests(console: Console) -> None:
    team = await console.team("acme")
    created = await console.api("POST", f"/admin/v1/teams/{team}/keys", {"name": "busy key"})
    await console.api("POST", f"/admin/v1/teams/{team}/credits", {"amount": 3, "reason": "x"})
    public = console.harness.client
    statuses = [
        (await public.post("/api/v1/assess", headers=bearer(created["key"]))).status
        for _ in range(5)
    ]
    assert statuses == [200, 200, 200, 402, 402]
    assert (await public.post("/api/v1/assess", headers=bearer("ckiq_live_nope"))).status == 401
    await console.harness.gateway.usage.flush()
    browser = await signed_in(console)
    for span in ("24h", "7d", "30d", "bogus"):
        html = await browser.page(f"/console/teams/{team}/usage?range={span}")
        assert (
            "<svg" in html and 'class="o-ok"' in html and 'class="o-insufficient_credits"' in html
        )
        stats = re.findall(r'<p class="value">([^<]*)</p>', html)
        assert stats[:3] == ["5", "3", "3"], stats
        assert "busy key" in html  # top keys
        assert "Authentication failures" in html
    assert (
        len(re.findall(r'<g class="bar">', await browser.page(f"/console/teams/{team}/usage")))
        == 24
    )
    assert (
        len(
            re.findall(
                r'<g class="bar">', await browser.page(f"/console/teams/{team}/usage?range=7d")
            )
        )
        == 7
    )


async def test_anomalies_are_marked_on_the_chart(console: Console) -> None:
    team = await console.team("acme")
    other = await console.team("other")
    key = await console.api("POST", f"/admin/v1/teams/{team}/keys", {"name": "spiky"})
    detector = console.harness.gateway.anomalies
    assert detector is not None
    now = time.time()
    # Signals as the detector raises them (its own value type, appended where it keeps them).
    detector.recent.append(
        Anomaly("rate_spike", now, key["id"], team, 90, 60, "90 requests in 60 s")
    )
    detector.recent.append(Anomaly("new_ips", now, "key_0", other, 25, 20, "elsewhere"))
    detector.recent.append(Anomaly("auth_failures", now, "10.0.0.9", None, 40, 20, "40 refused"))
    detector.recent.append(
        Anomaly("rate_spike", now - 3 * 86400, key["id"], team, 1, 1, "stale signal")
    )
    browser = await signed_in(console)
    html = await browser.page(f"/console/teams/{team}/usage")
    assert html.count('<g class="anomaly">') == 1
    assert "Rate spike: 90 requests in 60 s" in html and "spiky" in html
    assert "elsewhere" not in html and "stale signal" not in html
    assert "40 refused" in html  # operators see auth-failure signals of all teams
    assert (await browser.page(f"/console/teams/{team}/usage?range=7d")).count(
        '<g class="anomaly">'
    ) == 2
    token = (await console.api("POST", f"/admin/v1/teams/{team}/tokens", {"name": "t"}))["token"]
    html = await (await signed_in(console, token)).page(f"/console/teams/{team}/usage")
    assert "90 requests in 60 s" in html and "40 refused" not in html


def test_stacked_bars_are_proportional() -> None:
    buckets = [
        Bucket(0, {"ok": 30, "upstream_error": 10}, 30),
        Bucket(3600, {}, 0),
        Bucket(7200, {"ok": 20}, 20),
    ]
    svg = stacked_bars(buckets, 3600, "t")
    heights = {
        (cls, float(x)): float(h)
        for cls, x, h in re.findall(
            r'<rect class="o-(\w+)" x="([\d.]+)" y="[\d.]+" width="[\d.]+" height="([\d.]+)"', svg
        )
    }
    assert len(heights) == 3
    ok_first, error_first, ok_third = (
        heights[k] for k in sorted(heights, key=lambda k: (k[1], k[0]))
    )
    assert abs(ok_first / error_first - 3) < 0.05 and abs(ok_first / ok_third - 1.5) < 0.05
    assert "<title>" in svg and 'role="img"' in svg
    assert "No requests in this period" in stacked_bars([Bucket(0, {}, 0)], 3600, "t")


async def test_ledger_is_paged(console: Console) -> None:
    team = await console.team("acme")
    for n in range(1, 31):
        await console.harness.gateway.management.grant(team, n, f"grant number {n}")
    browser = await signed_in(console)
    first = await browser.page(f"/console/teams/{team}/credits")
    assert re.findall(r'class="value">([^<]*)<', first)[0] == "465"
    seen = re.findall(r"grant number (\d+)<", first)
    assert len(seen) == 25
    older = re.search(r'href="([^"]*before=[^"]*)">Older entries', first)
    assert older is not None
    second = await browser.page(older.group(1).replace("&amp;", "&"))
    rest = re.findall(r"grant number (\d+)<", second)
    assert len(rest) == 5 and sorted(map(int, seen + rest)) == list(range(1, 31))
    assert "Newest entries" in second and "Older entries" not in second
    await browser.page(f"/console/teams/{team}/credits?before=garbage", expect=400)


async def test_requests_page_lists_and_filters_the_request_log(console: Console) -> None:
    team = await console.team("acme")
    created = await console.api("POST", f"/admin/v1/teams/{team}/keys", {"name": "busy key"})
    quiet = await console.api("POST", f"/admin/v1/teams/{team}/keys", {"name": "quiet key"})
    await console.api("POST", f"/admin/v1/teams/{team}/credits", {"amount": 1, "reason": "x"})
    public = console.harness.client
    for _ in range(2):
        await public.post("/api/v1/assess?secret=s3cr3t", headers=bearer(created["key"]))
    assert console.harness.gateway.request_log is not None
    await console.harness.gateway.request_log.flush()
    browser = await signed_in(console)
    html = await browser.page(f"/console/teams/{team}/requests")
    assert html.count("<tr><td><time") == 2 and "insufficient credits" in html
    assert "busy key" in html and created["prefix"] in html and "s3cr3t" not in html
    html = await browser.page(f"/console/teams/{team}/requests?status=4xx")
    assert html.count("<tr><td><time") == 1 and 'value="4xx"' in html
    html = await browser.page(f"/console/teams/{team}/requests?key_id={quiet['id']}")
    assert "No requests match." in html
    bad = await browser.page(f"/console/teams/{team}/requests?client_ip=nonsense", expect=422)
    assert "client ip must be an IP address or a CIDR network" in bad and 'value="nonsense"' in bad
    # A signal names its key and links to the requests behind it.
    detector = console.harness.gateway.anomalies
    assert detector is not None
    detector.recent.append(
        Anomaly("rate_spike", time.time(), created["id"], team, 90, 60, "90 requests in 60 s")
    )
    usage = await browser.page(f"/console/teams/{team}/usage")
    assert f"/console/teams/{team}/requests?key_id={created['id']}" in usage


async def test_the_credits_page_shows_the_plan_and_its_next_refill(console: Console) -> None:
    team = await console.team("acme")
    browser = await signed_in(console)
    credits = f"/console/teams/{team}/credits"
    assert "Plan:" not in await browser.page(credits)
    shown = await console.api(
        "PUT", f"/admin/v1/teams/{team}/plan", {"allowance": 1500, "period": "week"}
    )
    html = await browser.page(credits)
    assert "Plan: 1,500 per week (unused allowance expires)" in html
    assert f'datetime="{shown["next_refill_at"]}"' in html


async def test_the_keys_page_shows_each_keys_caps_and_what_it_has_spent(
    console: Console,
) -> None:
    team = await console.team("capped")
    made = await console.api("POST", f"/admin/v1/teams/{team}/keys", {"name": "staging"})
    await console.api("POST", f"/admin/v1/teams/{team}/keys", {"name": "free"})
    await console.api("POST", f"/admin/v1/teams/{team}/credits", {"amount": 50, "reason": "t"})
    await console.api(
        "PATCH",
        f"/admin/v1/keys/{made['id']}",
        {"credit_cap_per_day": 5, "credit_cap_per_month": 1200, "quota_per_day": 1000},
    )
    gw = console.harness
    for _ in range(2):
        resp = await gw.client.post("/api/v1/assess", headers=bearer(made["key"]))
        assert resp.status == 200
    await gw.settle()
    browser = await console.browser()
    await browser.sign_in(ADMIN_TOKEN)
    html = await browser.page(f"/console/teams/{team}/keys")
    row = html[html.index(f'data-key-id="{made["id"]}"') :].split("</tr>")[0]
    assert "2 of 5 credits today" in row
    assert "2 of 1,200 credits this month" in row
    assert "1,000 requests a day" in row
    other = html[html.index('<th scope="row">free</th>') :].split("</tr>")[0]
    assert "credits today" not in other and "—" in other
