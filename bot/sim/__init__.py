"""Local stand-ins for Twilio and OpenAI that speak the real protocols on 127.0.0.1."""
