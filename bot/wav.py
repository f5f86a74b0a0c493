"""Reads and writes the WAV files the simulators play and record: PCM16 or G.711 mu-law, mono.

The standard `wave` module refuses mu-law (format tag 7), which is what Twilio recordings are.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

WAVE_FORMAT_PCM = 1
WAVE_FORMAT_MULAW = 7

Encoding = Literal["pcm16", "mulaw"]


class WavError(ValueError):
    """The file is not a mono PCM16 or mu-law WAV."""


@dataclass(frozen=True, slots=True)
class Wav:
    """Raw sample bytes (PCM16 little-endian or mu-law) with their rate and encoding."""

    data: bytes
    rate_hz: int
    encoding: Encoding

    @property
    def duration_s(self) -> float:
        width = 2 if self.encoding == "pcm16" else 1
        return len(self.data) / width / self.rate_hz


def read_wav(path: Path | str) -> Wav:
    blob = Path(path).read_bytes()
    if len(blob) < 12 or blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
        raise WavError(f"{path}: not a RIFF/WAVE file")
    fmt: tuple[int, int, int, int] | None = None
    offset = 12
    while offset + 8 <= len(blob):
        chunk_id, size = struct.unpack_from("<4sI", blob, offset)
        body = blob[offset + 8 : offset + 8 + size]
        if chunk_id == b"fmt ":
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            fmt = (tag, channels, rate, bits)
        elif chunk_id == b"data":
            if fmt is None:
                raise WavError(f"{path}: data chunk before fmt chunk")
            tag, channels, rate, bits = fmt
            if channels != 1:
                raise WavError(f"{path}: {channels} channels, expected mono")
            if tag == WAVE_FORMAT_PCM and bits == 16:
                return Wav(body[: len(body) - len(body) % 2], rate, "pcm16")
            if tag == WAVE_FORMAT_MULAW and bits == 8:
                return Wav(body, rate, "mulaw")
            raise WavError(f"{path}: format tag {tag} with {bits} bits is not PCM16 or mu-law")
        offset += 8 + size + (size & 1)
    raise WavError(f"{path}: no data chunk")


def write_wav(path: Path | str, wav: Wav) -> None:
    tag, bits = (WAVE_FORMAT_PCM, 16) if wav.encoding == "pcm16" else (WAVE_FORMAT_MULAW, 8)
    block = bits // 8
    # Non-PCM formats carry a cbSize field (18-byte fmt chunk) and a fact chunk.
    fmt = struct.pack("<HHIIHH", tag, 1, wav.rate_hz, wav.rate_hz * block, block, bits)
    chunks = b""
    if tag != WAVE_FORMAT_PCM:
        fmt += struct.pack("<H", 0)
        chunks += b"fact" + struct.pack("<II", 4, len(wav.data) // block)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + chunks
    pad = b"\x00" if len(wav.data) & 1 else b""
    chunks += b"data" + struct.pack("<I", len(wav.data)) + wav.data + pad
    Path(path).write_bytes(b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks)
