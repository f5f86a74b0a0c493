"""The simulated phone, proven against a small stand-in app that checks what Twilio would send.

The stand-in (a Starlette app under uvicorn on 127.0.0.1) validates signatures with the twilio
package, serves TwiML, and exposes its Media Streams socket so each test plays the app's part.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Connect, VoiceResponse

from bot.sim.phone import (
    FRAME_BYTES,
    CallEnded,
    CallNotConnected,
    PhoneCall,
    dial,
    main,
)
from bot.sim.realtime import Scenario
from bot.sim.server import LocalServer
from bot.sim.stack import SimStack
from bot.wav import Wav, read_wav, write_wav

AUTH_TOKEN = "test-auth-token-0123456789abcdef"
ACCOUNT_SID = "AC" + "ab" * 16
SILENCE = b"\xff"
TONE = b"\x10"  # a loud mu-law sample: stands for speech in both directions
STREAM_PARAMETERS = {"caller": "+15551230001", "token": "v1.1732560000.3b9f"}


@dataclass
class Webhook:
    form: dict[str, str]
    signature: str | None
    valid: bool


@dataclass
class StandIn:
    """The app's side of a call: signed webhook in, TwiML out, a Media Streams socket to drive."""

    fallback: bool = False
    refuse_upgrade: bool = False
    replay: bool = False
    base_url: str = ""
    webhooks: list[Webhook] = field(default_factory=list)
    upgrades: list[tuple[str | None, bool]] = field(default_factory=list)
    inbox: asyncio.Queue[tuple[float, str | bytes]] = field(default_factory=asyncio.Queue)
    socket: WebSocket | None = None
    stream_sid: str = ""
    disconnect_code: int | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/twiml/voice", self.voice, methods=["POST"]),
                WebSocketRoute("/media-stream", self.media_stream),
            ]
        )

    async def voice(self, request: Request) -> Response:
        # Starlette's request.form() needs python-multipart; a urlencoded body needs only parse_qsl.
        form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        signature = request.headers.get("x-twilio-signature")
        valid = RequestValidator(AUTH_TOKEN).validate(str(request.url), form, signature or "")
        self.webhooks.append(Webhook(form, signature, valid))
        response = VoiceResponse()
        if not self.fallback:
            connect = Connect()
            stream = connect.stream(url=self.base_url.replace("http", "ws", 1) + "/media-stream")
            for name, value in STREAM_PARAMETERS.items():
                stream.parameter(name=name, value=value)
            response.append(connect)
        response.say("Sorry, our assistant is unavailable. Goodbye.")
        response.hangup()
        return Response(str(response), media_type="text/xml")

    async def media_stream(self, websocket: WebSocket) -> None:
        signature = websocket.headers.get("x-twilio-signature")
        valid = RequestValidator(AUTH_TOKEN).validate(str(websocket.url), {}, signature or "")
        self.upgrades.append((signature, valid))
        if self.refuse_upgrade:
            await websocket.close(code=1008)  # before accept: uvicorn answers HTTP 403
            return
        await websocket.accept()
        self.socket = websocket
        self.ready.set()
        replay = Replay(websocket) if self.replay else None
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                self.disconnect_code = message.get("code")
                return
            raw = message.get("text") or message.get("bytes") or ""
            await self.inbox.put((time.monotonic(), raw))
            if replay is not None and isinstance(raw, str):
                await replay.on_message(json.loads(raw))

    async def next(self, event: str) -> tuple[float, dict[str, Any]]:
        """The next message with this `event` (others are skipped), with its arrival time."""
        async with asyncio.timeout(2):
            while True:
                t, raw = await self.inbox.get()
                if isinstance(raw, str):
                    msg = json.loads(raw)
                    if msg.get("event") == "start":
                        self.stream_sid = msg["streamSid"]
                    if msg.get("event") == event:
                        return t, msg

    async def started(self) -> dict[str, Any]:
        return (await self.next("start"))[1]

    async def send(self, message: dict[str, Any]) -> None:
        assert self.socket is not None
        await self.socket.send_text(json.dumps({"streamSid": self.stream_sid, **message}))

    async def send_media(self, audio: bytes) -> None:
        payload = base64.b64encode(audio).decode()
        await self.send({"event": "media", "media": {"payload": payload}})

    async def send_mark(self, name: str) -> None:
        await self.send({"event": "mark", "mark": {"name": name}})


@dataclass
class Replay:
    """One call's bot: greets, then answers each utterance with itself once the caller is quiet."""

    websocket: WebSocket
    stream_sid: str = ""
    spoken: bytearray = field(default_factory=bytearray)

    async def on_message(self, msg: dict[str, Any]) -> None:
        if msg["event"] == "start":
            self.stream_sid = msg["streamSid"]
            await self.play(TONE * 1920)
        elif msg["event"] == "media":
            audio = base64.b64decode(msg["media"]["payload"])
            if audio.strip(SILENCE):
                self.spoken += audio
            elif self.spoken:
                await self.play(bytes(self.spoken))
                self.spoken.clear()

    async def play(self, audio: bytes) -> None:
        media = {"payload": base64.b64encode(audio).decode()}
        message = {"event": "media", "streamSid": self.stream_sid, "media": media}
        await self.websocket.send_text(json.dumps(message))


@pytest.fixture
async def standin() -> AsyncIterator[StandIn]:
    app = StandIn()
    async with LocalServer(app.app(), ws="websockets-sansio", log_level="warning") as server:
        app.base_url = server.base_url
        yield app


def call_to(standin: StandIn, **options: Any) -> Any:
    return dial(standin.base_url, account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, **options)


def payload(msg: dict[str, Any]) -> bytes:
    return base64.b64decode(msg["media"]["payload"])


@pytest.mark.anyio
async def test_webhook_is_signed_and_carries_the_fields_twilio_sends(standin: StandIn) -> None:
    async with call_to(standin, caller="+15550001111", called="+15550002222") as call:
        hook = standin.webhooks[0]
    assert hook.valid
    assert re.fullmatch("CA[0-9a-f]{32}", hook.form["CallSid"])
    assert hook.form["CallSid"] == call.call_sid
    expected = {
        "AccountSid": ACCOUNT_SID,
        "From": "+15550001111",
        "Caller": "+15550001111",
        "To": "+15550002222",
        "Called": "+15550002222",
        "CallStatus": "ringing",
        "Direction": "inbound",
        "ApiVersion": "2010-04-01",
        "FromCountry": "US",
        "ToCountry": "US",
    }
    assert expected.items() <= hook.form.items()


@pytest.mark.anyio
async def test_a_signature_over_another_url_or_no_signature_fails_validation(
    standin: StandIn,
) -> None:
    async with call_to(standin, signed_url=standin.base_url + "/twiml/status"):
        pass
    async with call_to(standin, sign=False):
        pass
    wrong_url, unsigned = standin.webhooks
    assert wrong_url.signature is not None and not wrong_url.valid
    assert unsigned.signature is None and not unsigned.valid


@pytest.mark.anyio
async def test_stream_upgrade_is_signed_over_the_websocket_url(standin: StandIn) -> None:
    async with call_to(standin) as call:
        assert call.dial.stream_url == standin.base_url.replace("http", "ws") + "/media-stream"
    async with call_to(standin, sign_stream=False):
        pass
    assert standin.upgrades[0][1] is True
    assert standin.upgrades[1] == (None, False)


@pytest.mark.anyio
async def test_connected_then_start_carries_the_twiml_parameters(standin: StandIn) -> None:
    async with call_to(standin) as call:
        _, first = await standin.next("connected")
        start = await standin.started()
    assert first == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert call.dial.parameters == STREAM_PARAMETERS
    assert re.fullmatch("MZ[0-9a-f]{32}", start["streamSid"])
    assert start["sequenceNumber"] == "1"
    assert start["start"] == {
        "accountSid": ACCOUNT_SID,
        "streamSid": call.stream_sid,
        "callSid": call.call_sid,
        "tracks": ["inbound"],
        "customParameters": STREAM_PARAMETERS,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }


@pytest.mark.anyio
async def test_media_frames_are_160_bytes_every_20_ms_with_increasing_timestamps(
    standin: StandIn,
) -> None:
    async with call_to(standin) as call:
        frames = [(await standin.next("media"))[1] for _ in range(12)]
    assert all(len(payload(m)) == FRAME_BYTES for m in frames)
    assert [m["media"]["chunk"] for m in frames] == [str(i) for i in range(1, 13)]
    assert [m["media"]["timestamp"] for m in frames] == [str(20 * i) for i in range(12)]
    assert [m["sequenceNumber"] for m in frames] == [str(i) for i in range(2, 14)]
    assert {m["media"]["track"] for m in frames} == {"inbound"}
    sent = [e.t for e in call.events if e.direction == "out" and e.kind == "media"][:12]
    drift = [abs(t - sent[0] - 0.020 * i) for i, t in enumerate(sent)]
    assert max(drift) < 0.04


@pytest.mark.anyio
async def test_say_sends_the_utterance_then_keeps_the_line_open_with_silence(
    standin: StandIn,
) -> None:
    async with call_to(standin) as call:
        await standin.started()
        await call.say(TONE * 400)
        heard = [payload((await standin.next("media"))[1]) for _ in range(10)]
    spoken = b"".join(heard).lstrip(SILENCE)
    assert spoken.startswith(TONE * 400 + SILENCE * 80 + SILENCE * FRAME_BYTES)
    assert len(call.turns) == 1


@pytest.mark.anyio
async def test_an_unpaced_call_sends_queued_audio_faster_than_real_time(standin: StandIn) -> None:
    async with call_to(standin, pace=False) as call:
        began = time.monotonic()
        await call.say(TONE * 16000)  # 2 s of speech
        elapsed = time.monotonic() - began
        spoken: list[int] = []
        while len(spoken) < 100:
            msg = (await standin.next("media"))[1]
            if payload(msg) == TONE * FRAME_BYTES:
                spoken.append(int(msg["media"]["timestamp"]))
    assert elapsed < 1.0
    assert spoken == list(range(spoken[0], spoken[0] + 2000, 20))


@pytest.mark.anyio
async def test_a_mark_is_echoed_only_after_the_audio_before_it_has_played(
    standin: StandIn,
) -> None:
    async with call_to(standin) as call:
        await standin.started()
        sent_at = time.monotonic()
        await standin.send_media(TONE * 1920)  # 240 ms
        await standin.send_mark("reply:240")
        echoed_at, echo = await standin.next("mark")
    assert echoed_at - sent_at >= 0.23
    assert echoed_at - sent_at < 0.6
    assert echo["mark"] == {"name": "reply:240"}
    assert echo["streamSid"] == call.stream_sid and echo["sequenceNumber"].isdigit()
    assert call.marks[0].played_ms >= 230 and not call.marks[0].cleared


@pytest.mark.anyio
async def test_a_mark_with_nothing_buffered_is_echoed_at_once(standin: StandIn) -> None:
    async with call_to(standin) as call:
        await standin.started()
        sent_at = time.monotonic()
        await standin.send_mark("empty")
        echoed_at, _ = await standin.next("mark")
    assert echoed_at - sent_at < 0.1
    assert call.marks[0].played_ms == 0


@pytest.mark.anyio
async def test_clear_empties_the_buffer_and_echoes_pending_marks_at_once(
    standin: StandIn,
) -> None:
    async with call_to(standin) as call:
        await standin.started()
        await standin.send_media(TONE * 8000)
        await standin.send_mark("first")
        await standin.send_media(TONE * 8000)
        await standin.send_mark("second")
        await asyncio.sleep(0.1)
        cleared_at = time.monotonic()
        await standin.send({"event": "clear"})
        _, first = await standin.next("mark")
        second_at, second = await standin.next("mark")
        await asyncio.sleep(0.1)
        heard_ms = call.heard_ms()
    assert [first["mark"]["name"], second["mark"]["name"]] == ["first", "second"]
    assert second_at - cleared_at < 0.1
    assert all(m.cleared for m in call.marks)
    assert call.received_audio_ms() == 2000
    assert 80 <= heard_ms < 400
    assert len(call.heard.replace(SILENCE, b"")) == pytest.approx(heard_ms * 8, abs=8)


@pytest.mark.anyio
async def test_heard_wav_holds_what_was_played_on_the_phone_timeline(
    standin: StandIn, tmp_path: Path
) -> None:
    async with call_to(standin) as call:
        await standin.started()
        await standin.send_media(TONE * 800)
        await call.wait_for_audio(timeout=2, min_ms=100)
        await call.wait_until_quiet(quiet_ms=50, timeout=2)
    call.write_heard_wav(tmp_path / "heard.wav")
    wav = read_wav(tmp_path / "heard.wav")
    arrived = next(e.t for e in call.events if e.direction == "in" and e.kind == "media")
    hung_up = next(e.t for e in call.events if e.kind == "stop")
    assert (wav.rate_hz, wav.encoding) == (8000, "mulaw")
    assert wav.data.strip(SILENCE) == TONE * 800
    assert wav.data.index(TONE) == pytest.approx(arrived * 8000, abs=16)
    assert len(wav.data) == pytest.approx(hung_up * 8000, abs=80)


@pytest.mark.anyio
async def test_played_is_the_audio_back_to_back_where_heard_keeps_the_gap_between(
    standin: StandIn,
) -> None:
    async with call_to(standin) as call:
        await standin.started()
        await standin.send_media(TONE * 400)
        await call.wait_for_audio(timeout=2, min_ms=50)
        await call.wait_until_quiet(quiet_ms=100, timeout=2)
        await standin.send_media(TONE * 400)
        await call.wait_for_audio(timeout=2, min_ms=100)
        await call.wait_until_quiet(quiet_ms=50, timeout=2)
    heard = call.heard.strip(SILENCE)
    assert call.played == TONE * 800
    assert heard.startswith(TONE * 400 + SILENCE) and heard.endswith(SILENCE + TONE * 400)


@pytest.mark.anyio
async def test_dtmf_and_stop_are_sent_and_hanging_up_twice_is_harmless(
    standin: StandIn,
) -> None:
    call: PhoneCall = await call_to(standin)
    await standin.started()
    await call.press("5")
    await call.hang_up()
    await call.hang_up()
    _, dtmf = await standin.next("dtmf")
    _, stop = await standin.next("stop")
    assert dtmf["dtmf"] == {"track": "inbound_track", "digit": "5"}
    assert stop["stop"] == {"accountSid": ACCOUNT_SID, "callSid": call.call_sid}
    assert int(stop["sequenceNumber"]) > int(dtmf["sequenceNumber"])
    assert not call.closed_by_app and call.outcome == "hung up by caller"


@pytest.mark.anyio
async def test_fallback_twiml_without_a_stream_is_the_call_outcome(standin: StandIn) -> None:
    standin.fallback = True
    call = await call_to(standin)
    assert call.dial.stream_url is None and not call.connected
    assert call.outcome == "no stream: Say 'Sorry, our assistant is unavailable. Goodbye.', Hangup"
    with pytest.raises(CallNotConnected):
        await call.say(TONE * 160)


@pytest.mark.anyio
async def test_an_unreachable_webhook_is_the_call_outcome() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    call = await dial(f"http://127.0.0.1:{port}", account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN)
    assert call.dial.status_code == 0
    assert call.outcome.startswith("no stream: webhook failed (ConnectError")


@pytest.mark.anyio
async def test_a_refused_upgrade_is_reported_then_the_rest_of_the_twiml_plays(
    standin: StandIn,
) -> None:
    standin.refuse_upgrade = True
    call = await call_to(standin)
    assert call.stream_error == "HTTP 403" and call.closed_by_app
    assert call.outcome.startswith("stream refused (HTTP 403), then Say 'Sorry")


@pytest.mark.anyio
async def test_without_start_stream_only_connected_goes_until_send_start(
    standin: StandIn,
) -> None:
    async with call_to(standin, start_stream=False, custom_parameters={"token": "bad"}) as call:
        await standin.next("connected")
        await asyncio.sleep(0.1)
        assert standin.inbox.empty()
        await call.send_start()
        start = await standin.started()
        await standin.next("media")
    assert start["start"]["customParameters"] == {"token": "bad"}


@pytest.mark.anyio
async def test_a_phone_that_stopped_reading_still_hangs_up(standin: StandIn) -> None:
    call = await call_to(standin)
    await standin.started()
    call.pause_reading()
    await standin.send_media(TONE * 800)
    await standin.send_media(TONE * 800)
    async with asyncio.timeout(3):
        await call.hang_up()
    assert not call.connected and call.received_audio_ms() <= 100


@pytest.mark.anyio
async def test_the_app_closing_the_socket_ends_the_call_with_its_code(standin: StandIn) -> None:
    call = await call_to(standin)
    await standin.started()
    assert standin.socket is not None
    await standin.socket.close(code=1008)
    await call.wait_closed(timeout=2)
    assert call.closed_by_app and call.close_code == 1008
    assert call.outcome.startswith("closed by app (1008), then Say 'Sorry")
    with pytest.raises(CallEnded):
        await call.say(TONE * 160)
    await call.hang_up()


@pytest.mark.anyio
async def test_send_raw_delivers_text_and_binary_frames_verbatim(standin: StandIn) -> None:
    async with call_to(standin) as call:
        await standin.started()
        await call.send_raw("not json {")
        await call.send_raw(b"\x00\x01binary")
        raw: list[str | bytes] = []
        while len(raw) < 2:
            _, frame = await standin.inbox.get()
            if isinstance(frame, bytes) or not frame.startswith("{"):
                raw.append(frame)
    assert raw == ["not json {", b"\x00\x01binary"]


@pytest.mark.anyio
async def test_frames_the_app_gets_wrong_are_recorded_as_protocol_errors(
    standin: StandIn,
) -> None:
    async with call_to(standin) as call:
        await standin.started()
        assert standin.socket is not None
        await standin.socket.send_text("nonsense")
        await standin.socket.send_bytes(b"\x00")
        await standin.send({"event": "bogus"})
        await standin.send({"event": "media", "streamSid": "MZ-other", "media": {"payload": ""}})
        await standin.send({"event": "media", "media": {"payload": "***"}})
        await standin.send_mark("still-works")
        await standin.next("mark")
    assert len(call.protocol_errors) == 5
    assert call.received_audio_ms() == 0


@pytest.mark.anyio
async def test_reply_latency_counts_from_the_end_of_speech_not_of_the_recording(
    standin: StandIn,
) -> None:
    async with call_to(standin) as call:
        await standin.started()
        await call.say(TONE * 1600 + SILENCE * 2400)  # 200 ms of speech, 300 ms of silence
        await asyncio.sleep(0.1)
        await standin.send_media(TONE * 1600)
        await call.wait_for_audio(timeout=2, min_ms=200)
        began = time.monotonic()
        await call.wait_until_quiet(quiet_ms=50, timeout=2)
        waited = time.monotonic() - began
    [latency] = call.first_audio_latencies()
    assert latency is not None and 0.35 < latency < 0.7
    assert waited > 0.1  # the reply had to play out first
    assert call.heard_ms() == pytest.approx(200, abs=10)


@pytest.mark.anyio
async def test_command_line_places_concurrent_calls_and_reports_each(
    standin: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    standin.replay = True
    utterance = tmp_path / "hello.wav"
    write_wav(utterance, Wav(TONE * 1600 + SILENCE * 800, 8000, "mulaw"))
    argv = [standin.base_url, "--audio", str(utterance), "--calls", "2", "--fast"]
    argv += ["--account-sid", ACCOUNT_SID, "--auth-token", AUTH_TOKEN, "--pause-ms", "0"]
    argv += ["--quiet-ms", "100", "--reply-timeout", "2"]
    code = await asyncio.to_thread(main, argv)
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count(": completed |") == 2
    assert "2/2 calls completed" in out
    assert all(hook.valid for hook in standin.webhooks)


@pytest.mark.anyio
async def test_command_line_prints_each_calls_progress_in_order_with_timestamps(
    standin: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    standin.replay = True
    utterance = tmp_path / "hello.wav"
    write_wav(utterance, Wav(TONE * 1600 + SILENCE * 800, 8000, "mulaw"))
    argv = [standin.base_url, "--audio", str(utterance), str(utterance), "--fast", "--pause-ms", "0"]
    argv += ["--account-sid", ACCOUNT_SID, "--auth-token", AUTH_TOKEN, "--quiet-ms", "100"]
    assert await asyncio.to_thread(main, argv) == 0
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    steps = [line.split("call 1: ", 1)[1] for line in progress]
    assert steps[0].endswith("connected, media stream open")
    assert steps[1:] == [
        "greeted (0.2 s of audio)",
        "caller turn 1/2 spoken",
        steps[3],
        "caller turn 2/2 spoken",
        steps[5],
        "completed, hung up",
    ]
    assert steps[3].startswith("bot answered turn 1 after ") and steps[5].startswith("bot answered turn 2")
    stamps = [float(line[1:].split("s]", 1)[0]) for line in progress]
    assert stamps == sorted(stamps) and stamps[-1] > stamps[0]


@pytest.mark.anyio
async def test_command_line_explains_a_call_the_bot_refused_for_its_signature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    utterance = tmp_path / "hello.wav"
    write_wav(utterance, Wav(TONE * 1600, 8000, "mulaw"))
    async with SimStack(Scenario(greeting="Hello.", turns=[])) as stack:
        argv = [stack.app_url, "--audio", str(utterance), "--auth-token", "not-the-bots-token"]
        assert await asyncio.to_thread(main, argv) == 1
    out = capsys.readouterr().out
    assert "not connected: the bot refused the call (403): its TWILIO_AUTH_TOKEN" in out
    assert "0/1 calls completed" in out
