"""Every setting, read once from the environment and validated before anything starts.

A bad value stops start-up with one line per problem naming the variable; a missing secret
only disables the feature that needs it (see `Settings.disabled_features`).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PACKAGE_DIR = Path(__file__).resolve().parent
SAMPLE_CATALOG_PATH = PACKAGE_DIR / "data" / "catalog.json"
# Standard Webhooks' suggested schedule, stretched to about three days of retries.
DEFAULT_WEBHOOK_RETRY_SCHEDULE_S = (5, 300, 1800, 7200, 18000, 36000, 36000, 72000, 86400)
DEFAULT_MEDIA_BASE_URL = "https://shop.example.com/media/"
WEBHOOK_SECRET_PREFIX = "whsec_"
# Standard Webhooks: a signing key is 24 to 64 random bytes, shared as base64 behind `whsec_`.
WEBHOOK_KEY_MIN_BYTES = 24
MAKE_WEBHOOK_SECRET = (
    "python3 -c \"import base64, secrets; "
    "print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())\""
)


# A setting whose name holds one of these never has its value echoed in an error.
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def _price(usd_per_million: float, alias: str) -> Any:
    """A price setting: US dollars per million tokens, finite and not negative."""
    return Field(usd_per_million, alias=alias, ge=0, allow_inf_nan=False)


class SettingsError(ValueError):
    """Raised with one human-readable line per bad environment variable."""


def check_e164(value: str) -> str:
    """A phone number as Twilio wants it; ValueError says what one looks like."""
    digits = value[1:]
    if not value.startswith("+") or not digits.isdigit() or not 8 <= len(digits) <= 15:
        raise ValueError("must be an E.164 number like +15551234567")
    return value


def check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL")
    return value


def check_webhook_secret(value: str) -> str:
    """A secret every Standard Webhooks verifier reads the same way, in its `whsec_` form.

    Stock verifiers base64-decode the secret (with or without `whsec_`), so a plain word
    would sign with bytes no receiver would use: refused here rather than at every delivery.
    """
    encoded = value.removeprefix(WEBHOOK_SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        key = b""
    if len(key) < WEBHOOK_KEY_MIN_BYTES:
        raise ValueError(
            f"not a Standard Webhooks secret: expected whsec_ and the base64 of at least "
            f"{WEBHOOK_KEY_MIN_BYTES} random bytes; make one with {MAKE_WEBHOOK_SECRET}"
        )
    return WEBHOOK_SECRET_PREFIX + encoded


class Settings(BaseModel):
    """The bot's configuration; field aliases are the environment variable names."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    openai_api_key: str | None = Field(None, alias="OPENAI_API_KEY")
    openai_realtime_url: str = Field("wss://api.openai.com/v1/realtime", alias="OPENAI_REALTIME_URL")
    openai_base_url: str = Field("https://api.openai.com", alias="OPENAI_BASE_URL")
    openai_timeout_s: float = Field(10.0, alias="OPENAI_TIMEOUT_S", gt=0, le=60)
    realtime_model: str = Field("gpt-realtime", alias="REALTIME_MODEL", min_length=1)
    realtime_voice: str = Field("marin", alias="REALTIME_VOICE", min_length=1)
    transcription_model: str = Field("gpt-4o-mini-transcribe", alias="TRANSCRIPTION_MODEL")
    audio_format: Literal["pcm16", "pcmu"] = Field("pcm16", alias="AUDIO_FORMAT")
    turn_detection: Literal["server_vad", "semantic_vad"] = Field("server_vad", alias="TURN_DETECTION")
    vad_threshold: float = Field(0.5, alias="VAD_THRESHOLD", ge=0.0, le=1.0)
    vad_prefix_padding_ms: int = Field(300, alias="VAD_PREFIX_PADDING_MS", ge=0, le=5000)
    vad_silence_duration_ms: int = Field(500, alias="VAD_SILENCE_DURATION_MS", ge=100, le=10000)

    host: str = Field("0.0.0.0", alias="HOST")
    port: int = Field(5052, alias="PORT", ge=1, le=65535)
    public_url: str | None = Field(None, alias="PUBLIC_URL")
    cors_origins: tuple[str, ...] = Field((), alias="CORS_ORIGINS")
    session_rate_limit_per_minute: int = Field(10, alias="SESSION_RATE_LIMIT_PER_MINUTE", ge=1)
    assistant_tools_rate_limit_per_minute: int = Field(
        60, alias="ASSISTANT_TOOLS_RATE_LIMIT_PER_MINUTE", ge=1
    )
    stream_token_ttl_s: int = Field(120, alias="STREAM_TOKEN_TTL_S", ge=10, le=3600)
    stream_signing_key: str | None = Field(None, alias="STREAM_SIGNING_KEY")
    # Off by default: many proxies and tunnels strip X-Twilio-Signature from the upgrade request,
    # and the stream token already binds a stream to its signed call.
    require_upgrade_signature: bool = Field(False, alias="REQUIRE_UPGRADE_SIGNATURE")

    twilio_account_sid: str | None = Field(None, alias="TWILIO_ACCOUNT_SID")
    twilio_auth_token: str | None = Field(None, alias="TWILIO_AUTH_TOKEN")
    twilio_from_number: str | None = Field(None, alias="TWILIO_FROM_NUMBER")
    twilio_api_base: str = Field("https://api.twilio.com", alias="TWILIO_API_BASE")
    twilio_timeout_s: float = Field(10.0, alias="TWILIO_TIMEOUT_S", gt=0, le=60)
    store_phone_number: str | None = Field(None, alias="STORE_PHONE_NUMBER")
    transfer_dtmf_key: str = Field("0", alias="TRANSFER_DTMF_KEY", pattern=r"^[0-9*#]$")
    sms_include_picture: bool = Field(False, alias="SMS_INCLUDE_PICTURE")

    webhook_url: str | None = Field(None, alias="WEBHOOK_URL")
    webhook_secret: str | None = Field(None, alias="WEBHOOK_SECRET")
    webhook_retry_schedule_s: tuple[float, ...] = Field(
        DEFAULT_WEBHOOK_RETRY_SCHEDULE_S, alias="WEBHOOK_RETRY_SCHEDULE_S"
    )
    webhook_timeout_s: float = Field(15.0, alias="WEBHOOK_TIMEOUT_S", gt=0, le=60)

    catalog_path: Path = Field(SAMPLE_CATALOG_PATH, alias="CATALOG_PATH")
    stores_path: Path | None = Field(None, alias="STORES_PATH")
    store_language: Literal["en", "es", "auto"] = Field("auto", alias="STORE_LANGUAGE")
    media_base_url: str = Field(DEFAULT_MEDIA_BASE_URL, alias="MEDIA_BASE_URL")
    database_path: Path = Field(Path("voicebot.sqlite3"), alias="DATABASE_PATH")
    database_url: str | None = Field(None, alias="DATABASE_URL")
    outbox_retention_days: float = Field(30, alias="OUTBOX_RETENTION_DAYS", gt=0)
    web_concurrency: int = Field(1, alias="WEB_CONCURRENCY", ge=1, le=256)

    # 0 turns the idle prompt (and with it the idle hang-up) off.
    idle_prompt_s: float = Field(10.0, alias="IDLE_PROMPT_S", ge=0, le=600)
    idle_hangup_s: float = Field(10.0, alias="IDLE_HANGUP_S", gt=0, le=600)

    # US dollars per million tokens: OpenAI's published gpt-realtime prices at the time of writing.
    price_text_input_usd_per_1m: float = _price(4.0, "PRICE_TEXT_INPUT_USD_PER_1M")
    price_text_cached_usd_per_1m: float = _price(0.4, "PRICE_TEXT_CACHED_USD_PER_1M")
    price_text_output_usd_per_1m: float = _price(16.0, "PRICE_TEXT_OUTPUT_USD_PER_1M")
    price_audio_input_usd_per_1m: float = _price(32.0, "PRICE_AUDIO_INPUT_USD_PER_1M")
    price_audio_cached_usd_per_1m: float = _price(0.4, "PRICE_AUDIO_CACHED_USD_PER_1M")
    price_audio_output_usd_per_1m: float = _price(64.0, "PRICE_AUDIO_OUTPUT_USD_PER_1M")

    metrics_token: str | None = Field(None, alias="METRICS_TOKEN", min_length=16)
    console_password: str | None = Field(None, alias="CONSOLE_PASSWORD", min_length=12)

    realtime_reconnect_timeout_s: float = Field(10.0, alias="REALTIME_RECONNECT_TIMEOUT_S", gt=0)
    realtime_session_max_s: float = Field(55 * 60, alias="REALTIME_SESSION_MAX_S", gt=60)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", alias="LOG_LEVEL")
    log_format: Literal["json", "text"] = Field("json", alias="LOG_FORMAT")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            origins = tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())
            if "*" in origins:
                raise ValueError("'*' is not allowed: list the browser origins explicitly")
            for origin in origins:
                parts = urlsplit(origin)
                if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                    raise ValueError(f"{origin!r} is not an origin like https://shop.example.com")
            return origins
        return value

    @field_validator("webhook_retry_schedule_s", mode="before")
    @classmethod
    def _split_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(float(v) for v in value.split(",") if v.strip())
        return value

    @field_validator("webhook_retry_schedule_s")
    @classmethod
    def _check_schedule(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(v < 0 for v in value):
            raise ValueError("a comma-separated list of non-negative seconds, e.g. 5,300,1800")
        return value

    @field_validator("openai_realtime_url")
    @classmethod
    def _check_realtime_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            raise ValueError("must be a ws:// or wss:// URL")
        if parts.query:
            raise ValueError("must have no query string: the bot appends ?model=REALTIME_MODEL")
        return value.rstrip("/")

    @field_validator("openai_base_url", "twilio_api_base", "media_base_url")
    @classmethod
    def _check_http_url(cls, value: str) -> str:
        return check_http_url(value)

    @field_validator("public_url", "webhook_url")
    @classmethod
    def _check_optional_http_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value).rstrip("/")

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: str | None) -> str | None:
        return None if value is None else check_webhook_secret(value)

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres") or not parts.netloc:
            raise ValueError("must be a postgresql://user:password@host:port/database URL")
        return value

    @field_validator("store_phone_number", "twilio_from_number")
    @classmethod
    def _check_e164(cls, value: str | None) -> str | None:
        return None if value is None else check_e164(value)

    @model_validator(mode="after")
    def _check_upgrade_signature(self) -> Settings:
        if self.require_upgrade_signature and not self.twilio_auth_token:
            raise ValueError(
                "REQUIRE_UPGRADE_SIGNATURE needs TWILIO_AUTH_TOKEN: without it no signature can be checked"
            )
        return self

    @property
    def openai_enabled(self) -> bool:
        return bool(self.openai_api_key)

    @property
    def twilio_enabled(self) -> bool:
        return bool(self.twilio_account_sid and self.twilio_auth_token)

    @property
    def sms_enabled(self) -> bool:
        return self.twilio_enabled and bool(self.twilio_from_number)

    @property
    def webhook_enabled(self) -> bool:
        return bool(self.webhook_url and self.webhook_secret)

    @property
    def realtime_connect_url(self) -> str:
        return f"{self.openai_realtime_url}?model={self.realtime_model}"

    def features(self) -> dict[str, bool]:
        """Which optional features are on, for /healthz and the start-up log."""
        return {
            "realtime": self.openai_enabled,
            "twilio_signature_check": self.twilio_enabled,
            "sms": self.sms_enabled,
            "call_control": self.twilio_enabled,
            "webhook": self.webhook_enabled,
            "transfer": self.twilio_enabled and self.store_phone_number is not None,
        }

    def disabled_features(self) -> dict[str, str]:
        """Feature name -> the one log line that explains why it is off, naming what is unset."""
        sid = ("TWILIO_ACCOUNT_SID", self.twilio_account_sid)
        token = ("TWILIO_AUTH_TOKEN", self.twilio_auth_token)
        reasons = {
            "realtime": (
                f"{_unset(('OPENAI_API_KEY', self.openai_api_key))}: "
                "calls get the fallback TwiML, /session answers 503"
            ),
            "twilio_signature_check": (
                f"{_unset(sid, token)}: Twilio's requests cannot be verified and are refused (403)"
            ),
            "sms": (
                f"{_unset(sid, token, ('TWILIO_FROM_NUMBER', self.twilio_from_number))}: "
                "product details are not texted"
            ),
            "call_control": f"{_unset(sid, token)}: calls cannot be transferred or redirected",
            "webhook": (
                f"{_unset(('WEBHOOK_URL', self.webhook_url), ('WEBHOOK_SECRET', self.webhook_secret))}: "
                "no call-center webhooks are sent"
            ),
            "transfer": (
                f"{_unset(sid, token, ('STORE_PHONE_NUMBER', self.store_phone_number))}: "
                "the bot cannot transfer callers to a person"
            ),
        }
        return {name: reasons[name] for name, on in self.features().items() if not on}


def _unset(*settings: tuple[str, str | None]) -> str:
    """'A is not set' or 'A and B are not set', naming only the variables without a value."""
    names = [name for name, value in settings if not value]
    return " and ".join(names) + (" is not set" if len(names) == 1 else " are not set")


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse KEY=VALUE lines (comments, blank lines, `export` and quotes allowed)."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def load_settings(
    environ: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")
) -> Settings:
    """Settings from `environ` (default: the process environment) over an optional .env file."""
    source: dict[str, str] = read_dotenv(dotenv) if dotenv is not None else {}
    source.update(os.environ if environ is None else environ)
    if not source.get("OPENAI_API_KEY") and source.get("OPENAI"):
        source["OPENAI_API_KEY"] = source["OPENAI"]
    cleaned = {key: value for key, value in source.items() if value != ""}
    try:
        return Settings.model_validate(cleaned)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            if not error["loc"]:
                lines.append(error["msg"].removeprefix("Value error, "))
                continue
            name = str(error["loc"][0])
            shown = cleaned.get(name, "")
            secret = any(word in name for word in SECRET_WORDS) or name == "DATABASE_URL"
            value = "" if secret else f" (got {shown!r})"
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{name}: {message}{value}")
        if len(lines) == 1:
            raise SettingsError(f"invalid configuration: {lines[0]}") from None
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None
