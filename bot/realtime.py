"""The OpenAI Realtime client: the session the bot asks for, and the socket that carries it."""

from __future__ import annotations

from typing import Any

from bot.settings import Settings
from bot.tools import AGENT_INSTRUCTIONS, TOOL_DEFINITIONS


def audio_format(settings: Settings) -> dict[str, Any]:
    """The Realtime audio format for both directions: PCM16 24 kHz, or Twilio's mu-law as is."""
    if settings.audio_format == "pcmu":
        return {"type": "audio/pcmu"}
    return {"type": "audio/pcm", "rate": 24000}


def turn_detection(settings: Settings) -> dict[str, Any]:
    if settings.turn_detection == "semantic_vad":
        return {
            "type": "semantic_vad",
            "eagerness": "auto",
            "create_response": True,
            "interrupt_response": True,
        }
    return {
        "type": "server_vad",
        "threshold": settings.vad_threshold,
        "prefix_padding_ms": settings.vad_prefix_padding_ms,
        "silence_duration_ms": settings.vad_silence_duration_ms,
        "create_response": True,
        "interrupt_response": True,
    }


def session_config(settings: Settings) -> dict[str, Any]:
    """The `session` object of `session.update`; `/session` sends the same one for browsers."""
    fmt = audio_format(settings)
    return {
        "type": "realtime",
        "instructions": AGENT_INSTRUCTIONS,
        "output_modalities": ["audio"],
        "audio": {
            "input": {
                "format": fmt,
                "turn_detection": turn_detection(settings),
                "transcription": {"model": settings.transcription_model},
                "noise_reduction": {"type": "near_field"},
            },
            "output": {"format": fmt, "voice": settings.realtime_voice},
        },
        "tools": TOOL_DEFINITIONS,
        "tool_choice": "auto",
    }
