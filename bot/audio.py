"""Streaming transcoders between Twilio (G.711 mu-law, 8 kHz) and the Realtime API (PCM16LE, 24 kHz).

Both directions run 100 times a second per call, and every sample they hold back is delay the
caller hears. So the filter is a short linear-phase low-pass (Kaiser-windowed sinc at 24 kHz,
99 taps: flat to 3.4 kHz, at least 80 dB down from 4.6 kHz, 2 ms of delay), run as a polyphase
FIR with its state carried across chunks, and each chunk costs a handful of C calls:

- the new samples land in a persistent buffer after the filter's history (`audioop` decodes
  mu-law to PCM16 there; it measures faster than a numpy table);
- one matrix product over a block-Toeplitz view of that buffer: each row holds the inputs of
  `_ROW_SAMPLES` consecutive 8 kHz samples, so the product is a BLAS-sized (rows, taps) @
  (taps, outputs per row) rather than a dot product per output sample;
- one cast to int16. Outputs can leave the int16 range only after an input above
  32767 / (the largest sum of |taps| of an output), about -5.6 dBFS; `audioop.max` tells when,
  and then a saturating table does the cast.

Outputs are time-aligned with the inputs: the filter's ramp-up (its 2 ms delay) is dropped at
the start and `flush()` pushes silence through to emit the end, so n mu-law bytes become exactly
6n PCM bytes and 3n PCM samples exactly n mu-law bytes.

Chunking never changes a sample: inputs are integers and taps are multiples of 2**-24, so every
float64 sum is exact whatever order BLAS adds in (float32 sums, measured here, differ in the last
bit between product shapes and flip an output by one now and then).
"""

from __future__ import annotations

import warnings
from typing import Final

import numpy as np
import numpy.typing as npt

with warnings.catch_warnings():
    # Deprecated in 3.11/3.12 and gone in 3.13, where the audioop-lts package provides it.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

TWILIO_RATE_HZ: Final = 8000
REALTIME_RATE_HZ: Final = 24000
FRAME_MS: Final = 20
MULAW_SILENCE_BYTE: Final = 0xFF
RATE_RATIO: Final = REALTIME_RATE_HZ // TWILIO_RATE_HZ

FILTER_TAPS: Final = 99
FILTER_CUTOFF_HZ: Final = 3925.0
FILTER_KAISER_BETA: Final = 8.25
FILTER_DELAY_SAMPLES: Final = (FILTER_TAPS - 1) // 2
FILTER_DELAY_MS: Final = FILTER_DELAY_SAMPLES * 1000 / REALTIME_RATE_HZ

_PHASE_TAPS: Final = FILTER_TAPS // RATE_RATIO
_ROW_SAMPLES: Final = 8
_INT16_MAX: Final = 32767
_COEFF_STEP: Final = 2.0**-24

FloatArray = npt.NDArray[np.float64]


def mulaw_silence(ms: int) -> bytes:
    """`ms` milliseconds of mu-law 8 kHz silence (0xFF decodes to 0)."""
    return bytes([MULAW_SILENCE_BYTE]) * (TWILIO_RATE_HZ * ms // 1000)


def ulaw_to_pcm16(ulaw: bytes) -> bytes:
    """Decodes mu-law to PCM16LE at the same rate."""
    return audioop.ulaw2lin(ulaw, 2)


def pcm16_to_ulaw(pcm: bytes) -> bytes:
    """Encodes PCM16LE (a whole number of samples) to mu-law at the same rate."""
    return audioop.lin2ulaw(pcm, 2)


def lowpass_taps() -> FloatArray:
    """The Kaiser-windowed sinc at 24 kHz that both directions use, with a DC gain of 1."""
    n = np.arange(FILTER_TAPS) - FILTER_DELAY_SAMPLES
    taps = np.sinc(2 * FILTER_CUTOFF_HZ / REALTIME_RATE_HZ * n)
    taps *= np.kaiser(FILTER_TAPS, FILTER_KAISER_BETA)
    return _exact(taps)


def _exact(taps: FloatArray) -> FloatArray:
    """Rounds taps to multiples of 2**-24 that sum to exactly 1 (the largest tap takes the rest).

    With int16 inputs every product then fits in 41 bits and every sum of ~100 of them in 48,
    so float64 adds them without rounding, in any order.
    """
    steps: FloatArray = np.round(taps / taps.sum() / _COEFF_STEP)
    steps[np.argmax(np.abs(steps))] += round(1 / _COEFF_STEP) - steps.sum()
    exact: FloatArray = steps * _COEFF_STEP
    return exact


def _up_matrix(lowpass: FloatArray) -> FloatArray:
    """Maps a row of (R + K - 1) 8 kHz inputs to R * 3 interleaved 24 kHz outputs.

    Output 3m + p of the zero-stuffed, filtered signal is sum_k g_p[k] x[m - k], where phase p
    holds every third tap from p, times 3 to make up for the two zeros stuffed per input.
    """
    matrix = np.zeros((_ROW_SAMPLES + _PHASE_TAPS - 1, RATE_RATIO * _ROW_SAMPLES))
    for phase in range(RATE_RATIO):
        taps = _exact(lowpass[phase::RATE_RATIO])
        for out in range(_ROW_SAMPLES):
            # Row j holds x[m - (out + K - 1 - j)], so tap k sits at row out + K - 1 - k.
            matrix[out : out + _PHASE_TAPS, RATE_RATIO * out + phase] = taps[::-1]
    return matrix


def _down_matrix(lowpass: FloatArray) -> FloatArray:
    """Maps a row of 3 * (R - 1) + taps 24 kHz inputs to R 8 kHz outputs, 3 inputs apart."""
    matrix = np.zeros((RATE_RATIO * (_ROW_SAMPLES - 1) + FILTER_TAPS, _ROW_SAMPLES))
    for out in range(_ROW_SAMPLES):
        start = RATE_RATIO * out
        matrix[start : start + FILTER_TAPS, out] = lowpass[::-1]
    return matrix


def _safe_peak(matrix: FloatArray) -> int:
    """The largest input peak for which no output of `matrix` can leave the int16 range."""
    gain = float(np.abs(matrix).sum(axis=0).max())
    return int(_INT16_MAX / gain) - 1


def _saturate_table(reach: int) -> npt.NDArray[np.int16]:
    """int16 of every integer in [-reach, reach), indexed numpy-style (negatives from the end)."""
    values = np.concatenate([np.arange(reach), np.arange(-reach, 0)])
    table: npt.NDArray[np.int16] = np.clip(values, -_INT16_MAX - 1, _INT16_MAX).astype(np.int16)
    return table


_LOWPASS: Final = lowpass_taps()
_UP_MATRIX: Final = _up_matrix(_LOWPASS)
_DOWN_MATRIX: Final = _down_matrix(_LOWPASS)
_UP_SAFE_PEAK: Final = _safe_peak(_up_matrix(_LOWPASS))
_DOWN_SAFE_PEAK: Final = _safe_peak(_down_matrix(_LOWPASS))
# Every reachable output: the worst-case gain is well under 2.
_SATURATE: Final = _saturate_table(2 * (_INT16_MAX + 1))

_UP_KEEP_BYTES: Final = 2 * (_PHASE_TAPS - 1)
_UP_WINDOW: Final = _ROW_SAMPLES + _PHASE_TAPS - 1
_UP_ROW_BYTES: Final = 2 * _ROW_SAMPLES
# A sample above the safe peak reaches the outputs of the next K - 1 inputs.
_UP_LOUD_SPAN: Final = _PHASE_TAPS
_UP_FLUSH: Final = bytes([MULAW_SILENCE_BYTE]) * -(-FILTER_DELAY_SAMPLES // RATE_RATIO)

_DOWN_WINDOW: Final = RATE_RATIO * (_ROW_SAMPLES - 1) + FILTER_TAPS
_DOWN_ROW_BYTES: Final = 2 * RATE_RATIO * _ROW_SAMPLES
# The history starts D samples before the first input, so output 0 centres on input 0.
_DOWN_START_BYTES: Final = 2 * FILTER_DELAY_SAMPLES
# A sample above the safe peak reaches the outputs emitted over the next N inputs.
_DOWN_LOUD_SPAN: Final = FILTER_TAPS + RATE_RATIO
_DOWN_FLUSH: Final = bytes(4 * FILTER_DELAY_SAMPLES)

_ulaw2lin = audioop.ulaw2lin
_lin2ulaw = audioop.lin2ulaw
_peak = audioop.max
_int16 = np.int16
_intp = np.intp


class InboundTranscoder:
    """Twilio -> Realtime: mu-law 8 kHz in chunks of any length, to PCM16LE 24 kHz."""

    __slots__ = ("_buffer", "_count", "_end", "_loud", "_skip", "_trim", "_windows")

    _windows: npt.NDArray[np.int16]

    def __init__(self) -> None:
        self._buffer = bytearray(_UP_KEEP_BYTES)
        self._count = -1
        self._end = _UP_KEEP_BYTES
        self._trim = False
        self._loud = 0
        self._skip = FILTER_DELAY_SAMPLES

    def convert(self, ulaw: bytes) -> bytes:
        """Returns 3 PCM samples per mu-law byte, less the 2 ms held back at stream start."""
        count = len(ulaw)
        if count != self._count:
            if not count:
                return b""
            self._layout(count)
        pcm = _ulaw2lin(ulaw, 2)
        buffer = self._buffer
        end = self._end
        buffer[_UP_KEEP_BYTES:end] = pcm
        filtered = self._windows.dot(_UP_MATRIX)
        buffer[:_UP_KEEP_BYTES] = buffer[end - _UP_KEEP_BYTES : end]
        loud = self._loud
        if _peak(pcm, 2) > _UP_SAFE_PEAK:
            self._loud = _UP_LOUD_SPAN
            loud = 1
        elif loud:
            self._loud = max(0, loud - count)
        if self._trim or self._skip:
            filtered = self._trimmed(filtered, count)
        samples: npt.NDArray[np.int16]
        if loud:
            samples = _SATURATE[filtered.astype(_intp)]
        else:
            samples = filtered.astype(_int16)
        return samples.tobytes()

    def flush(self) -> bytes:
        """Returns the held-back end of the stream and starts a new stream."""
        owed = FILTER_DELAY_SAMPLES - self._skip
        tail = self.convert(_UP_FLUSH) if owed else b""
        self.reset()
        return tail[: 2 * owed]

    def reset(self) -> None:
        """Forgets the stream so far (filter state and held-back samples)."""
        self._buffer[:_UP_KEEP_BYTES] = bytes(_UP_KEEP_BYTES)
        self._loud = 0
        self._skip = FILTER_DELAY_SAMPLES

    def _trimmed(self, filtered: FloatArray, count: int) -> FloatArray:
        """Drops the filter's ramp-up at stream start and the padding of a partial last row."""
        produced = RATE_RATIO * count
        skip = min(self._skip, produced)
        self._skip -= skip
        return filtered.reshape(-1)[skip:produced]

    def _layout(self, count: int) -> None:
        """Lays the windows out for chunks of `count` inputs, growing the buffer if needed."""
        rows = -(-count // _ROW_SAMPLES)
        size = rows * _UP_ROW_BYTES + _UP_KEEP_BYTES
        if len(self._buffer) < size:
            history = self._buffer[:_UP_KEEP_BYTES]
            self._buffer = bytearray(size)
            self._buffer[:_UP_KEEP_BYTES] = history
        self._windows = np.ndarray((rows, _UP_WINDOW), "<i2", self._buffer, 0, (_UP_ROW_BYTES, 2))
        self._count = count
        self._end = _UP_KEEP_BYTES + 2 * count
        self._trim = rows * _ROW_SAMPLES != count


class Downsampler:
    """PCM16LE 24 kHz in chunks of any length (odd too), to PCM16LE 8 kHz.

    The Twilio-facing `OutboundTranscoder` adds mu-law encoding; this stage on its own lets the
    benchmark measure the filter below mu-law's noise floor.
    """

    __slots__ = ("_buffer", "_carry", "_count", "_kept", "_loud", "_trim", "_windows")

    _SAMPLE_BYTES = 2
    _windows: npt.NDArray[np.int16]

    def __init__(self) -> None:
        self._buffer = bytearray(_DOWN_START_BYTES)
        self._count = -1
        self._trim = False
        self._kept = _DOWN_START_BYTES
        self._carry = b""
        self._loud = 0

    def convert(self, pcm: bytes) -> bytes:
        """Returns one output sample per 3 input samples, less the 2 ms held back."""
        if self._carry or len(pcm) & 1:
            pcm = self._whole_samples(pcm)
        kept = self._kept
        end = kept + len(pcm)
        # Output m needs inputs up to 3m + D, and the buffer starts at input 3m - D.
        count = (end // 2 - 2 * FILTER_DELAY_SAMPLES + 2) // RATE_RATIO
        if count != self._count:
            self._layout(max(count, 0), end)
        buffer = self._buffer
        buffer[kept:end] = pcm
        loud = self._loud
        if pcm and _peak(pcm, 2) > _DOWN_SAFE_PEAK:
            self._loud = _DOWN_LOUD_SPAN
            loud = 1
        elif loud:
            self._loud = max(0, loud - len(pcm) // 2)
        if count <= 0:
            self._kept = end
            return b""
        filtered = self._windows.dot(_DOWN_MATRIX)
        used = 2 * RATE_RATIO * count
        buffer[: end - used] = buffer[used:end]
        self._kept = end - used
        if self._trim:
            filtered = filtered.reshape(-1)[:count]
        if loud:
            return self._encode(_SATURATE[filtered.astype(_intp)])
        return self._encode(filtered.astype(_int16))

    def flush(self) -> bytes:
        """Returns the held-back end of the stream (a dangling odd byte is dropped), then resets."""
        # One output per started group of 3 inputs not yet covered.
        owed = -(-(self._kept // 2 - FILTER_DELAY_SAMPLES) // RATE_RATIO)
        self._carry = b""
        tail = self.convert(_DOWN_FLUSH) if owed > 0 else b""
        self.reset()
        return tail[: owed * self._SAMPLE_BYTES]

    def reset(self) -> None:
        """Forgets the stream so far (filter state, held-back samples and any odd byte)."""
        self._buffer[:_DOWN_START_BYTES] = bytes(_DOWN_START_BYTES)
        self._kept = _DOWN_START_BYTES
        self._carry = b""
        self._loud = 0

    @staticmethod
    def _encode(samples: npt.NDArray[np.int16]) -> bytes:
        return samples.tobytes()

    def _whole_samples(self, pcm: bytes) -> bytes:
        """Joins a byte carried from the last chunk and carries a trailing half sample."""
        pcm = self._carry + pcm
        self._carry = pcm[-1:] if len(pcm) & 1 else b""
        return pcm[: len(pcm) & ~1]

    def _layout(self, count: int, end: int) -> None:
        """Lays the windows out for `count` outputs, growing the buffer (keeping its data)."""
        rows = -(-count // _ROW_SAMPLES)
        # A chunk yielding `count` outputs ends before input 3 * count + 2D.
        size = max(
            rows * _DOWN_ROW_BYTES + 2 * (_DOWN_WINDOW - RATE_RATIO * _ROW_SAMPLES),
            2 * (RATE_RATIO * count + 2 * FILTER_DELAY_SAMPLES + 1),
            end,
        )
        if len(self._buffer) < size:
            kept = self._buffer[: self._kept]
            self._buffer = bytearray(size)
            self._buffer[: self._kept] = kept
        self._windows = np.ndarray((rows, _DOWN_WINDOW), "<i2", self._buffer, 0, (_DOWN_ROW_BYTES, 2))
        self._count = count
        self._trim = rows * _ROW_SAMPLES != count


class OutboundTranscoder(Downsampler):
    """Realtime -> Twilio: PCM16LE 24 kHz in chunks of any length (odd too), to mu-law 8 kHz."""

    __slots__ = ()

    _SAMPLE_BYTES = 1

    @staticmethod
    def _encode(samples: npt.NDArray[np.int16]) -> bytes:
        # ndarray exports the buffer protocol; numpy's stubs do not declare it.
        return _lin2ulaw(samples, 2)  # type: ignore[arg-type]
