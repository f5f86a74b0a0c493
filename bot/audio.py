"""Streaming transcoders between Twilio (G.711 mu-law, 8 kHz) and the Realtime API (PCM16LE, 24 kHz).

Both directions run 100 times a second per call, and every sample they hold back is delay the
caller hears. So the filter is a short linear-phase low-pass (Kaiser-windowed sinc at 24 kHz,
93 taps: flat to 3.4 kHz, at least 78 dB down from 4.6 kHz, 1.9 ms of delay), run as a polyphase
FIR with its state carried across chunks. A 20 ms frame costs a handful of C calls:

- the new samples land in a persistent buffer after the filter's history (`audioop` decodes
  mu-law to PCM16 there; it measures faster than a numpy table);
- one float32 matrix product over a block-Toeplitz view of that buffer: each of its 20 rows
  holds the inputs of 8 consecutive 8 kHz samples, so a frame is one BLAS-sized
  (20, taps) @ (taps, outputs per row) product rather than a dot product per output sample;
- one cast to int16. Outputs can leave the int16 range only near an input above
  32767 / (the largest sum of |taps| of an output), about -6 dBFS; `audioop.max` tells when,
  and then a saturating table does the cast.

Outputs are time-aligned with the inputs: the filter's ramp-up (its 1.9 ms delay) is dropped at
the start and `flush()` pushes silence through to emit the end, so n mu-law bytes become exactly
6n PCM bytes and 3n PCM samples exactly n mu-law bytes.

Chunking never changes a sample. float32 sums depend on where BLAS meets them (the same row
gives a different last bit in a product of another shape or at another row), so products always
cover a fixed grid of 20 ms blocks counted from the start of the stream, in the same shape: a
chunk that ends inside a block computes the whole block and emits its part, and the block is
computed again when the rest arrives. Each output is thus always the same sum of the same
products, whatever the chunking; 20 ms frames from the stream start cost one product each, and
a model delta of whole blocks one call for a stack of them (numpy makes the same product per
block, where one taller product would not give the same bits).
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

FILTER_TAPS: Final = 93
FILTER_CUTOFF_HZ: Final = 3950.0
FILTER_KAISER_BETA: Final = 7.75
FILTER_DELAY_SAMPLES: Final = (FILTER_TAPS - 1) // 2
FILTER_DELAY_MS: Final = FILTER_DELAY_SAMPLES * 1000 / REALTIME_RATE_HZ

_PHASE_TAPS: Final = FILTER_TAPS // RATE_RATIO
_ROW_SAMPLES: Final = 8
_BLOCK_ROWS: Final = 20
# Outputs at 8 kHz (inputs up, outputs down) per product: one 20 ms frame.
_BLOCK: Final = _ROW_SAMPLES * _BLOCK_ROWS
_INT16_MAX: Final = 32767

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
    unit: FloatArray = taps / taps.sum()
    return unit


def _up_matrix(lowpass: FloatArray) -> FloatArray:
    """Maps a row of (R + K - 1) 8 kHz inputs to R * 3 interleaved 24 kHz outputs.

    Output 3m + p of the zero-stuffed, filtered signal is sum_k g_p[k] x[m - k], where phase p
    holds every third tap from p, times 3 to make up for the two zeros stuffed per input.
    """
    matrix = np.zeros((_ROW_SAMPLES + _PHASE_TAPS - 1, RATE_RATIO * _ROW_SAMPLES))
    for phase in range(RATE_RATIO):
        # Each phase sums to 1: DC in, DC out, with no ripple at the 8 kHz rate.
        taps = lowpass[phase::RATE_RATIO] / lowpass[phase::RATE_RATIO].sum()
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
_UP_MATRIX: Final = _up_matrix(_LOWPASS).astype(np.float32)
_DOWN_MATRIX: Final = _down_matrix(_LOWPASS).astype(np.float32)
_UP_SAFE_PEAK: Final = _safe_peak(_up_matrix(_LOWPASS))
_DOWN_SAFE_PEAK: Final = _safe_peak(_down_matrix(_LOWPASS))
# Every reachable output: the worst-case gain is well under 2.
_SATURATE: Final = _saturate_table(2 * (_INT16_MAX + 1))

_UP_KEEP: Final = _PHASE_TAPS - 1
_UP_WINDOW: Final = _ROW_SAMPLES + _UP_KEEP
_UP_KEEP_BYTES: Final = 2 * _UP_KEEP
_UP_BLOCK_BYTES: Final = 2 * _BLOCK
_UP_FLUSH: Final = bytes([MULAW_SILENCE_BYTE]) * -(-FILTER_DELAY_SAMPLES // RATE_RATIO)

_DOWN_WINDOW: Final = RATE_RATIO * (_ROW_SAMPLES - 1) + FILTER_TAPS
# Output c of a block needs its inputs 3c .. 3c + 2D, counted from the block's first window.
_DOWN_SPAN: Final = 2 * FILTER_DELAY_SAMPLES
# Blocks start this many outputs before the 20 ms marks, so that 20 ms input frames from the
# stream start each complete exactly one block despite the filter's delay.
_DOWN_LEAD: Final = _BLOCK - (RATE_RATIO * _BLOCK - FILTER_DELAY_SAMPLES + 2) // RATE_RATIO
_DOWN_START: Final = RATE_RATIO * _DOWN_LEAD + FILTER_DELAY_SAMPLES
# Inputs the windows of one block span.
_DOWN_REACH: Final = RATE_RATIO * _BLOCK + _DOWN_SPAN
_DOWN_BLOCK_INPUTS: Final = RATE_RATIO * _BLOCK
_DOWN_BLOCK_BYTES: Final = 2 * _DOWN_BLOCK_INPUTS
_DOWN_START_BYTES: Final = 2 * _DOWN_START
_DOWN_FULL_BYTES: Final = _DOWN_START_BYTES + _DOWN_BLOCK_BYTES
_DOWN_FLUSH: Final = bytes(2 * (_DOWN_SPAN + RATE_RATIO))

_ulaw2lin = audioop.ulaw2lin
_lin2ulaw = audioop.lin2ulaw
_peak = audioop.max
_int16 = np.int16
_intp = np.intp


def _to_int16(filtered: npt.NDArray[np.float32], loud: bool) -> npt.NDArray[np.int16]:
    """Truncates to int16, through the saturating table when an input was loud enough to clip."""
    samples: npt.NDArray[np.int16]
    if loud:
        samples = _SATURATE[filtered.astype(_intp)]
    else:
        samples = filtered.astype(_int16)
    return samples


class InboundTranscoder:
    """Twilio -> Realtime: mu-law 8 kHz in chunks of any length, to PCM16LE 24 kHz."""

    __slots__ = ("_buffer", "_filled", "_skip", "_steady", "_view", "_windows")

    _filled: int
    _skip: int
    _steady: bool

    def __init__(self) -> None:
        # int16 samples: the filter's history, then the current 20 ms block.
        self._buffer = bytearray(2 * (_UP_KEEP + _BLOCK))
        self._view = memoryview(self._buffer)
        self._windows: npt.NDArray[np.int16] = np.ndarray(
            (_BLOCK_ROWS, _UP_WINDOW), "<i2", self._buffer, 0, (2 * _ROW_SAMPLES, 2)
        )
        self.reset()

    def convert(self, ulaw: bytes) -> bytes:
        """Returns 3 PCM samples per mu-law byte, less the 1.9 ms held back at stream start."""
        if self._steady and len(ulaw) == _BLOCK:
            # A whole block past the ramp-up: the 20 ms frames Twilio sends.
            buffer = self._buffer
            buffer[_UP_KEEP_BYTES:] = _ulaw2lin(ulaw, 2)
            filtered: npt.NDArray[np.float32] = self._windows.dot(_UP_MATRIX)
            loud = _peak(self._view, 2) > _UP_SAFE_PEAK
            buffer[:_UP_KEEP_BYTES] = buffer[_UP_BLOCK_BYTES:]
            if loud:
                return _to_int16(filtered, loud).tobytes()
            return filtered.astype(_int16).tobytes()
        return self._convert_pieces(ulaw)

    def flush(self) -> bytes:
        """Returns the held-back end of the stream and starts a new stream."""
        owed = FILTER_DELAY_SAMPLES - self._skip
        tail = self.convert(_UP_FLUSH) if owed else b""
        self.reset()
        return tail[: 2 * owed]

    def reset(self) -> None:
        """Forgets the stream so far (filter state and held-back samples)."""
        self._buffer[: 2 * _UP_KEEP] = bytes(2 * _UP_KEEP)
        self._filled = 0
        self._skip = FILTER_DELAY_SAMPLES
        self._steady = False

    def _convert_pieces(self, ulaw: bytes) -> bytes:
        """Any chunk: fills the current block piece by piece, emitting as it goes."""
        out = []
        buffer = self._buffer
        done = 0
        while done < len(ulaw):
            filled = self._filled
            take = min(_BLOCK - filled, len(ulaw) - done)
            start, stop = filled, filled + take
            buffer[2 * (_UP_KEEP + start) : 2 * (_UP_KEEP + stop)] = _ulaw2lin(ulaw[done : done + take], 2)
            done += take
            filtered = self._windows.dot(_UP_MATRIX).reshape(-1)
            loud = _peak(self._view[2 * start : 2 * (_UP_KEEP + stop)], 2) > _UP_SAFE_PEAK
            begin = RATE_RATIO * start
            skip = min(self._skip, RATE_RATIO * take)
            self._skip -= skip
            out.append(_to_int16(filtered[begin + skip : RATE_RATIO * stop], loud).tobytes())
            if stop == _BLOCK:
                buffer[: 2 * _UP_KEEP] = buffer[2 * _BLOCK :]
                stop = 0
            self._filled = stop
        self._steady = not self._filled and not self._skip
        return b"".join(out)


class Downsampler:
    """PCM16LE 24 kHz in chunks of any length (odd too), to PCM16LE 8 kHz.

    The Twilio-facing `OutboundTranscoder` adds mu-law encoding; this stage on its own lets the
    benchmark measure the filter below mu-law's noise floor.
    """

    __slots__ = ("_buffer", "_carry", "_done", "_kept", "_reach", "_steady", "_view", "_windows")

    _SAMPLE_BYTES = 2
    _done: int
    _kept: int
    _carry: bytes
    _steady: bool

    def __init__(self) -> None:
        # int16 samples from the first input of the current block's first window on.
        self._buffer = bytearray(2 * (_DOWN_START + _DOWN_REACH))
        self._view = memoryview(self._buffer)
        self._reach = self._view[: 2 * _DOWN_REACH]
        self._windows: npt.NDArray[np.int16] = self._layout(0)
        self.reset()

    def convert(self, pcm: bytes) -> bytes:
        """Returns one output sample per 3 input samples, less the 1.9 ms held back.

        On a steady stream a chunk of whole 20 ms blocks (a model delta is five) is one stacked
        product; any other chunk longer than 20 ms is taken 20 ms at a time. Neither changes a
        sample, and both keep a steady stream on the fast paths."""
        if self._steady and len(pcm) == _DOWN_BLOCK_BYTES:
            # The next whole block, with the buffer just refilled to its start: the 20 ms
            # frames of a steady stream (blocks are laid out so that these line up).
            buffer = self._buffer
            buffer[_DOWN_START_BYTES:_DOWN_FULL_BYTES] = pcm
            filtered: npt.NDArray[np.float32] = self._windows.dot(_DOWN_MATRIX)
            loud = _peak(self._reach, 2) > _DOWN_SAFE_PEAK
            buffer[:_DOWN_START_BYTES] = buffer[_DOWN_BLOCK_BYTES:_DOWN_FULL_BYTES]
            if loud:
                return self._encode(_to_int16(filtered, loud))
            return self._encode(filtered.astype(_int16))
        if self._steady and len(pcm) % _DOWN_BLOCK_BYTES == 0 and pcm:
            return self._convert_blocks(pcm)
        if len(pcm) > _DOWN_BLOCK_BYTES:
            step = _DOWN_BLOCK_BYTES
            return b"".join([self.convert(pcm[at : at + step]) for at in range(0, len(pcm), step)])
        return self._convert_any(pcm)

    def _convert_blocks(self, pcm: bytes) -> bytes:
        """Whole blocks of a steady stream (a 100 ms model delta is five) in one call: a stack of
        the same (rows, taps) products the single-block path makes, so every sample is the same.
        The inputs go in a buffer of their own, freed after: a call keeps one block's worth."""
        inputs = self._buffer[:_DOWN_START_BYTES] + pcm
        windows: npt.NDArray[np.int16] = np.ndarray(
            (len(pcm) // _DOWN_BLOCK_BYTES, _BLOCK_ROWS, _DOWN_WINDOW),
            "<i2",
            inputs,
            0,
            (_DOWN_BLOCK_BYTES, 6 * _ROW_SAMPLES, 2),
        )
        filtered: npt.NDArray[np.float32] = np.matmul(windows, _DOWN_MATRIX)
        loud = _peak(inputs, 2) > _DOWN_SAFE_PEAK
        self._buffer[:_DOWN_START_BYTES] = inputs[-_DOWN_START_BYTES:]
        return self._encode(_to_int16(filtered, loud))

    def _convert_any(self, pcm: bytes) -> bytes:
        """Any chunk: emits every output its inputs complete, block by block."""
        if self._carry or len(pcm) & 1:
            pcm = self._whole_samples(pcm)
        kept = self._kept
        end = kept + len(pcm) // 2
        # Room for the windows of the block that `end` falls in (they may read past the data).
        if 2 * (end + _DOWN_REACH) > len(self._buffer):
            self._grow(2 * (end + _DOWN_REACH))
        self._buffer[2 * kept : 2 * end] = pcm
        ready = (end - _DOWN_SPAN + 2) // RATE_RATIO
        out = []
        base = 0
        while ready > self._done:
            done = self._done
            stop = min(ready, _BLOCK)
            windows = self._windows if not base else self._layout(base)
            out.append(self._emit_block(windows, done, stop, base))
            if stop < _BLOCK:
                break
            base += RATE_RATIO * _BLOCK
            ready -= _BLOCK
        if base:
            self._buffer[: 2 * (end - base)] = self._buffer[2 * base : 2 * end]
        self._kept = end - base
        self._steady = not self._carry and not self._done and self._kept == _DOWN_START
        return b"".join(out)

    def flush(self) -> bytes:
        """Returns the held-back end of the stream (a dangling odd byte is dropped), then resets."""
        # One output per started group of 3 inputs not yet covered.
        owed = -(-(self._kept - FILTER_DELAY_SAMPLES) // RATE_RATIO) - self._done
        self._carry = b""
        tail = self.convert(_DOWN_FLUSH) if owed > 0 else b""
        self.reset()
        return tail[: owed * self._SAMPLE_BYTES]

    def reset(self) -> None:
        """Forgets the stream so far (filter state, held-back samples and any odd byte)."""
        self._buffer[: 2 * _DOWN_START] = bytes(2 * _DOWN_START)
        self._kept = _DOWN_START
        self._done = _DOWN_LEAD
        self._carry = b""
        self._steady = False

    @staticmethod
    def _encode(samples: npt.NDArray[np.int16]) -> bytes:
        return samples.tobytes()

    def _emit_block(self, windows: npt.NDArray[np.int16], start: int, stop: int, base: int) -> bytes:
        """Outputs `start` to `stop` of the block whose first window begins at input `base`."""
        filtered = windows.dot(_DOWN_MATRIX).reshape(-1)
        first = base + RATE_RATIO * start
        last = base + RATE_RATIO * (stop - 1) + _DOWN_SPAN + 1
        loud = _peak(self._view[2 * first : 2 * last], 2) > _DOWN_SAFE_PEAK
        self._done = stop if stop < _BLOCK else 0
        if start or stop < _BLOCK:
            filtered = filtered[start:stop]
        return self._encode(_to_int16(filtered, loud))

    def _whole_samples(self, pcm: bytes) -> bytes:
        """Joins a byte carried from the last chunk and carries a trailing half sample."""
        pcm = self._carry + pcm
        self._carry = pcm[-1:] if len(pcm) & 1 else b""
        return pcm[: len(pcm) & ~1]

    def _layout(self, base: int) -> npt.NDArray[np.int16]:
        """The block's windows, starting at input `base` of the buffer."""
        return np.ndarray((_BLOCK_ROWS, _DOWN_WINDOW), "<i2", self._buffer, 2 * base, (6 * _ROW_SAMPLES, 2))

    def _grow(self, size: int) -> None:
        """Moves to a buffer of at least `size` bytes, keeping its samples."""
        kept = self._buffer[: 2 * self._kept]
        self._buffer = bytearray(size)
        self._buffer[: len(kept)] = kept
        self._view = memoryview(self._buffer)
        self._reach = self._view[: 2 * _DOWN_REACH]
        self._windows = self._layout(0)


class OutboundTranscoder(Downsampler):
    """Realtime -> Twilio: PCM16LE 24 kHz in chunks of any length (odd too), to mu-law 8 kHz."""

    __slots__ = ()

    _SAMPLE_BYTES = 1

    @staticmethod
    def _encode(samples: npt.NDArray[np.int16]) -> bytes:
        # ndarray exports the buffer protocol; numpy's stubs do not declare it.
        return _lin2ulaw(samples, 2)  # type: ignore[arg-type]
