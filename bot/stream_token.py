"""Short-lived tokens that bind a Media Stream to the call whose signed webhook minted it.

The stream URL carries no query string (Twilio forbids one), so the token travels as a
`<Parameter>` and comes back in `start.customParameters`, beside the id of the store whose number
was dialled, which the token also signs. Format: `v2.<expiry>.<hex hmac>`.

`v1` tokens (signed before there were stores: no store in the MAC) are still taken for the default
store, so a call whose webhook an older process answered keeps its stream through a rolling
upgrade; they can never open another store's stream.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal

from bot.stores import DEFAULT_STORE_ID
from bot.wire import parse_digits

TOKEN_VERSION = "v2"
STORELESS_VERSION = "v1"

RejectReason = Literal["missing", "malformed", "expired", "bad_signature"]


def _mac(key: bytes, version: str, call_sid: str, store: str, expires_at: int) -> str:
    signed = f"{version}.{expires_at}.{call_sid}"
    if version == TOKEN_VERSION:
        signed += f".{store}"
    return hmac.new(key, signed.encode(), hashlib.sha256).hexdigest()


def mint_stream_token(
    key: bytes, call_sid: str, now_s: float, ttl_s: int, store: str = DEFAULT_STORE_ID
) -> str:
    """A token for this call's stream, vouching that the call is for `store` (a store id)."""
    expires_at = int(now_s) + ttl_s
    return f"{TOKEN_VERSION}.{expires_at}.{_mac(key, TOKEN_VERSION, call_sid, store, expires_at)}"


def check_stream_token(
    key: bytes, token: str | None, call_sid: str, now_s: float, store: str = DEFAULT_STORE_ID
) -> RejectReason | None:
    """None when the token is good for this CallSid and store now, else why it is not."""
    if not token:
        return "missing"
    parts = token.split(".")
    version = parts[0]
    known = len(parts) == 3 and version in (TOKEN_VERSION, STORELESS_VERSION)
    expires_at = parse_digits(parts[1]) if known else None
    if expires_at is None or not parts[2].isascii():
        return "malformed"
    if version == STORELESS_VERSION and store != DEFAULT_STORE_ID:
        return "bad_signature"
    if not hmac.compare_digest(parts[2], _mac(key, version, call_sid, store, expires_at)):
        return "bad_signature"
    if now_s > expires_at:
        return "expired"
    return None
