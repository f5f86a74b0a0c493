"""The operators' console in a real browser: headless Chromium (Debian's) opens /console with the
password while a simulated call is placed on the whole deployment (the bot under uvicorn, the
phone, the Realtime and Twilio simulators), all on 127.0.0.1.

The tests save screenshots in their tmp dir (docs/console.png is one of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import CHROMIUM, CHROMIUM_ARGS, DESKTOP, PHONE, WAIT_S, playwright_api

from bot.settings import SAMPLE_CATALOG_PATH
from bot.sim.phone import PhoneCall
from bot.sim.realtime import Scenario, ToolCall, Turn
from bot.sim.stack import CALLER, STORE_LINE, SimStack
from bot.wav import read_wav

pytestmark = pytest.mark.anyio

PASSWORD = "correct horse battery"
AUDIO = SAMPLE_CATALOG_PATH.parent.parent / "sim" / "audio"
SKUS = ["WM-2024-X500", "WM-2025-0001"]
SCENARIO = Scenario(
    greeting="Hi, thanks for calling. How can I help?",
    turns=[
        Turn(
            hears="Show me washing machines.",
            tool_calls=[ToolCall("search_products", {"query": "washing machines"})],
            say="{summary} Shall I text you the details?",
            audio_ms=900,
        ),
        Turn(
            hears="Yes, text me.",
            tool_calls=[ToolCall("send_product_details", {"skus": SKUS})],
            say="Done, the details are on their way to your phone.",
            audio_ms=900,
        ),
    ],
)
# Any way the caller's or the store's number could be written in full.
FULL_NUMBERS = [re.compile(r"\D*".join(number[-10:])) for number in (CALLER, STORE_LINE)]


def expect(locator: Any) -> Any:
    return playwright_api.expect(locator)


@contextlib.asynccontextmanager
async def console(stack: SimStack, *, viewport: dict[str, int] = DESKTOP) -> AsyncIterator[Any]:
    """/console with the operator's password, live; fails the test on any uncaught script error."""
    errors: list[str] = []
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(
                viewport=viewport, http_credentials={"username": "operator", "password": PASSWORD}
            )
            page = await context.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            response = await page.goto(stack.app_url + "/console")
            assert response is not None and response.status == 200
            await expect(page.locator("#status")).to_have_attribute(
                "data-state", "live", timeout=WAIT_S * 1000
            )
            yield page
        finally:
            await browser.close()
    assert not errors, errors


async def take_turn(call: PhoneCall, wav: str | None) -> None:
    if wav is not None:
        await call.say(read_wav(AUDIO / wav).data)
    await call.wait_for_audio(timeout=15)
    await call.wait_until_quiet(quiet_ms=700, timeout=15)


async def assert_no_full_phone_number(page: Any) -> None:
    shown = await page.evaluate("() => document.documentElement.outerHTML + document.body.innerText")
    for number in FULL_NUMBERS:
        assert not number.search(shown), number.pattern


@contextlib.asynccontextmanager
async def feed_recording(stack: SimStack) -> AsyncIterator[list[str]]:
    """Everything the live feed sends while the block runs, as the browser receives it."""
    received: list[str] = []

    async def read() -> None:
        auth = ("operator", PASSWORD)
        async with httpx.AsyncClient(auth=auth, timeout=None) as client:
            async with client.stream("GET", stack.app_url + "/console/feed") as response:
                async for line in response.aiter_lines():
                    received.append(line)

    reader = asyncio.create_task(read())
    try:
        yield received
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def test_a_call_shows_live_line_by_line_with_its_products_then_moves_to_recent(tmp_path: Path) -> None:
    async with SimStack(SCENARIO, env={"CONSOLE_PASSWORD": PASSWORD}) as stack:
        async with console(stack) as page, feed_recording(stack) as feed:
            live = page.locator("#live-calls .call")
            async with stack.dial(CALLER, pace=False) as call:
                await expect(live).to_have_count(1, timeout=WAIT_S * 1000)
                await expect(live.locator(".caller")).to_have_text("••• 0001")
                await take_turn(call, None)
                bot_lines = live.locator(".line.assistant .text")
                await expect(bot_lines.first).to_have_text(SCENARIO.greeting, timeout=WAIT_S * 1000)

                await take_turn(call, "caller_washers.wav")
                caller_lines = live.locator(".line.user .text")
                await expect(caller_lines.first).to_have_text(
                    "Show me washing machines.", timeout=WAIT_S * 1000
                )
                await expect(live.locator(".tool code").first).to_have_text("search_products")
                await expect(bot_lines).to_have_count(2, timeout=WAIT_S * 1000)

                await take_turn(call, "caller_text_me.wav")
                cards = live.locator(".product")
                await expect(cards).to_have_count(2, timeout=WAIT_S * 1000)
                assert await cards.evaluate_all("cards => cards.map(card => card.dataset.sku)") == SKUS
                await expect(cards.first.locator(".product-name")).to_have_text(
                    "SmartWash Pro 500 Front Load Washer"
                )
                await expect(cards.first.locator(".price-now")).to_have_text("$764.99")
                await expect(cards.first.locator(".product-links a")).to_have_count(4)
                await expect(live.locator(".turn")).to_have_count(2, timeout=WAIT_S * 1000)
                await expect(bot_lines.last).to_have_text(SCENARIO.turns[1].say, timeout=WAIT_S * 1000)
                await assert_no_full_phone_number(page)
                await page.screenshot(path=tmp_path / "console-live.png", full_page=True)
                await page.set_viewport_size(PHONE)
                await page.screenshot(path=tmp_path / "console-live-phone.png", full_page=True)
                await page.set_viewport_size(DESKTOP)

            await expect(live).to_have_count(0, timeout=WAIT_S * 1000)
            recent = page.locator("#recent-calls .recent-call")
            await expect(recent).to_have_count(1)
            await expect(recent.locator(".outcome")).to_have_text("Caller hung up")
            await expect(recent.locator(".recent-cost")).to_have_text(re.compile(r"^\$0\.\d+$"))
            await recent.locator("summary").click()
            await expect(recent.locator(".line.user")).to_have_count(2)
            await expect(recent.locator(".product")).to_have_count(2)
            await assert_no_full_phone_number(page)
            await page.screenshot(path=tmp_path / "console-recent.png", full_page=True)
        events = "\n".join(feed)
    assert '"type": "line"' in events and '"type": "ended"' in events
    for number in FULL_NUMBERS:
        assert not number.search(events), number.pattern


async def test_a_failed_text_is_listed_with_its_reason_and_the_retry_button_sends_it(tmp_path: Path) -> None:
    only_text = Scenario(greeting="Hi, how can I help?", turns=SCENARIO.turns[1:])
    async with SimStack(only_text, env={"CONSOLE_PASSWORD": PASSWORD}) as stack:
        stack.twilio_api.unsubscribed.add(CALLER)
        async with stack.dial(CALLER, pace=False) as call:
            await take_turn(call, None)
            await take_turn(call, "caller_text_me.wav")
        async with console(stack, viewport=PHONE) as page:
            failed = page.locator('.outbox-row[data-state="failed"]')
            await expect(failed).to_have_count(1, timeout=WAIT_S * 1000)
            await expect(failed.locator(".outbox-reason")).to_contain_text("[21610]")
            await expect(failed.locator(".outbox-to")).to_have_text("to ••• 0001")
            await page.screenshot(path=tmp_path / "console-outbox-phone.png", full_page=True)
            stack.twilio_api.unsubscribed.clear()  # the caller texted START
            await failed.locator(".retry").click()
            await expect(failed).to_have_count(0, timeout=WAIT_S * 1000)
            for _ in range(WAIT_S * 20):
                if stack.twilio_api.messages_to(CALLER):
                    break
                await asyncio.sleep(0.05)
            await assert_no_full_phone_number(page)
    assert len(stack.twilio_api.messages_to(CALLER)) == 1


@pytest.mark.parametrize("credentials", [None, {"username": "operator", "password": "not the password"}])
async def test_without_the_password_or_with_a_wrong_one_the_browser_gets_401(
    credentials: dict[str, str] | None,
) -> None:
    async with SimStack(SCENARIO, env={"CONSOLE_PASSWORD": PASSWORD}) as stack:
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                context = await browser.new_context(http_credentials=credentials)
                page = await context.new_page()
                answers: list[tuple[int, str | None]] = []
                page.on(
                    "response",
                    lambda response: answers.append(
                        (response.status, response.headers.get("www-authenticate"))
                    ),
                )
                # Headless Chromium has no login dialog to show: without credentials it gives up
                # on the page (net::ERR_INVALID_AUTH_CREDENTIALS) after the 401 it records.
                with contextlib.suppress(playwright_api.Error):
                    await page.goto(stack.app_url + "/console")
                assert answers[0] == (401, 'Basic realm="voicebot console", charset="UTF-8"')
                assert all(status == 401 for status, _ in answers), answers
                if credentials is not None:  # the browser shows the 401's own text, nothing else
                    assert "On the line" not in await page.content()
            finally:
                await browser.close()
