"""The streaming transcoders: levels, filtering, exact lengths and chunking independence."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.audio import (
    FRAME_MS,
    MULAW_SILENCE_BYTE,
    REALTIME_RATE_HZ,
    TWILIO_RATE_HZ,
    Downsampler,
    InboundTranscoder,
    OutboundTranscoder,
    mulaw_silence,
    pcm16_to_ulaw,
    ulaw_to_pcm16,
)

FloatArray = npt.NDArray[np.float64]


def tone(freq_hz: float, rate_hz: int, seconds: float, amplitude: float) -> FloatArray:
    t = np.arange(int(rate_hz * seconds)) / rate_hz
    wave: FloatArray = amplitude * np.sin(2 * np.pi * freq_hz * t)
    return wave


def pcm_bytes(samples: FloatArray) -> bytes:
    return np.round(samples).clip(-32768, 32767).astype("<i2").tobytes()


def samples_of(pcm: bytes) -> FloatArray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64)


def level_at(samples: FloatArray, freq_hz: float, rate_hz: int) -> float:
    """Amplitude of the `freq_hz` component (a whole number of cycles in, so no leakage)."""
    t = np.arange(len(samples)) / rate_hz
    return float(2 * np.abs(np.mean(samples * np.exp(-2j * np.pi * freq_hz * t))))


def up(ulaw: bytes) -> bytes:
    transcoder = InboundTranscoder()
    return transcoder.convert(ulaw) + transcoder.flush()


def down(pcm: bytes, transcoder: Downsampler | None = None) -> bytes:
    transcoder = transcoder or OutboundTranscoder()
    return transcoder.convert(pcm) + transcoder.flush()


def chunked(transcoder: InboundTranscoder | Downsampler, data: bytes, sizes: list[int]) -> bytes:
    out, pos = [], 0
    for size in sizes:
        out.append(transcoder.convert(data[pos : pos + size]))
        pos += size
    out.append(transcoder.convert(data[pos:]))
    out.append(transcoder.flush())
    return b"".join(out)


def random_ulaw(seed: int, count: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, count, dtype=np.uint8).tobytes()


def random_pcm(seed: int, count: int) -> bytes:
    noise = np.random.default_rng(seed).normal(0, 8000, count)
    return pcm_bytes(noise)


def test_mulaw_silence_is_8_bytes_of_0xff_per_millisecond() -> None:
    assert mulaw_silence(FRAME_MS) == bytes([MULAW_SILENCE_BYTE]) * 160
    assert ulaw_to_pcm16(mulaw_silence(1)) == bytes(16)


def test_silence_stays_silence_upstream() -> None:
    assert up(mulaw_silence(200)) == bytes(2 * 3 * 1600)


def test_silence_stays_silence_downstream() -> None:
    assert down(bytes(2 * 4800)) == mulaw_silence(200)


def test_a_1khz_tone_keeps_its_level_upstream() -> None:
    pcm = pcm_bytes(tone(1000, TWILIO_RATE_HZ, 0.5, 10000))
    sent = level_at(samples_of(ulaw_to_pcm16(pcm16_to_ulaw(pcm))), 1000, TWILIO_RATE_HZ)
    heard = level_at(samples_of(up(pcm16_to_ulaw(pcm))), 1000, REALTIME_RATE_HZ)
    assert abs(20 * np.log10(heard / sent)) < 0.1


def test_a_1khz_tone_keeps_its_level_downstream() -> None:
    out = down(pcm_bytes(tone(1000, REALTIME_RATE_HZ, 0.5, 10000)))
    heard = level_at(samples_of(ulaw_to_pcm16(out)), 1000, TWILIO_RATE_HZ)
    assert abs(20 * np.log10(heard / 10000)) < 0.1


def test_a_9khz_tone_is_gone_after_downsampling() -> None:
    pcm = pcm_bytes(tone(9000, REALTIME_RATE_HZ, 0.5, 30000))
    # Past the clicks of the tone's abrupt start and end (8 ms each).
    assert down(pcm)[64:-64] == mulaw_silence(500)[128:]
    alias = level_at(samples_of(down(pcm, Downsampler()))[64:-64], 1000, TWILIO_RATE_HZ)
    assert alias < 30000 * 10 ** (-75 / 20)


def test_a_full_scale_square_wave_saturates_instead_of_wrapping() -> None:
    square = np.sign(tone(500, TWILIO_RATE_HZ, 0.1, 1)) * 32767
    out = samples_of(up(pcm16_to_ulaw(pcm_bytes(square))))
    assert out.max() == 32767 and out.min() == -32768
    # Wrapping would put samples of the opposite sign inside each half-cycle.
    half_cycle = out[3 * 10 : 3 * 14]
    assert np.all(half_cycle > 0) or np.all(half_cycle < 0)


def test_n_mulaw_bytes_become_6n_pcm_bytes_after_flush() -> None:
    for count in (0, 1, 5, 17, 160, 161, 1000):
        assert len(up(random_ulaw(count, count))) == 6 * count


def test_3n_pcm_samples_become_n_mulaw_bytes_after_flush() -> None:
    for count in (0, 1, 5, 17, 160, 161, 1000):
        assert len(down(random_pcm(count, 3 * count))) == count


def test_a_partial_group_of_3_samples_still_yields_its_output() -> None:
    assert len(down(random_pcm(1, 3 * 100 + 1))) == 101


def test_20ms_frames_equal_one_shot_conversion() -> None:
    speech_like = np.random.default_rng(2).normal(0, 12000, 24000)
    ulaw = pcm16_to_ulaw(pcm_bytes(speech_like[:8000]))
    assert chunked(InboundTranscoder(), ulaw, [160] * 50) == up(ulaw)
    pcm = pcm_bytes(speech_like)
    assert chunked(OutboundTranscoder(), pcm, [960] * 50) == down(pcm)


@pytest.mark.parametrize("level", [3000, 30000], ids=["speech", "clipping"])
def test_model_deltas_of_whole_20ms_blocks_equal_one_shot_conversion(level: int) -> None:
    """A 100 ms model delta is five blocks converted in one stacked product: the same samples,
    after a start, between odd chunks and through the saturating path alike."""
    pcm = pcm_bytes(np.random.default_rng(3).normal(0, level, 24000))
    sizes = [4800, 960, 4800, 4800, 1920, 1, 959, 4800, 9600, 5000, 4800]
    assert chunked(OutboundTranscoder(), pcm, sizes) == down(pcm)
    assert chunked(Downsampler(), pcm, sizes) == down(pcm, Downsampler())


def test_empty_chunks_change_nothing() -> None:
    data = random_ulaw(3, 480)
    assert chunked(InboundTranscoder(), data, [0, 160, 0, 0, 160]) == up(data)
    pcm = random_pcm(3, 1440)
    assert chunked(OutboundTranscoder(), pcm, [0, 960, 0, 0, 960]) == down(pcm)


def test_odd_byte_chunks_are_joined_across_calls() -> None:
    pcm = random_pcm(4, 1440)
    assert chunked(OutboundTranscoder(), pcm, [1, 1, 3, 957, 1]) == down(pcm)


def test_a_dangling_odd_byte_at_flush_is_dropped() -> None:
    pcm = random_pcm(5, 300)
    assert down(pcm + b"\x01") == down(pcm)


def test_flush_starts_a_new_stream() -> None:
    first, second = random_ulaw(6, 200), random_ulaw(7, 300)
    transcoder = InboundTranscoder()
    transcoder.convert(first)
    transcoder.flush()
    assert transcoder.convert(second) + transcoder.flush() == up(second)
    pcm_first, pcm_second = random_pcm(6, 500), random_pcm(7, 700)
    outbound = OutboundTranscoder()
    outbound.convert(pcm_first + b"\x01")
    outbound.flush()
    assert down(pcm_second, outbound) == down(pcm_second)


def test_reset_forgets_the_stream() -> None:
    transcoder = OutboundTranscoder()
    transcoder.convert(random_pcm(8, 1001))
    transcoder.reset()
    pcm = random_pcm(9, 900)
    assert down(pcm, transcoder) == down(pcm)


def test_outputs_are_time_aligned_with_inputs() -> None:
    fast = np.zeros(480)
    fast[240] = 20000
    assert int(np.argmax(samples_of(down(pcm_bytes(fast), Downsampler())))) == 80
    slow = np.zeros(160)
    slow[53] = 20000
    assert int(np.argmax(samples_of(up(pcm16_to_ulaw(pcm_bytes(slow)))))) == 3 * 53


sizes = st.lists(st.integers(min_value=0, max_value=700), max_size=12)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), sizes=sizes)
def test_chunked_upsampling_equals_one_shot(seed: int, sizes: list[int]) -> None:
    data = random_ulaw(seed, 2000)
    assert chunked(InboundTranscoder(), data, sizes) == up(data)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), sizes=sizes, loud=st.booleans())
def test_chunked_downsampling_equals_one_shot(seed: int, sizes: list[int], loud: bool) -> None:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 30000 if loud else 3000, 3000)
    data = pcm_bytes(noise)
    assert chunked(OutboundTranscoder(), data, sizes) == down(data)
    assert chunked(Downsampler(), data, sizes) == down(data, Downsampler())
