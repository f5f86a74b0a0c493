"""POST /twiml/voice: only Twilio-signed requests get TwiML, and the TwiML is right."""

from __future__ import annotations

import asyncio
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from twilio.request_validator import RequestValidator

from bot.app import create_app
from bot.settings import Settings, load_settings
from bot.sim.server import LocalServer
from bot.stream_token import check_stream_token

pytestmark = pytest.mark.anyio

AUTH_TOKEN = "test-auth-token-0123456789abcdef"
CALL_SID = "CA" + "1" * 32
FORM = {
    "CallSid": CALL_SID,
    "AccountSid": "AC" + "2" * 32,
    "From": "+15551230001",
    "To": "+15557650002",
    "CallStatus": "ringing",
    "ApiVersion": "2010-04-01",
    "Direction": "inbound",
}
NOW = 1_800_000_000.0


def make_settings(**overrides: str) -> Settings:
    env = {
        "OPENAI_API_KEY": "sk-test",
        "TWILIO_ACCOUNT_SID": "AC" + "2" * 32,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "PUBLIC_URL": "https://bot.example.com",
        "STREAM_SIGNING_KEY": "stream-key",
    }
    env["DATABASE_PATH"] = str(Path(tempfile.mkdtemp()) / "outbox.sqlite3")
    env.update(overrides)
    return load_settings(env, dotenv=None)


async def serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, clock=lambda: NOW)
    async with LocalServer(app) as server, httpx.AsyncClient(base_url=server.base_url) as client:
        yield client


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async for c in serve(make_settings()):
        yield c


def signature(url: str, form: dict[str, str], token: str = AUTH_TOKEN) -> str:
    return str(RequestValidator(token).compute_signature(url, form))


def stream_of(twiml: str) -> tuple[str, dict[str, str]]:
    root = ET.fromstring(twiml)
    stream = root.find("./Connect/Stream")
    assert stream is not None
    params = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
    return stream.attrib["url"], params


async def test_a_signed_call_gets_a_stream_with_caller_called_and_a_token_for_this_call(
    client: httpx.AsyncClient,
) -> None:
    sig = signature("https://bot.example.com/twiml/voice", FORM)
    response = await client.post("/twiml/voice", data=FORM, headers={"X-Twilio-Signature": sig})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/xml")
    url, params = stream_of(response.text)
    assert url == "wss://bot.example.com/media-stream"
    assert "?" not in url
    assert params["caller"] == "+15551230001"
    assert params["called"] == "+15557650002"
    assert check_stream_token(b"stream-key", params["token"], CALL_SID, NOW + 1) is None
    assert check_stream_token(b"stream-key", params["token"], "CA" + "9" * 32, NOW) is not None


async def test_after_the_stream_the_document_apologises_and_hangs_up(client: httpx.AsyncClient) -> None:
    sig = signature("https://bot.example.com/twiml/voice", FORM)
    response = await client.post("/twiml/voice", data=FORM, headers={"X-Twilio-Signature": sig})
    tags = [child.tag for child in ET.fromstring(response.text)]
    assert tags == ["Connect", "Say", "Hangup"]


async def test_a_plain_http_public_url_gives_a_ws_stream_url() -> None:
    async for client in serve(make_settings(PUBLIC_URL="http://127.0.0.1:9999")):
        sig = signature("http://127.0.0.1:9999/twiml/voice", FORM)
        response = await client.post("/twiml/voice", data=FORM, headers={"X-Twilio-Signature": sig})
        assert stream_of(response.text)[0] == "ws://127.0.0.1:9999/media-stream"


async def test_behind_a_proxy_the_forwarded_scheme_and_host_are_the_signed_url() -> None:
    async for client in serve(make_settings(PUBLIC_URL="")):
        sig = signature("https://shop-bot.example.org/twiml/voice", FORM)
        headers = {
            "X-Twilio-Signature": sig,
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "shop-bot.example.org",
        }
        response = await client.post("/twiml/voice", data=FORM, headers=headers)
        assert response.status_code == 200
        assert stream_of(response.text)[0] == "wss://shop-bot.example.org/media-stream"


async def test_a_missing_signature_is_refused_with_403_and_no_body(client: httpx.AsyncClient) -> None:
    response = await client.post("/twiml/voice", data=FORM)
    assert response.status_code == 403
    assert response.content == b""


async def test_a_signature_made_with_another_token_is_refused(client: httpx.AsyncClient) -> None:
    sig = signature("https://bot.example.com/twiml/voice", FORM, token="wrong-token")
    response = await client.post("/twiml/voice", data=FORM, headers={"X-Twilio-Signature": sig})
    assert response.status_code == 403


async def test_a_signature_for_another_url_is_refused(client: httpx.AsyncClient) -> None:
    sig = signature("https://bot.example.com/twiml/status", FORM)
    response = await client.post("/twiml/voice", data=FORM, headers={"X-Twilio-Signature": sig})
    assert response.status_code == 403


async def test_a_signature_replayed_with_a_changed_host_is_refused() -> None:
    async for client in serve(make_settings(PUBLIC_URL="")):
        sig = signature("https://shop-bot.example.org/twiml/voice", FORM)
        headers = {
            "X-Twilio-Signature": sig,
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.example.net",
        }
        response = await client.post("/twiml/voice", data=FORM, headers=headers)
        assert response.status_code == 403


async def test_a_signature_replayed_with_a_changed_forwarded_scheme_is_refused() -> None:
    async for client in serve(make_settings(PUBLIC_URL="")):
        sig = signature("https://shop-bot.example.org/twiml/voice", FORM)
        headers = {
            "X-Twilio-Signature": sig,
            "X-Forwarded-Proto": "http",
            "X-Forwarded-Host": "shop-bot.example.org",
        }
        response = await client.post("/twiml/voice", data=FORM, headers=headers)
        assert response.status_code == 403


async def test_a_tampered_form_field_breaks_the_signature(client: httpx.AsyncClient) -> None:
    sig = signature("https://bot.example.com/twiml/voice", FORM)
    tampered = {**FORM, "From": "+15559999999"}
    response = await client.post("/twiml/voice", data=tampered, headers={"X-Twilio-Signature": sig})
    assert response.status_code == 403


@pytest.mark.parametrize(
    "body",
    [
        {"hello": "world"},
        {**FORM, "CallSid": "not-a-call-sid"},
        {k: v for k, v in FORM.items() if k != "AccountSid"},
    ],
    ids=["unrelated-fields", "malformed-callsid", "no-accountsid"],
)
async def test_a_signed_body_that_is_not_an_incoming_call_gets_400(
    client: httpx.AsyncClient, body: dict[str, str]
) -> None:
    sig = signature("https://bot.example.com/twiml/voice", body)
    response = await client.post("/twiml/voice", data=body, headers={"X-Twilio-Signature": sig})
    assert response.status_code == 400


async def test_non_form_bodies_get_4xx_never_500(client: httpx.AsyncClient) -> None:
    sig = signature("https://bot.example.com/twiml/voice", {})
    bodies: list[tuple[bytes, str]] = [
        (b'{"CallSid": "x"}', "application/json"),
        (b"\xff\xfe\x00garbage", "application/x-www-form-urlencoded"),
        (b"--x\r\nbroken multipart", "multipart/form-data; boundary=x"),
        (b"A" * 100_000, "application/x-www-form-urlencoded"),
    ]
    for content, content_type in bodies:
        response = await client.post(
            "/twiml/voice",
            content=content,
            headers={"Content-Type": content_type, "X-Twilio-Signature": sig},
        )
        assert 400 <= response.status_code < 500, (content_type, response.status_code)


async def test_without_an_openai_key_the_caller_hears_the_fallback_and_is_dialled_through() -> None:
    settings = make_settings(OPENAI_API_KEY="", STORE_PHONE_NUMBER="+15557654321")
    async for client in serve(settings):
        sig = signature("https://bot.example.com/twiml/voice", FORM)
        response = await client.post("/twiml/voice", data=FORM, headers={"X-Twilio-Signature": sig})
        root = ET.fromstring(response.text)
        assert root.find("Connect") is None
        assert root.find("Say") is not None
        dial = root.find("Dial")
        assert dial is not None and dial.text == "+15557654321"


async def test_without_an_openai_key_or_store_number_the_fallback_apologises_and_hangs_up() -> None:
    async for client in serve(make_settings(OPENAI_API_KEY="")):
        sig = signature("https://bot.example.com/twiml/voice", FORM)
        response = await client.post("/twiml/voice", data=FORM, headers={"X-Twilio-Signature": sig})
        assert [child.tag for child in ET.fromstring(response.text)] == ["Say", "Hangup"]


async def test_without_twilio_credentials_every_webhook_is_refused() -> None:
    async for client in serve(make_settings(TWILIO_AUTH_TOKEN="")):
        sig = signature("https://bot.example.com/twiml/voice", FORM)
        response = await client.post("/twiml/voice", data=FORM, headers={"X-Twilio-Signature": sig})
        assert response.status_code == 403


async def test_healthz_reports_version_and_features(client: httpx.AsyncClient) -> None:
    body = (await client.get("/healthz")).json()
    assert body["status"] == "ok"
    assert body["version"]
    assert body["features"]["realtime"] is True
    assert body["features"]["webhook"] is False


class SilentPeer:
    """A TCP listener that accepts and never answers: every outbound service the app knows."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> str:
        async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self._writers.append(writer)

        self._server = await asyncio.start_server(accept, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._writers:
            writer.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def test_the_voice_webhook_answers_without_waiting_on_any_other_service() -> None:
    """Twilio gives the voice URL 15 s: the answer is minted locally, with no I/O, so a hung OpenAI,
    Twilio API or call center costs it nothing (any attempt would hang on the silent peer)."""
    peer = SilentPeer()
    async with peer as address:
        settings = make_settings(
            OPENAI_REALTIME_URL=f"ws://{address}/v1/realtime",
            OPENAI_BASE_URL=f"http://{address}",
            TWILIO_API_BASE=f"http://{address}",
            WEBHOOK_URL=f"http://{address}/hooks",
            WEBHOOK_SECRET="whsec_" + "A" * 32,
        )
        async for client in serve(settings):
            sig = signature("https://bot.example.com/twiml/voice", FORM)
            response = await client.post("/twiml/voice", data=FORM, headers={"X-Twilio-Signature": sig})
            assert response.status_code == 200 and "<Stream" in response.text
            assert peer.connections == 0
