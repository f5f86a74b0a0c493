"""The whole deployment on 127.0.0.1: the bot plus every stand-in it talks to, wired together.

Used by `python -m bot demo` and the end-to-end tests, so both exercise the same wiring a real
deployment has: only the URLs point at the simulators.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bot.app import Runtime, create_app
from bot.settings import Settings, load_settings
from bot.sim.phone import Dialing, PhoneCall, dial
from bot.sim.realtime import RealtimeSimulator, Scenario
from bot.sim.server import LocalServer, ServeProcess
from bot.sim.twilio_api import TwilioApiSimulator
from bot.sim.webhook_receiver import WebhookReceiver

SIM_API_KEY = "sk-sim-stack"
CALLER = "+15551230001"
STORE_LINE = "+15557650002"
SMS_FROM = "+15550001111"
STORE_PERSON = "+15557654321"

Recorder = Callable[[str, dict[str, Any]], None]


class SimStack:
    """`async with SimStack(scenario) as stack:` then `await stack.dial()`.

    Like Twilio, a REST update of a live call (new TwiML, or completed) ends that call's media
    stream: the phone sends `stop` and closes. `env` overrides any setting. With
    `subprocess=True` the app runs as `python -m bot serve` in its own process (`process`), so its
    memory and file descriptors can be measured apart from the simulators; `runtime` is then
    not available.
    """

    def __init__(
        self,
        scenario: Scenario,
        *,
        env: dict[str, str] | None = None,
        on_twilio_record: Recorder | None = None,
        subprocess: bool = False,
    ) -> None:
        self.calls: dict[str, PhoneCall] = {}
        self._on_twilio_record = on_twilio_record
        self.realtime = RealtimeSimulator(scenario, api_key=SIM_API_KEY)
        self.twilio_api = TwilioApiSimulator(on_record=self._twilio_record)
        self.receiver = WebhookReceiver()
        self.webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        self._env = env or {}
        self._workdir = tempfile.TemporaryDirectory(prefix="voicebot-sim-")
        self._server: LocalServer | None = None
        self._runtime: Runtime | None = None
        self._subprocess = subprocess
        self.process: ServeProcess | None = None
        self.settings: Settings | None = None

    @property
    def app_url(self) -> str:
        if self.process is not None:
            return self.process.base_url
        assert self._server is not None, "start the stack first"
        return self._server.base_url

    @property
    def runtime(self) -> Runtime:
        """The app's shared state (bridge stats, active calls), read-only for tests."""
        assert self._runtime is not None, "start the stack first"
        return self._runtime

    async def start(self) -> None:
        await self.realtime.start()
        await self.twilio_api.start()
        await self.receiver.start()
        env = {
            "OPENAI_API_KEY": SIM_API_KEY,
            "OPENAI_REALTIME_URL": self.realtime.url,
            "OPENAI_BASE_URL": self.realtime.base_url,
            "TWILIO_ACCOUNT_SID": self.twilio_api.account_sid,
            "TWILIO_AUTH_TOKEN": self.twilio_api.auth_token,
            "TWILIO_FROM_NUMBER": SMS_FROM,
            "TWILIO_API_BASE": self.twilio_api.base_url,
            "STORE_PHONE_NUMBER": STORE_PERSON,
            "WEBHOOK_URL": self.receiver.url,
            "WEBHOOK_SECRET": self.webhook_secret,
            "DATABASE_PATH": str(Path(self._workdir.name) / "outbox.sqlite3"),
            **self._env,
        }
        self.settings = load_settings(env, dotenv=None)
        if self._subprocess:
            # The app's settings come from `env` alone, as in-process: none leak from this shell.
            settings_names = {f.alias for f in Settings.model_fields.values()} | {"OPENAI"}
            inherited = {k: v for k, v in os.environ.items() if k not in settings_names}
            self.process = ServeProcess({**inherited, **env}, Path(self._workdir.name))
            await self.process.start()
            return
        app = create_app(self.settings)
        self._runtime = app.state.runtime
        self._server = LocalServer(app)
        await self._server.start()

    async def stop(self) -> None:
        for call in list(self.calls.values()):
            await call.hang_up()
        if self._server is not None:
            await self._server.stop()
        if self.process is not None:
            await self.process.stop()
        await self.receiver.stop()
        await self.twilio_api.stop()
        await self.realtime.stop()
        self._workdir.cleanup()

    async def __aenter__(self) -> SimStack:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def dial(self, caller: str = CALLER, *, called: str = STORE_LINE, **options: Any) -> Dialing:
        """A signed call from `caller` to `called` (a store's number), as Twilio places it."""
        dialing = dial(
            self.app_url,
            account_sid=self.twilio_api.account_sid,
            auth_token=self.twilio_api.auth_token,
            caller=caller,
            called=called,
            **options,
        )
        return _Registering(dialing, self.calls)

    def _twilio_record(self, kind: str, entry: dict[str, Any]) -> None:
        if self._on_twilio_record is not None:
            self._on_twilio_record(kind, entry)
        call = self.calls.get(str(entry.get("call_sid", "")))
        if kind == "call_update" and call is not None:
            asyncio.get_running_loop().create_task(call.hang_up())


class _Registering(Dialing):
    """A Dialing that records the placed call in the stack, for REST-driven hang-ups."""

    def __init__(self, inner: Dialing, calls: dict[str, PhoneCall]) -> None:
        async def place() -> PhoneCall:
            call = await inner
            calls[call.call_sid] = call
            return call

        super().__init__(place)
