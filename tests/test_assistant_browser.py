"""The assistant page in a real browser: headless Chromium (Debian's) with a fake microphone, the
app under uvicorn and the Realtime simulator, all on 127.0.0.1.

Each test writes screenshots into its tmp dir. They skip, naming what to install, where Chromium or
the playwright package is missing (CI installs both and forbids the skip).
"""

from __future__ import annotations

import asyncio
import audioop
import contextlib
import json
import math
import re
import tempfile
import wave
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from browser import CHROMIUM, CHROMIUM_ARGS, DESKTOP, PHONE, WAIT_S, playwright_api
from store_files import write_garden_catalog, write_stores

from bot.app import create_app
from bot.catalog import Catalog
from bot.settings import SAMPLE_CATALOG_PATH, load_settings
from bot.sim.realtime import RealtimeSimulator, Scenario
from bot.sim.server import LocalServer
from bot.wav import read_wav

pytestmark = pytest.mark.anyio

SIM_KEY = "sk-sim-browser"
AUDIO_DIR = Path(__file__).parent.parent / "bot" / "sim" / "audio"
WASHER_SKUS = ["WM-2026-0005", "WM-2024-X500", "WM-2025-0001"]
DRYER_SKUS = ["DR-2024-0009", "DR-2025-0010", "DR-2026-0008"]
SPEAKABLE = re.compile(r"[{}\[\]]|https?://|www\.")
SERVICE = "(await import('/assistant/realtime-service.js')).RealtimeService.getInstance()"


@dataclass
class Assistant:
    """The app serving the page, against the Realtime simulator; `now` is the app's clock."""

    url: str
    sim: RealtimeSimulator
    now: list[float]


@pytest.fixture
async def assistant() -> AsyncIterator[Assistant]:
    async with serving({}) as served:
        yield served


@contextlib.asynccontextmanager
async def serving(settings: dict[str, str]) -> AsyncIterator[Assistant]:
    """The app (with these settings too) and the page's Realtime stand-in."""
    now = [1_000_000.0]
    sim = RealtimeSimulator(Scenario.from_json("assistant"), api_key=SIM_KEY)
    await sim.start()
    env = {
        "OPENAI_API_KEY": SIM_KEY,
        "OPENAI_REALTIME_URL": sim.url,
        "OPENAI_BASE_URL": sim.base_url,
        "DATABASE_PATH": str(Path(tempfile.mkdtemp()) / "outbox.sqlite3"),
        "SESSION_RATE_LIMIT_PER_MINUTE": "1",
        **settings,
    }
    app = create_app(load_settings(env, dotenv=None), clock=lambda: now[0])
    try:
        async with LocalServer(app) as server:
            yield Assistant(server.base_url, sim, now)
    finally:
        await sim.stop()


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load(SAMPLE_CATALOG_PATH)


@contextlib.asynccontextmanager
async def open_page(
    assistant: Assistant,
    *,
    viewport: dict[str, int] = DESKTOP,
    microphone: Path | None = None,
    path: str = "/",
) -> AsyncIterator[Any]:
    """The page, connected; fails the test on any uncaught script error."""
    args = list(CHROMIUM_ARGS)
    if microphone is not None:
        args += [
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={microphone}%noloop",
        ]
    errors: list[str] = []
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = await browser.new_page(viewport=viewport)
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(assistant.url + path)
            await expect_state(page, "connected")
            yield page
        finally:
            await browser.close()
    assert not errors, errors


async def expect_state(page: Any, state: str) -> None:
    status = page.locator("#status")
    await playwright_api.expect(status).to_have_attribute("data-state", state, timeout=WAIT_S * 1000)


async def ask(page: Any, question: str) -> None:
    await page.fill("#question", question)
    await page.press("#question", "Enter")


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Waits (bounded) for state the simulator or app reaches asynchronously."""
    for _ in range(WAIT_S * 20):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def audio_stats(page: Any) -> dict[str, float]:
    stats: dict[str, float] = await page.evaluate(f"async () => {SERVICE}.getAudioStats()")
    return stats


async def played(page: Any, ms: int) -> None:
    """Waits (bounded) until the speakers have played `ms` of the bot's voice."""
    for _ in range(WAIT_S * 20):
        if (await audio_stats(page))["playedMs"] >= ms:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the bot's voice did not play {ms} ms: {await audio_stats(page)}")


async def shown_cards(page: Any, count: int) -> list[dict[str, Any]]:
    cards = page.locator(".card")
    await playwright_api.expect(cards).to_have_count(count, timeout=WAIT_S * 1000)
    shown: list[dict[str, Any]] = await cards.evaluate_all(
        """cards => cards.map(card => {
            const shown = (selector) => {
                const element = card.querySelector(selector);
                return element.hidden ? null : element.textContent;
            };
            const links = [...card.querySelectorAll('.links a')].map(a => [a.textContent, a.href]);
            return {
                sku: card.dataset.sku,
                brand: shown('.brand'),
                name: shown('.name'),
                price: shown('.price-now'),
                was: shown('.price-was'),
                off: shown('.price-off'),
                rate: shown('.rate'),
                description: shown('.description'),
                faqs: [...card.querySelectorAll('.faqs summary')].map(s => s.textContent),
                links: Object.fromEntries(links),
                pictures: card.querySelectorAll('.thumb').length,
            };
        })"""
    )
    return shown


def assert_cards_match_the_catalog(cards: list[dict[str, Any]], catalog: Catalog, skus: list[str]) -> None:
    assert [card["sku"] for card in cards] == skus
    products, _ = catalog.get(skus)
    for card, product in zip(cards, products, strict=True):
        assert (card["name"], card["brand"]) == (product.name, product.brand)
        assert card["price"] == f"${product.price_after_discount:,.2f}"
        if product.discount:
            assert card["was"] == f"${product.price:,.2f}"
            assert card["off"] == f"{product.discount:g}% off"
        assert card["rate"] == f"{product.rate:.1f}"
        assert card["description"] == product.description
        assert card["faqs"] == [faq.question for faq in product.FAQS]
        assert card["links"] == {
            "3D view": product.Link3D,
            "AR view": product.LinkAR,
            "Video": product.LinkVideo,
            "Technical sheet": product.TechnicalSheet,
        }
        assert card["pictures"] == len({product.profilePic, *product.images})


def assert_nothing_spoken_holds_json_or_a_url(sim: RealtimeSimulator, page_texts: list[str]) -> None:
    """What the model was asked to say (tool summaries and messages) and what it said."""
    for session in sim.sessions:
        for _, output in session.tool_outputs:
            fields = json.loads(output)
            for key in ("summary", "message"):
                assert not SPEAKABLE.search(str(fields.get(key, ""))), fields
            assert "http" not in output, output
        for role, text in session.transcript:
            assert role != "assistant" or not SPEAKABLE.search(text), text
    for text in page_texts:
        assert not SPEAKABLE.search(text), text


async def assistant_texts(page: Any) -> list[str]:
    texts: list[str] = await page.locator(".message.assistant").all_text_contents()
    return texts


# --- 1. typed -----------------------------------------------------------------------------


async def test_a_typed_question_shows_the_washers_and_the_bot_speaks_without_json_or_links(
    assistant: Assistant, catalog: Catalog, tmp_path: Path
) -> None:
    async with open_page(assistant) as page:
        await ask(page, "Show me washing machines")
        cards = await shown_cards(page, 3)
        assert_cards_match_the_catalog(cards, catalog, WASHER_SKUS)
        await playwright_api.expect(page.locator(".message.assistant").last).to_contain_text(
            "on your screen", timeout=WAIT_S * 1000
        )
        await played(page, 2500)
        stats = await audio_stats(page)
        assert stats["receivedMs"] == 3000 and stats["playedMs"] <= stats["receivedMs"]
        assert_nothing_spoken_holds_json_or_a_url(assistant.sim, await assistant_texts(page))
        await page.screenshot(path=tmp_path / "typed-desktop.png")
        await page.set_viewport_size(PHONE)
        await page.screenshot(path=tmp_path / "typed-phone.png")


async def test_query_with_response_resolves_with_the_products_or_rejects_after_its_timeout(
    assistant: Assistant, catalog: Catalog, tmp_path: Path
) -> None:
    async with open_page(assistant) as page:
        first = await page.evaluate(f"async () => {SERVICE}.queryWithResponse('Show me washing machines')")
        assert first["JsonData"]["jsonType"] == "ProductsCollection"
        assert [p["sku"] for p in first["JsonData"]["products"]] == WASHER_SKUS
        dryers = await page.evaluate(f"async () => {SERVICE}.queryWithResponse('And dryers?')")
        assert [p["sku"] for p in dryers["JsonData"]["products"]] == DRYER_SKUS
        assert_cards_match_the_catalog(await shown_cards(page, 3), catalog, DRYER_SKUS)
        outcome = await page.evaluate(
            f"""async () => {{
                const started = performance.now();
                try {{
                    await {SERVICE}.queryWithResponse('When are you open?', 1500);
                    return {{ resolved: true }};
                }} catch (error) {{
                    return {{ name: error.name, message: error.message, ms: performance.now() - started }};
                }}
            }}"""
        )
        assert outcome["name"] == "TimeoutError" and "1500 ms" in outcome["message"]
        assert 1400 <= outcome["ms"] < 5000
        await playwright_api.expect(page.locator(".message.assistant").last).to_contain_text("open every day")
        await page.screenshot(path=tmp_path / "query-with-response.png")


async def test_a_question_typed_while_a_tool_still_runs_goes_after_its_output_and_one_response_answers(
    assistant: Assistant,
) -> None:
    held: list[str] = []
    released = asyncio.Event()

    async def hold_the_first_search(route: Any) -> None:
        if not held:
            held.append(route.request.url)
            await released.wait()
        await route.continue_()

    async with open_page(assistant) as page:
        await page.route("**/assistant/tools/search_products*", hold_the_first_search)
        washers = await page.evaluate(f"async () => {SERVICE}.queryWithResponse('Show me washing machines')")
        assert [p["sku"] for p in washers["JsonData"]["products"]] == WASHER_SKUS
        assert held, "the washers' search is still running"
        dryers = asyncio.ensure_future(
            page.evaluate(f"async () => {SERVICE}.queryWithResponse('And dryers?')")
        )
        await playwright_api.expect(page.locator(".message.user").last).to_contain_text("And dryers?")
        released.set()
        products = (await dryers)["JsonData"]["products"]
        assert [p["sku"] for p in products] == DRYER_SKUS
        await playwright_api.expect(page.locator(".message.assistant").last).to_contain_text(
            "put them on your screen"
        )

    sent = assistant.sim.sessions[-1].events_received

    def question(text: str) -> int:
        return next(
            i
            for i, event in enumerate(sent)
            if event.get("item", {}).get("content") == [{"type": "input_text", "text": text}]
        )

    first, second = question("Show me washing machines"), question("And dryers?")
    outputs = [
        i for i, event in enumerate(sent) if event.get("item", {}).get("type") == "function_call_output"
    ]
    creates = [i for i, event in enumerate(sent) if event["type"] == "response.create"]
    assert len(outputs) >= 2 and max(outputs[:2]) < second, "the washers' tool outputs go first"
    assert len([i for i in creates if first < i < second]) == 1, "no response asked before the question"


async def test_typing_over_the_bot_stops_its_voice_and_truncates_at_what_was_heard(
    assistant: Assistant,
) -> None:
    async with open_page(assistant) as page:
        await ask(page, "Show me washing machines")
        await played(page, 1000)
        await ask(page, "And dryers?")
        session = assistant.sim.sessions[-1]

        def user_items() -> list[int]:
            sent = session.events_received
            return [i for i, event in enumerate(sent) if event.get("item", {}).get("role") == "user"]

        await eventually(
            lambda: bool(session.truncations) and len(user_items()) >= 2, "the truncate and the question"
        )
        (_, content_index, heard_ms) = session.truncations[0]
        assert content_index == 0 and 1000 <= heard_ms < 2500, heard_ms
        sent = session.events_received
        questions = user_items()
        truncate = next(i for i, event in enumerate(sent) if event["type"] == "conversation.item.truncate")
        assert truncate < questions[1], "cut before the model reads the next question"
        await shown_cards(page, 3)
        await playwright_api.expect(page.locator(".card").first).to_have_attribute("data-sku", DRYER_SKUS[0])


# --- 2. spoken ----------------------------------------------------------------------------


def microphone_wav(directory: Path, name: str = "caller_washers") -> Path:
    """The caller recording (mu-law 8 kHz) as the PCM WAV Chromium's fake microphone wants."""
    recording = read_wav(AUDIO_DIR / f"{name}.wav")
    pcm8k = audioop.ulaw2lin(recording.data, 2)
    pcm48k, _ = audioop.ratecv(pcm8k, 2, 1, 8000, 48000, None)
    lead = b"\x00\x00" * (48000 // 2)  # half a second before the caller speaks
    path = directory / f"{name}-48k.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(48000)
        out.writeframes(lead + pcm48k)
    return path


async def test_a_spoken_question_through_the_microphone_shows_the_washers(
    assistant: Assistant, catalog: Catalog, tmp_path: Path
) -> None:
    async with open_page(assistant, viewport=PHONE, microphone=microphone_wav(tmp_path)) as page:
        await page.click("#mic")
        await playwright_api.expect(page.locator("#mic")).to_have_attribute("data-state", "live")
        assert_cards_match_the_catalog(await shown_cards(page, 3), catalog, WASHER_SKUS)
        session = assistant.sim.sessions[-1]
        assert session.audio_appends > 0 and session.input_audio_ms >= 1000
        assert ("user", "Show me washing machines.") in session.transcript
        question = page.locator(".message.user").first
        await playwright_api.expect(question).to_have_text("Show me washing machines.")
        await page.screenshot(path=tmp_path / "spoken-phone.png")
        await page.click("#mic")
        await playwright_api.expect(page.locator("#mic")).to_have_attribute("data-state", "muted")


# --- 3. the socket drops ------------------------------------------------------------------


async def test_after_the_socket_drops_the_page_reconnects_with_a_new_secret_and_answers(
    assistant: Assistant, catalog: Catalog, tmp_path: Path
) -> None:
    sim = assistant.sim
    async with open_page(assistant) as page:
        await ask(page, "Show me washing machines")
        await shown_cards(page, 3)
        await played(page, 2500)  # the answer is over: the drop hits the next question
        assistant.now[0] += 61  # past /session's one-a-minute limit in this test
        sim.drop_after_events = 3
        await ask(page, "And dryers?")
        await expect_state(page, "reconnecting")
        await page.screenshot(path=tmp_path / "reconnecting.png")
        await expect_state(page, "connected")
        secrets = [session.client_secret for session in sim.sessions]
        assert len(secrets) == 2 and None not in secrets and secrets[0] != secrets[1]
        assert len(sim.client_secret_requests) == 2
        retold = sim.sessions[1].transcript
        assert ("user", "Show me washing machines") in retold, "the new session was told the conversation"
        await page.evaluate("document.querySelectorAll('.card').forEach(card => card.classList.add('old'))")
        await ask(page, "Show me washing machines")
        fresh = page.locator(".card:not(.old)")
        await playwright_api.expect(fresh).to_have_count(3, timeout=WAIT_S * 1000)
        assert_cards_match_the_catalog(await shown_cards(page, 3), catalog, WASHER_SKUS)
        await eventually(lambda: len(sim.sessions[1].tool_outputs) == 2, "the tool outputs")
        answers = page.locator(".message.assistant").filter(has_text="on your screen")
        await playwright_api.expect(answers).to_have_count(2, timeout=WAIT_S * 1000)
        await page.screenshot(path=tmp_path / "reconnected.png")


# --- 4. /session refused ------------------------------------------------------------------


async def test_a_refused_session_shows_why_and_the_page_recovers_when_it_can(
    assistant: Assistant, catalog: Catalog, tmp_path: Path
) -> None:
    sim = assistant.sim
    async with open_page(assistant) as page:
        assistant.now[0] += 59  # the one /session a minute is spent, for one more second
        sim.close_with(1011, "server restart")
        notice = page.locator("#notice")
        await playwright_api.expect(notice).to_contain_text("Too many requests right now. Retrying in")
        await expect_state(page, "reconnecting")
        await page.screenshot(path=tmp_path / "refused-429.png")

        sim.reject_client_secrets_status = 503
        assistant.now[0] += 2
        await playwright_api.expect(notice).to_contain_text(
            "The assistant is unavailable: OpenAI is busy", timeout=WAIT_S * 1000
        )
        await playwright_api.expect(notice).to_contain_text("Retrying in")
        await page.screenshot(path=tmp_path / "refused-503.png")

        sim.reject_client_secrets_status = None
        assistant.now[0] += 120
        await expect_state(page, "connected")
        await playwright_api.expect(notice).to_be_hidden()
        await ask(page, "Show me washing machines")
        assert_cards_match_the_catalog(await shown_cards(page, 3), catalog, WASHER_SKUS)
        await page.screenshot(path=tmp_path / "recovered.png")


# --- the worklets' resampler, alone --------------------------------------------------------

TONE_GAINS_JS = """
([inputRate, outputRate, tones]) => tones.map((hz) => {
  const resampler = new Resampler(inputRate, outputRate);
  const output = [];
  for (let start = 0; start < inputRate / 2; start += 128) {
    const block = new Float32Array(128);
    for (let i = 0; i < 128; i++) block[i] = 0.5 * Math.sin((2 * Math.PI * hz * (start + i)) / inputRate);
    for (const sample of resampler.push(block)) output.push(sample);
  }
  const settled = output.slice(outputRate / 10);
  return Math.sqrt(settled.reduce((sum, v) => sum + v * v, 0) / settled.length) / (0.5 / Math.SQRT2);
})
"""
SPEECH_HZ = [300, 1000, 3400, 8000, 9000]
ALIAS_HZ = [13000, 14000, 16000, 20000]  # above 12 kHz: would fold back onto 4-11 kHz at 24 kHz


async def test_the_worklets_resampler_keeps_speech_and_rejects_aliases() -> None:
    source = (Path(__file__).parent.parent / "bot/web/assistant/audio-worklets.js").read_text()
    stubs = "globalThis.sampleRate = 48000; class AudioWorkletProcessor {} function registerProcessor() {}\n"
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.add_script_tag(content=stubs + source)
            for rates in ((48000, 24000), (44100, 24000), (24000, 48000), (24000, 44100)):
                gains = await page.evaluate(TONE_GAINS_JS, [*rates, SPEECH_HZ])
                for hz, gain in zip(SPEECH_HZ, gains, strict=True):
                    assert 20 * math.log10(gain) == pytest.approx(0, abs=0.1), (rates, hz)
                if rates[1] < rates[0]:
                    gains = await page.evaluate(TONE_GAINS_JS, [*rates, ALIAS_HZ])
                    for hz, gain in zip(ALIAS_HZ, gains, strict=True):
                        assert 20 * math.log10(max(gain, 1e-9)) < -70, (rates, hz)
        finally:
            await browser.close()


@pytest.fixture
async def garden_assistant(tmp_path: Path) -> AsyncIterator[Assistant]:
    """The app of a deployment with a Spanish garden center beside the default store."""
    write_garden_catalog(tmp_path)
    garden = {"name": "Green Thumb", "numbers": ["+15557650003"], "language": "es", "catalog": "garden.json"}
    stores = write_stores(tmp_path / "stores.json", {"garden": garden})
    async with serving({"STORES_PATH": str(stores)}) as served:
        yield served


async def test_a_stores_page_talks_as_that_store_and_searches_its_catalog(
    garden_assistant: Assistant,
) -> None:
    assistant = garden_assistant
    async with open_page(assistant, path="/?store=garden") as page:
        [request] = assistant.sim.client_secret_requests
        assert request["session"]["instructions"].startswith("Eres el asistente de una tienda")
        await ask(page, "Show me washing machines")
        session = assistant.sim.sessions[-1]
        await eventually(lambda: len(session.tool_outputs) == 2, "both tool calls to run")
    search, show = (json.loads(output) for _, output in session.tool_outputs)
    assert search["found"] == 0, "the garden center sells no washing machine"
    assert search["summary"].startswith("No hay nada"), search["summary"]
    assert "Nothing was shown" in show["error"], "the appliance skus are not in the garden's catalog"
