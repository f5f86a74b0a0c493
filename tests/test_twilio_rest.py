"""The Twilio REST client against the local stand-in: the calls work, failures map to 3 outcomes."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from bot.sim.twilio_api import TwilioApiSimulator
from bot.twilio_rest import (
    TwilioAmbiguousError,
    TwilioPermanentError,
    TwilioRest,
    TwilioRetryableError,
    retry_after_seconds,
)

pytestmark = pytest.mark.anyio

CALLER = "+15551230001"
STORE = "+15557654321"


@pytest.fixture
async def sim() -> AsyncIterator[TwilioApiSimulator]:
    async with TwilioApiSimulator() as simulator:
        yield simulator


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def rest_for(sim: TwilioApiSimulator, http: httpx.AsyncClient, **kwargs: object) -> TwilioRest:
    options: dict[str, object] = {
        "account_sid": sim.account_sid,
        "auth_token": sim.auth_token,
        "http": http,
        "from_number": STORE,
        "api_base": sim.base_url,
    }
    options.update(kwargs)
    return TwilioRest(**options)  # type: ignore[arg-type]


@pytest.fixture
def rest(sim: TwilioApiSimulator, http: httpx.AsyncClient) -> TwilioRest:
    return rest_for(sim, http)


async def test_send_sms_creates_one_message_with_body_and_media(
    sim: TwilioApiSimulator, rest: TwilioRest
) -> None:
    sid = await rest.send_sms(CALLER, "Your washer details", ["https://m.example/a.jpg"])
    assert [(m["sid"], m["to"], m["from"], m["body"]) for m in sim.messages] == [
        (sid, CALLER, STORE, "Your washer details")
    ]
    assert sim.messages[0]["media_urls"] == ["https://m.example/a.jpg"]


async def test_recent_messages_lists_the_callers_messages_since_a_time_newest_first(
    rest: TwilioRest,
) -> None:
    first = await rest.send_sms(CALLER, "one")
    second = await rest.send_sms(CALLER, "two")
    await rest.send_sms("+15551230009", "someone else")
    since = datetime.now(UTC) - timedelta(minutes=1)
    found = await rest.recent_messages(CALLER, since)
    assert [(m.sid, m.body) for m in found] == [(second, "two"), (first, "one")]
    assert found[0].status == "delivered" and found[0].date_created is not None
    assert await rest.recent_messages(CALLER, datetime.now(UTC) + timedelta(minutes=1)) == []


@pytest.mark.parametrize(
    ("number", "code"), [("555-1234", 21211), ("+15551230002", 21610), ("+15551230003", 21614)]
)
async def test_refusals_become_permanent_errors_with_twilios_code(
    sim: TwilioApiSimulator, rest: TwilioRest, number: str, code: int
) -> None:
    sim.unsubscribed.add("+15551230002")
    sim.landlines.add("+15551230003")
    with pytest.raises(TwilioPermanentError) as raised:
        await rest.send_sms(number, "hi")
    assert raised.value.code == code and raised.value.status == 400
    assert not raised.value.message.startswith("Unable to")


async def test_wrong_credentials_are_a_permanent_20003(
    sim: TwilioApiSimulator, http: httpx.AsyncClient
) -> None:
    with pytest.raises(TwilioPermanentError) as raised:
        await rest_for(sim, http, auth_token="wrong").send_sms(CALLER, "hi")
    assert raised.value.code == 20003 and raised.value.status == 401


async def test_a_429_is_retryable_and_carries_retry_after(sim: TwilioApiSimulator, rest: TwilioRest) -> None:
    sim.fail_next(1, status=429, retry_after=3)
    with pytest.raises(TwilioRetryableError) as raised:
        await rest.send_sms(CALLER, "hi")
    assert raised.value.retry_after_s == 3.0
    assert sim.messages == []


async def test_a_500_is_ambiguous(sim: TwilioApiSimulator, rest: TwilioRest) -> None:
    sim.fail_next(1, status=500, create_anyway=True)
    with pytest.raises(TwilioAmbiguousError):
        await rest.send_sms(CALLER, "hi")
    assert len(sim.messages) == 1


async def test_a_response_slower_than_the_timeout_is_ambiguous(
    sim: TwilioApiSimulator, http: httpx.AsyncClient
) -> None:
    sim.hang_next(1, seconds=1.0)
    with pytest.raises(TwilioAmbiguousError):
        await rest_for(sim, http, timeout_s=0.2).send_sms(CALLER, "hi")
    assert len(sim.messages) == 1


async def test_a_refused_connection_is_retryable(http: httpx.AsyncClient) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rest = TwilioRest(
        account_sid="AC" + "0" * 32,
        auth_token="t",
        http=http,
        from_number=STORE,
        api_base=f"http://127.0.0.1:{port}",
    )
    with pytest.raises(TwilioRetryableError) as raised:
        await rest.send_sms(CALLER, "hi")
    assert raised.value.retry_after_s is None


async def test_update_call_posts_twiml_then_hangs_up_and_a_second_hang_up_is_fine(
    sim: TwilioApiSimulator, rest: TwilioRest
) -> None:
    sid = "CA" + "4" * 32
    twiml = "<Response><Say>Connecting you.</Say><Dial>+15557654321</Dial></Response>"
    await rest.update_call(sid, twiml=twiml)
    await rest.update_call(sid, status="completed")
    await rest.update_call(sid, status="completed")
    assert sim.call_updates == [
        {"call_sid": sid, "Twiml": twiml},
        {"call_sid": sid, "Status": "completed"},
    ]


async def test_redirecting_an_ended_call_is_a_permanent_21220(
    sim: TwilioApiSimulator, rest: TwilioRest
) -> None:
    sid = "CA" + "5" * 32
    sim.calls_ended.add(sid)
    with pytest.raises(TwilioPermanentError) as raised:
        await rest.update_call(sid, twiml="<Response><Hangup/></Response>")
    assert raised.value.code == 21220


async def test_updating_an_unknown_call_is_a_permanent_20404(http: httpx.AsyncClient) -> None:
    async with TwilioApiSimulator(known_calls_only=True) as sim:
        with pytest.raises(TwilioPermanentError) as raised:
            await rest_for(sim, http).update_call("CA" + "6" * 32, status="completed")
    assert raised.value.code == 20404 and raised.value.status == 404


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert retry_after_seconds("2") == 2.0
    assert 25 <= (retry_after_seconds(later) or 0) <= 30
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


async def test_a_refusal_message_never_carries_the_callers_whole_number(
    sim: TwilioApiSimulator, http: httpx.AsyncClient
) -> None:
    sim.invalid_numbers.add("+15550000000")
    with pytest.raises(TwilioPermanentError) as info:
        await rest_for(sim, http).send_sms("+15550000000", "hello")
    assert "+15550000000" not in str(info.value)
