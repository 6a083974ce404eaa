import zlib

from hypothesis import given
from hypothesis import strategies as st

from gateway.keys import (
    BASE62,
    checksum,
    display_prefix,
    generate_key,
    generate_token,
    hash_secret,
    is_token_shaped,
    parse_key,
)


def _base62(n: int) -> str:
    out = ""
    while n:
        n, r = divmod(n, 62)
        out = BASE62[r] + out
    return out.rjust(6, "0")


def test_generated_keys_have_the_contract_shape() -> None:
    for env in ("live", "test"):
        key = generate_key(env)  # type: ignore[arg-type]
        assert key.startswith(f"ckiq_{env}_")
        assert len(key) == 10 + 32 + 6
        assert set(key[10:]) <= set(BASE62)
        # The checksum is CRC32 of everything before it, base62, most significant first.
        assert key[-6:] == _base62(zlib.crc32(key[:-6].encode()))
        parsed = parse_key(key)
        assert parsed is not None and parsed.environment == env


def test_checksum_is_left_padded() -> None:
    # A body whose CRC32 is small still yields six digits.
    assert len(checksum("")) == 6
    assert checksum("") == _base62(zlib.crc32(b"")) == "000000"  # CRC32 of nothing is 0


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60))
def test_checksum_is_crc32_in_six_base62_digits(body: str) -> None:
    assert checksum(body) == _base62(zlib.crc32(body.encode()))


def test_keys_are_random() -> None:
    assert len({generate_key("live") for _ in range(200)}) == 200


def test_a_single_changed_character_fails_the_checksum() -> None:
    key = generate_key("live")
    for index in range(10, len(key)):
        replacement = "A" if key[index] != "A" else "B"
        typo = key[:index] + replacement + key[index + 1 :]
        assert parse_key(typo) is None


def test_wrong_prefix_length_or_alphabet_is_rejected() -> None:
    key = generate_key("live")
    assert parse_key("ckiq_prod_" + key[10:]) is None
    assert parse_key(key + "0") is None
    assert parse_key(key[:-1]) is None
    assert parse_key(key[:20] + "-" + key[21:]) is None
    assert parse_key("") is None


def test_a_management_token_is_not_an_api_key() -> None:
    token = generate_token()
    assert is_token_shaped(token)
    assert parse_key(token) is None
    assert not is_token_shaped(generate_key("live"))


def test_hash_uses_the_pepper() -> None:
    key = generate_key("test")
    plain = hash_secret(key, None)
    peppered = hash_secret(key, b"pepper")
    assert plain != peppered and len(plain) == len(peppered) == 64
    assert hash_secret(key, b"pepper") == peppered
    assert key not in plain


def test_display_prefix_is_fourteen_characters() -> None:
    key = generate_key("live")
    assert display_prefix(key) == key[:14]
    assert display_prefix(key).startswith("ckiq_live_")


@given(st.text(max_size=80))
def test_parse_never_raises_and_accepts_only_valid_keys(text: str) -> None:
    parsed = parse_key(text)
    if parsed is not None:
        assert checksum(text[:-6]) == text[-6:]
