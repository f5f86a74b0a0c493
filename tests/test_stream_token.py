import hashlib
import hmac

import pytest

from bot.stream_token import check_stream_token, mint_stream_token

KEY = b"k" * 32
NOW = 1_800_000_000.0


def test_a_fresh_token_is_accepted_for_its_call() -> None:
    token = mint_stream_token(KEY, "CA1", NOW, ttl_s=120)
    assert check_stream_token(KEY, token, "CA1", NOW + 60) is None


def test_a_token_is_refused_for_another_call() -> None:
    token = mint_stream_token(KEY, "CA1", NOW, ttl_s=120)
    assert check_stream_token(KEY, token, "CA2", NOW) == "bad_signature"


def test_a_token_is_refused_for_another_store() -> None:
    token = mint_stream_token(KEY, "CA1", NOW, ttl_s=120, store="downtown")
    assert check_stream_token(KEY, token, "CA1", NOW, store="downtown") is None
    assert check_stream_token(KEY, token, "CA1", NOW, store="uptown") == "bad_signature"
    assert check_stream_token(KEY, token, "CA1", NOW) == "bad_signature"


def storeless_token(call_sid: str, expires_at: int) -> str:
    """A token as the release before stores minted it: no store in what it signs."""
    mac = hmac.new(KEY, f"v1.{expires_at}.{call_sid}".encode(), hashlib.sha256).hexdigest()
    return f"v1.{expires_at}.{mac}"


def test_a_token_minted_before_stores_still_opens_the_default_stores_stream_and_no_other() -> None:
    token = storeless_token("CA1", int(NOW) + 120)
    assert check_stream_token(KEY, token, "CA1", NOW) is None
    assert check_stream_token(KEY, token, "CA2", NOW) == "bad_signature"
    assert check_stream_token(KEY, token, "CA1", NOW, store="downtown") == "bad_signature"
    assert check_stream_token(KEY, token, "CA1", NOW + 121) == "expired"


def test_an_expired_token_is_refused() -> None:
    token = mint_stream_token(KEY, "CA1", NOW, ttl_s=120)
    assert check_stream_token(KEY, token, "CA1", NOW + 121) == "expired"


def test_a_token_made_with_another_key_is_refused() -> None:
    token = mint_stream_token(b"other", "CA1", NOW, ttl_s=120)
    assert check_stream_token(KEY, token, "CA1", NOW) == "bad_signature"


def test_missing_and_malformed_tokens_are_refused_with_their_reason() -> None:
    assert check_stream_token(KEY, None, "CA1", NOW) == "missing"
    assert check_stream_token(KEY, "", "CA1", NOW) == "missing"
    assert check_stream_token(KEY, "v1.abc.def", "CA1", NOW) == "malformed"
    assert check_stream_token(KEY, "garbage", "CA1", NOW) == "malformed"


def test_an_extended_expiry_breaks_the_signature() -> None:
    token = mint_stream_token(KEY, "CA1", NOW, ttl_s=120)
    version, expiry, mac = token.split(".")
    forged = f"{version}.{int(expiry) + 3600}.{mac}"
    assert check_stream_token(KEY, forged, "CA1", NOW + 500) == "bad_signature"


@pytest.mark.parametrize(
    "token",
    ["v1.²³.abc", "v1.١٢٣.abc", "v1.1800000000.é" + "0" * 63, "v1." + "9" * 400 + ".abc", "v1.-5.abc"],
    ids=["superscript-digits", "arabic-digits", "non-ascii-mac", "huge-expiry", "negative-expiry"],
)
def test_a_token_with_anything_but_ascii_digits_and_hex_is_malformed_not_an_error(token: str) -> None:
    assert check_stream_token(KEY, token, "CA1", NOW) == "malformed"
