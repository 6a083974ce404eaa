"""Property-based checks (hypothesis) of the config loader and the header handling."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import ConfigError, IdentityHeaderSettings, settings_from_mapping
from gateway.proxy import HOP_BY_HOP, HeaderPolicy

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20)
)
_values: st.SearchStrategy[Any] = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
_known = st.sampled_from(
    [
        "listen",
        "storage",
        "limiter",
        "rate_limit",
        "credits",
        "routes",
        "upstreams",
        "admin",
        "keys",
        "trusted_proxies",
        "logging",
        "shutdown",
        "postgres",
        "usage",
        "anomalies",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.one_of(_known, st.text(max_size=12)), _values, max_size=6))
def test_the_config_loader_accepts_or_names_the_problem(raw: dict[str, Any]) -> None:
    try:
        settings_from_mapping(raw, "fuzz.yaml", serving=False)
    except ConfigError as exc:
        # Never another exception; every line names the file.
        assert all(line.startswith("fuzz.yaml: ") for line in str(exc).splitlines())


_token = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz-ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    min_size=1,
    max_size=20,
)
_names = st.one_of(
    _token,
    st.sampled_from(
        [
            "Authorization",
            "authorization",
            "Connection",
            "Keep-Alive",
            "TE",
            "Upgrade",
            "Transfer-Encoding",
            "Proxy-Authorization",
            "X-Gateway-Team-Id",
            "x-gateway-key-id",
            "X-Gateway-Anything",
            "X-Forwarded-For",
            "Forwarded",
            "Host",
            "Expect",
            "Content-Length",
            "X-Request-Id",
        ]
    ),
)
_header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30
)


# One policy for all examples, as in a running gateway: its per-name verdicts,
# remembered from earlier examples, must still be right for later ones.
_POLICY = HeaderPolicy(IdentityHeaderSettings())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_names, _header_values), max_size=12), st.booleans())
def test_nothing_that_must_not_be_forwarded_is(pairs: list[tuple[str, str]], trusted: bool) -> None:
    incoming = CIMultiDictProxy(CIMultiDict(pairs))
    identity = IdentityHeaderSettings()
    out = _POLICY.upstream(
        incoming,
        identity_values={
            identity.team: "team_1",
            identity.key: "key_1",
            identity.environment: "live",
        },
        extra={},
        peer="127.0.0.1",
        trusted=trusted,
        scheme="http",
        request_id="rid",
    )
    names = {name.lower() for name in out}
    connection_listed = {
        token.strip().lower()
        for value in incoming.getall("Connection", [])
        for token in value.split(",")
        if token.strip()
    }
    assert "authorization" not in names
    assert not (names & HOP_BY_HOP)
    assert not (
        names & (connection_listed - {"x-forwarded-for", "x-forwarded-proto", "x-request-id"})
    )
    # Identity headers are exactly the gateway's, never the client's.
    assert out.getall(identity.team) == ["team_1"] and out.getall(identity.key) == ["key_1"]
    assert [n for n in names if n.startswith("x-gateway-")] == sorted(
        {identity.team.lower(), identity.key.lower(), identity.environment.lower()}
    ) or set(n for n in names if n.startswith("x-gateway-")) == {
        identity.team.lower(),
        identity.key.lower(),
        identity.environment.lower(),
    }
    assert out.getall("X-Request-Id") == ["rid"]
    if not trusted:
        assert out["X-Forwarded-For"] == "127.0.0.1" and "forwarded" not in names


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_names | st.just("X-Gateway-Charge"), _header_values), max_size=12))
def test_the_client_never_sees_hop_by_hop_or_the_charge_header(
    pairs: list[tuple[str, str]],
) -> None:
    out = _POLICY.client(CIMultiDictProxy(CIMultiDict(pairs)))
    names = {name.lower() for name in out}
    assert not (names & HOP_BY_HOP)
    assert "x-gateway-charge" not in names and "content-length" not in names
