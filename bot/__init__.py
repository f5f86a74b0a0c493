"""A telephone voice bot for retail stores: Twilio Media Streams <-> OpenAI Realtime."""

__version__ = "0.1.0"
