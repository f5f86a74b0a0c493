"""The Twilio REST stand-in answers like Twilio: auth, resources, errors, pages, faults."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from bot.sim.twilio_api import TwilioApiSimulator, count_segments

pytestmark = pytest.mark.anyio

CALLER = "+15551230001"
STORE = "+15557654321"


@pytest.fixture
async def sim() -> AsyncIterator[TwilioApiSimulator]:
    async with TwilioApiSimulator() as simulator:
        yield simulator


@pytest.fixture
async def client(sim: TwilioApiSimulator) -> AsyncIterator[httpx.AsyncClient]:
    base = f"{sim.base_url}/2010-04-01/Accounts/{sim.account_sid}"
    auth = (sim.account_sid, sim.auth_token)
    async with httpx.AsyncClient(base_url=base, auth=auth, timeout=5) as http:
        yield http


async def send(client: httpx.AsyncClient, **fields: Any) -> httpx.Response:
    form = {"To": CALLER, "From": STORE, "Body": "hello"}
    form.update(fields)
    return await client.post("/Messages.json", data={k: v for k, v in form.items() if v is not None})


async def test_a_created_message_is_a_twilio_shaped_201_and_is_recorded(
    sim: TwilioApiSimulator, client: httpx.AsyncClient
) -> None:
    response = await send(client, MediaUrl=["https://a.example/1.jpg", "https://a.example/2.jpg"])
    assert response.status_code == 201
    body = response.json()
    assert body["sid"].startswith("SM") and len(body["sid"]) == 34
    assert body["status"] == "queued"
    assert body["to"] == CALLER and body["from"] == STORE and body["body"] == "hello"
    assert body["num_media"] == "2" and body["num_segments"] == "1"
    assert body["uri"] == f"/2010-04-01/Accounts/{sim.account_sid}/Messages/{body['sid']}.json"
    assert [m["sid"] for m in sim.messages] == [body["sid"]]
    assert sim.messages[0]["media_urls"] == ["https://a.example/1.jpg", "https://a.example/2.jpg"]


async def test_a_messaging_service_sender_is_accepted_without_from(client: httpx.AsyncClient) -> None:
    response = await send(client, From=None, MessagingServiceSid="MG" + "0" * 32)
    assert response.status_code == 201
    assert response.json()["status"] == "accepted"


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"To": "5551230001"}, 21211),
        ({"To": None}, 21604),
        ({"From": None}, 21603),
        ({"Body": None}, 21602),
        ({"Body": "x" * 1601}, 21617),
    ],
)
async def test_bad_requests_get_twilio_error_bodies(
    sim: TwilioApiSimulator, client: httpx.AsyncClient, fields: dict[str, Any], code: int
) -> None:
    response = await send(client, **fields)
    assert response.status_code == 400
    assert response.json() == {
        "code": code,
        "message": response.json()["message"],
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": 400,
    }
    assert sim.messages == []


async def test_invalid_unsubscribed_and_landline_numbers_are_refused(
    sim: TwilioApiSimulator, client: httpx.AsyncClient
) -> None:
    sim.unsubscribed.add(CALLER)
    sim.landlines.add("+15551230002")
    sim.invalid_numbers.add("+15550000000")
    assert (await send(client)).json()["code"] == 21610
    assert (await send(client, To="+15551230002")).json()["code"] == 21614
    assert (await send(client, To="+15550000000")).json()["code"] == 21211


async def test_a_body_of_exactly_1600_characters_is_accepted(client: httpx.AsyncClient) -> None:
    response = await send(client, Body="x" * 1600)
    assert response.status_code == 201
    assert response.json()["num_segments"] == str(count_segments("x" * 1600)) == "11"


async def test_wrong_credentials_get_401_with_code_20003(sim: TwilioApiSimulator) -> None:
    url = f"{sim.base_url}/2010-04-01/Accounts/{sim.account_sid}/Messages.json"
    async with httpx.AsyncClient(timeout=5) as http:
        wrong = await http.post(url, data={"To": CALLER}, auth=(sim.account_sid, "nope"))
        missing = await http.get(url)
    assert wrong.status_code == missing.status_code == 401
    assert wrong.json()["code"] == 20003
    assert wrong.headers["www-authenticate"].startswith("Basic")


async def test_listing_filters_by_recipient_and_pages_newest_first(
    sim: TwilioApiSimulator, client: httpx.AsyncClient
) -> None:
    for n in range(3):
        await send(client, Body=f"m{n}")
    await send(client, To="+15551230009", Body="other")
    first = (await client.get("/Messages.json", params={"To": CALLER, "PageSize": 2})).json()
    assert [m["body"] for m in first["messages"]] == ["m2", "m1"]
    assert first["page"] == 0 and first["page_size"] == 2
    second = (await client.get(f"{sim.base_url}{first['next_page_uri']}")).json()
    assert [m["body"] for m in second["messages"]] == ["m0"]
    assert second["next_page_uri"] is None


async def test_listing_honours_date_sent_bounds(client: httpx.AsyncClient) -> None:
    await send(client)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    assert len((await client.get("/Messages.json", params={"DateSent>": today})).json()["messages"]) == 1
    assert (await client.get("/Messages.json", params={"DateSent>": future})).json()["messages"] == []


async def test_a_message_can_be_fetched_by_sid_and_an_unknown_sid_is_20404(
    client: httpx.AsyncClient,
) -> None:
    sid = (await send(client)).json()["sid"]
    fetched = await client.get(f"/Messages/{sid}.json")
    assert fetched.status_code == 200 and fetched.json()["status"] == "delivered"
    missing = await client.get("/Messages/SM" + "0" * 32 + ".json")
    assert missing.status_code == 404 and missing.json()["code"] == 20404


async def test_fail_next_answers_errors_then_recovers(
    sim: TwilioApiSimulator, client: httpx.AsyncClient
) -> None:
    sim.fail_next(1, status=429, retry_after=2)
    sim.fail_next(1, status=503)
    limited = await send(client)
    unavailable = await send(client)
    ok = await send(client)
    assert (limited.status_code, limited.json()["code"], limited.headers["retry-after"]) == (429, 20429, "2")
    assert unavailable.status_code == 503
    assert ok.status_code == 201
    assert len(sim.messages) == 1


async def test_create_anyway_creates_the_message_but_answers_500(
    sim: TwilioApiSimulator, client: httpx.AsyncClient
) -> None:
    sim.fail_next(1, status=500, create_anyway=True)
    response = await send(client)
    assert response.status_code == 500 and response.json()["code"] == 20500
    assert len(sim.messages) == 1


async def test_hang_next_creates_the_message_and_delays_the_answer(
    sim: TwilioApiSimulator, client: httpx.AsyncClient
) -> None:
    sim.hang_next(1, seconds=1.0)
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/Messages.json", data={"To": CALLER, "From": STORE, "Body": "slow"}, timeout=0.2)
    assert [m["body"] for m in sim.messages] == ["slow"]


async def test_a_slow_create_makes_the_message_only_at_the_end_of_its_delay(
    sim: TwilioApiSimulator, client: httpx.AsyncClient
) -> None:
    sim.create_delay_s = 0.3
    sending = asyncio.create_task(send(client))
    await asyncio.sleep(0.15)
    assert sim.messages == [], "not created yet: a lookup now finds nothing"
    assert (await sending).status_code == 201
    assert len(sim.messages) == 1


async def test_an_ambiguous_once_number_gets_its_message_but_its_first_create_answers_500(
    sim: TwilioApiSimulator, client: httpx.AsyncClient
) -> None:
    sim.ambiguous_once.add(CALLER)
    first, second = await send(client), await send(client)
    assert (first.status_code, second.status_code) == (500, 201)
    assert len(sim.messages_to(CALLER)) == 2


async def test_a_live_call_is_updated_then_ended_and_later_updates_get_21220(
    sim: TwilioApiSimulator, client: httpx.AsyncClient
) -> None:
    sid = "CA" + "1" * 32
    twiml = "<Response><Dial>+15557654321</Dial></Response>"
    redirected = await client.post(f"/Calls/{sid}.json", data={"Twiml": twiml})
    ended = await client.post(f"/Calls/{sid}.json", data={"Status": "completed"})
    again = await client.post(f"/Calls/{sid}.json", data={"Status": "completed"})
    assert redirected.status_code == 200 and redirected.json()["status"] == "in-progress"
    assert ended.json()["status"] == "completed"
    assert again.status_code == 400 and again.json()["code"] == 21220
    assert sim.call_updates == [
        {"call_sid": sid, "Twiml": twiml},
        {"call_sid": sid, "Status": "completed"},
    ]


async def test_with_known_calls_only_an_unregistered_call_is_20404() -> None:
    async with TwilioApiSimulator(known_calls_only=True) as sim:
        live = "CA" + "2" * 32
        sim.calls_in_progress.add(live)
        base = f"{sim.base_url}/2010-04-01/Accounts/{sim.account_sid}"
        async with httpx.AsyncClient(auth=(sim.account_sid, sim.auth_token), timeout=5) as http:
            unknown = await http.post(f"{base}/Calls/{'CA' + '3' * 32}.json", data={"Status": "completed"})
            known = await http.post(f"{base}/Calls/{live}.json", data={"Status": "completed"})
    assert unknown.status_code == 404 and unknown.json()["code"] == 20404
    assert known.status_code == 200
