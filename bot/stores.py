"""Which store a call belongs to: one deployment answers every number of a chain of stores.

`STORES_PATH` (JSON or TOML) maps the numbers callers dial (Twilio's `To`) to stores, each with
its name, language, greeting and notes, catalog, numbers for transfers and texts, call center,
voice and opening hours. A number not listed, or no file at all, gets the default store: the
deployment's own settings, exactly as without stores.

The file is checked at start-up (one line per bad store, and start-up stops) and watched while
serving: an edit that checks out is swapped in whole for the calls that come next, a bad one is
logged once and the last good file keeps serving. A call keeps the `Store` it started with.
Catalogs are loaded once per file (stores sharing a file share it) and each reloads on its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import re
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, time
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bot.catalog import Catalog, CatalogError
from bot.settings import (
    Settings,
    check_e164,
    check_http_url,
    check_webhook_secret,
)
from bot.words import Language, SmsWords, Words, en, words_for

log = logging.getLogger(__name__)

DEFAULT_STORE_ID = "default"
STORE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
SPAN = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
MAX_SPANS_PER_DAY = 4
# How often the stores file and every catalog are looked at for changes.
RELOAD_INTERVAL_S = 5.0


class StoresError(Exception):
    """STORES_PATH cannot be used: one line per problem, each naming the store and the field."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"STORES_PATH {path}: {problem}" for problem in problems))


# --- opening hours ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Span:
    """Open from `start` until just before `end` (`end` None: until midnight)."""

    start: time
    end: time | None

    def holds(self, moment: time) -> bool:
        return self.start <= moment and (self.end is None or moment < self.end)

    def text(self, span_words: str) -> str:
        end = "24:00" if self.end is None else f"{self.end:%H:%M}"
        return span_words.format(start=f"{self.start:%H:%M}", end=end)


@dataclass(frozen=True, slots=True)
class OpeningHours:
    """A weekly schedule in the store's time zone; a day without spans is closed."""

    timezone: str
    week: tuple[tuple[Span, ...], ...]

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def is_open(self, now: datetime) -> bool:
        local = now.astimezone(self.zone)
        return any(span.holds(local.time()) for span in self.week[local.weekday()])

    def describe(self, words: Words, now: datetime) -> str:
        """The schedule and whether the store is open now, as the model is told them."""
        hours = words.hours
        days = [
            f"{hours.days[n]} "
            + (", ".join(span.text(hours.span) for span in spans) if spans else hours.closed_day)
            for n, spans in enumerate(self.week)
        ]
        return f"{hours.schedule.format(days='; '.join(days))} {self._now_text(words, now)}"

    def _now_text(self, words: Words, now: datetime) -> str:
        hours = words.hours
        local = now.astimezone(self.zone)
        for span in self.week[local.weekday()]:
            if span.holds(local.time()):
                until = "24:00" if span.end is None else f"{span.end:%H:%M}"
                return hours.open_now.format(time=until)
        opening = self._next_opening(local)
        if opening is None:
            return hours.closed_until_unknown
        day, start = opening
        return hours.closed_now.format(day=hours.days[day], time=f"{start:%H:%M}")

    def _next_opening(self, local: datetime) -> tuple[int, time] | None:
        for ahead in range(8):
            day = (local.weekday() + ahead) % 7
            for span in self.week[day]:
                if ahead or span.start > local.time():
                    return day, span.start
        return None


def parse_span(text: str) -> Span:
    """'09:00-18:00' (end '24:00' allowed); raises ValueError with what a span looks like."""
    found = SPAN.match(text)
    if found is None:
        raise ValueError(f"{text!r} is not a span like '09:00-18:00'")
    start_h, start_m, end_h, end_m = (int(group) for group in found.groups())
    if start_h > 23 or start_m > 59 or end_m > 59 or end_h > 24 or (end_h == 24 and end_m):
        raise ValueError(f"{text!r} is not a time of day")
    start = time(start_h, start_m)
    end = None if end_h == 24 else time(end_h, end_m)
    if end is not None and end <= start:
        raise ValueError(f"{text!r} ends before it starts (a span cannot cross midnight: split it)")
    return Span(start, end)


# --- the file's format --------------------------------------------------------------------


class HoursConfig(BaseModel):
    """`hours` of a store: a time zone and each day's spans ('closed', one span, or a list)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timezone: str
    monday: str | list[str] = "closed"
    tuesday: str | list[str] = "closed"
    wednesday: str | list[str] = "closed"
    thursday: str | list[str] = "closed"
    friday: str | list[str] = "closed"
    saturday: str | list[str] = "closed"
    sunday: str | list[str] = "closed"

    @field_validator("timezone")
    @classmethod
    def _check_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a time zone like 'America/New_York'") from None
        return value

    @field_validator(*DAYS)
    @classmethod
    def _check_day(cls, value: str | list[str]) -> str | list[str]:
        _spans(value)
        return value

    def opening_hours(self) -> OpeningHours:
        return OpeningHours(self.timezone, tuple(_spans(getattr(self, day)) for day in DAYS))


def _spans(value: str | list[str]) -> tuple[Span, ...]:
    texts = [value] if isinstance(value, str) else value
    if [t.strip().lower() for t in texts] in (["closed"], []):
        return ()
    if len(texts) > MAX_SPANS_PER_DAY:
        raise ValueError(f"at most {MAX_SPANS_PER_DAY} spans a day")
    spans = sorted((parse_span(text) for text in texts), key=lambda span: span.start)
    for before, after in itertools.pairwise(spans):
        if before.end is None or after.start < before.end:
            raise ValueError("spans overlap")
    return tuple(spans)


PhoneNumber = Annotated[str, AfterValidator(check_e164)]


class StoreConfig(BaseModel):
    """One store in STORES_PATH. Unset numbers, catalog, voice and call center: the deployment's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=100)
    numbers: list[PhoneNumber] = Field(min_length=1)
    language: Language = "en"
    voice: str | None = Field(None, min_length=1)
    greeting: str | None = Field(None, min_length=1, max_length=500)
    instructions: str | None = Field(None, max_length=4000)
    catalog: Path | None = None
    transfer_number: PhoneNumber | None = None
    after_hours_transfer: PhoneNumber | None = None
    sms_from: PhoneNumber | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_secret_env: str | None = Field(None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    hours: HoursConfig | None = None

    @field_validator("webhook_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value).rstrip("/")

    @field_validator("webhook_secret")
    @classmethod
    def _check_secret(cls, value: str | None) -> str | None:
        return None if value is None else check_webhook_secret(value)

    @model_validator(mode="after")
    def _check_call_center(self) -> StoreConfig:
        if self.webhook_secret and self.webhook_secret_env:
            raise ValueError("give webhook_secret or webhook_secret_env, not both")
        has_secret = self.webhook_secret or self.webhook_secret_env
        if bool(self.webhook_url) != bool(has_secret):
            raise ValueError("webhook_url and its secret (webhook_secret or webhook_secret_env) go together")
        if self.after_hours_transfer and self.hours is None:
            raise ValueError("after_hours_transfer needs hours")
        return self


class StoresFile(BaseModel):
    """The whole file: `{"stores": {"<id>": {...}}}`, or `[stores.<id>]` tables in TOML."""

    model_config = ConfigDict(extra="forbid")

    stores: dict[str, Any]


# --- a store ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Destination:
    """Where one message of a store goes, as the outbox rows record it.

    None stands for the deployment's own setting, read by the relay when it delivers (the
    default store's messages, and rows queued before stores existed): `store_id` the default
    store, `sms_from` TWILIO_FROM_NUMBER, `webhook_url` WEBHOOK_URL. `webhooks`: whether a
    webhook goes at all. The webhook secret is never in a row: the relay asks `Stores` for the
    store's when it signs.
    """

    store_id: str | None = None
    sms_from: str | None = None
    webhook_url: str | None = None
    webhooks: bool = True
    sms: SmsWords = en.SMS


@dataclass(frozen=True, slots=True)
class Store:
    """One store as a call sees it, fixed for the call (the catalog's products still reload).

    `webhook_secret` stays in memory: outbox rows name the store, and the relay asks for it.
    """

    id: str
    name: str | None
    language: Language
    voice: str
    catalog: Catalog
    numbers: tuple[str, ...] = ()
    greeting: str | None = None
    notes: str | None = None
    transfer_number: PhoneNumber | None = None
    after_hours_transfer: PhoneNumber | None = None
    sms_from: PhoneNumber | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    hours: OpeningHours | None = None

    @property
    def words(self) -> Words:
        return words_for(self.language)

    @property
    def transcription_language(self) -> str | None:
        """The hint for the transcription model; None lets it detect the caller's language."""
        return None if self.language == "auto" else self.words.code

    @property
    def webhook_enabled(self) -> bool:
        return bool(self.webhook_url and self.webhook_secret)

    def is_open(self, now: datetime) -> bool:
        return self.hours is None or self.hours.is_open(now)

    def transfer_to(self, now: datetime) -> str | None:
        """Where a caller who asks for a person goes now: the store, its after-hours line, or nobody."""
        return self.transfer_number if self.is_open(now) else self.after_hours_transfer

    def can_ever_transfer(self) -> bool:
        return bool(self.transfer_number or self.after_hours_transfer)

    def destination(self, sms: SmsWords | None = None) -> Destination:
        """Where this store's messages go; the default store's resolve at delivery (see Destination)."""
        words = sms or self.words.sms
        if self.id == DEFAULT_STORE_ID:
            return Destination(webhooks=self.webhook_enabled, sms=words)
        return Destination(self.id, self.sms_from, self.webhook_url, self.webhook_enabled, words)

    def hours_note(self, now: datetime) -> str | None:
        """What the model is told about the opening hours, including whether the store is open now."""
        if self.hours is None:
            return None
        words = self.words.hours
        after = words.after_hours_transfer if self.after_hours_transfer else words.no_transfer_after_hours
        return f"{self.hours.describe(self.words, now)} {after}"


def default_store(settings: Settings, catalog: Catalog) -> Store:
    """The store a call to a number not in STORES_PATH gets: today's settings."""
    return Store(
        id=DEFAULT_STORE_ID,
        name=None,
        language=settings.store_language,
        voice=settings.realtime_voice,
        catalog=catalog,
        transfer_number=settings.store_phone_number,
        sms_from=settings.twilio_from_number,
        webhook_url=settings.webhook_url,
        webhook_secret=settings.webhook_secret,
    )


# --- the directory of stores --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Directory:
    """One consistent view of the file: swapped whole, so a call never sees half an edit."""

    default: Store
    by_id: Mapping[str, Store]
    by_number: Mapping[str, Store]
    catalogs: Mapping[Path, Catalog]


@dataclass(frozen=True, slots=True)
class _FileState:
    mtime_ns: int
    size: int


class Stores:
    """Every store of the deployment, by dialled number and by id; reloadable while serving."""

    def __init__(
        self,
        settings: Settings,
        directory: _Directory,
        *,
        state: _FileState | None = None,
        digest: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.path = settings.stores_path
        self._directory = directory
        self._state = state
        self._digest = digest
        self._environ = os.environ if environ is None else environ
        self._reload_lock = threading.Lock()
        self._last_failure: tuple[_FileState | None, str] | None = None

    @classmethod
    def load(cls, settings: Settings, *, environ: Mapping[str, str] | None = None) -> Stores:
        """Load CATALOG_PATH and STORES_PATH with every catalog it names.

        Raises CatalogError for CATALOG_PATH and StoresError (one line per bad store) for the rest.
        `environ` (default: the process's) holds the secrets `webhook_secret_env` names.
        """
        environ = os.environ if environ is None else environ
        default_catalog = Catalog.load(settings.catalog_path)
        catalogs = {settings.catalog_path.resolve(): default_catalog}
        default = default_store(settings, default_catalog)
        path = settings.stores_path
        if path is None:
            only_default = _Directory(default, {DEFAULT_STORE_ID: default}, {}, catalogs)
            return cls(settings, only_default, environ=environ)
        try:
            data, state = _read(path)
        except OSError as exc:
            raise StoresError(path, [f"cannot read: {exc.strerror or exc}"]) from None
        directory = build_directory(path, data, settings, default, catalogs, environ)
        stores = cls(
            settings, directory, state=state, digest=hashlib.sha256(data).hexdigest(), environ=environ
        )
        log.info("stores loaded", extra={"path": str(path), "stores": len(directory.by_id) - 1})
        return stores

    @property
    def default(self) -> Store:
        return self._directory.default

    def all(self) -> list[Store]:
        """Every store, the default first."""
        return list(self._directory.by_id.values())

    def for_number(self, dialled: str) -> Store:
        """The store whose number the caller dialled; the default store for any other."""
        return self._directory.by_number.get(dialled, self._directory.default)

    def get(self, store_id: str) -> Store | None:
        return self._directory.by_id.get(store_id)

    def webhook_secret(self, store_id: str | None) -> str | None:
        """The secret that signs a store's webhooks now (None: the store is gone or has none)."""
        store = self._directory.by_id.get(store_id or DEFAULT_STORE_ID)
        return store.webhook_secret if store is not None else None

    def reload_if_changed(self) -> bool:
        """Swap in STORES_PATH's new contents if the file changed and checks out; True if swapped.

        Blocking (reads files, loads new catalogs): call it from a worker thread. A bad edit
        keeps the last good stores serving and is logged once per change.
        """
        path = self.path
        if path is None:
            return False
        with self._reload_lock:
            try:
                before = _stat(path)
                if before == self._state:
                    return False
                data, after = _read(path)
            except OSError as exc:
                self._reject(None, StoresError(path, [f"cannot read: {exc.strerror or exc}"]))
                return False
            if before != after:
                return False  # still being written: look again on the next poll
            digest = hashlib.sha256(data).hexdigest()
            if digest == self._digest:
                self._state = after
                return False
            current = self._directory
            try:
                directory = build_directory(
                    path, data, self.settings, current.default, current.catalogs, self._environ
                )
            except StoresError as exc:
                self._reject(after, exc)
                return False
            self._directory = directory
            self._state, self._digest, self._last_failure = after, digest, None
            log.info("stores reloaded", extra={"path": str(path), "stores": len(directory.by_id) - 1})
            return True

    def _reject(self, state: _FileState | None, exc: StoresError) -> None:
        failure = (state, str(exc))
        if failure != self._last_failure:
            log.error(
                "stores reload rejected, still serving the last good stores: %s",
                "; ".join(exc.problems),
                extra={"path": str(exc.path)},
            )
        self._last_failure = failure

    def reload_catalogs(self) -> None:
        """Reload each catalog whose file changed (blocking: from a worker thread)."""
        for catalog in list(self._directory.catalogs.values()):
            catalog.reload_if_changed()

    async def watch(self, interval_s: float = RELOAD_INTERVAL_S) -> None:
        """Poll STORES_PATH and every catalog every `interval_s`, reloading what changed."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.reload_if_changed)
                await asyncio.to_thread(self.reload_catalogs)
            except Exception:
                log.exception("stores or catalog reload failed unexpectedly")


def parse_stores_file(path: Path, data: bytes) -> dict[str, Any]:
    """The file's `stores` table, from JSON or (by the `.toml` suffix) TOML."""
    try:
        if path.suffix.lower() == ".toml":
            document: Any = tomllib.loads(data.decode("utf-8"))
        else:
            document = json.loads(data)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise StoresError(path, [f"not valid {kind}: {exc}"]) from None
    try:
        stores = StoresFile.model_validate(document).stores
    except ValidationError:
        raise StoresError(
            path, ['expected {"stores": {"<store id>": {...}}} (or [stores.<store id>] tables in TOML)']
        ) from None
    if not stores:
        raise StoresError(path, ["the file lists no store"])
    return stores


def build_directory(
    path: Path,
    data: bytes,
    settings: Settings,
    default: Store,
    loaded: Mapping[Path, Catalog],
    environ: Mapping[str, str],
) -> _Directory:
    """Every store of the file, checked: raises StoresError with one line per bad store.

    Catalogs already in `loaded` are reused as they are; new paths are loaded once each.
    """
    entries = parse_stores_file(path, data)
    problems: list[str] = []
    configs: dict[str, StoreConfig] = {}
    for store_id, raw in entries.items():
        if not STORE_ID.match(store_id) or store_id == DEFAULT_STORE_ID:
            problems.append(
                f"store {store_id!r}: an id is 1-64 lower-case letters, digits, '-' or '_' "
                f"(and not {DEFAULT_STORE_ID!r})"
            )
            continue
        try:
            configs[store_id] = StoreConfig.model_validate(raw)
        except ValidationError as exc:
            problems.append(f"store {store_id!r}: " + "; ".join(_field_problem(err) for err in exc.errors()))
    owners: dict[str, str] = {}
    for store_id, config in configs.items():
        for number in config.numbers:
            if number in owners and owners[number] != store_id:
                problems.append(f"store {store_id!r}: number {number} is also store {owners[number]!r}'s")
            owners.setdefault(number, store_id)
    catalogs = {settings.catalog_path.resolve(): default.catalog}
    stores: dict[str, Store] = {DEFAULT_STORE_ID: default}
    for store_id, config in configs.items():
        try:
            stores[store_id] = _store(store_id, config, path, settings, loaded, catalogs, environ)
        except (CatalogError, ValueError) as exc:
            problems.append(f"store {store_id!r}: {exc}")
    if problems:
        raise StoresError(path, problems)
    by_number = {number: store for store in stores.values() for number in store.numbers}
    return _Directory(default, stores, by_number, catalogs)


def _store(
    store_id: str,
    config: StoreConfig,
    path: Path,
    settings: Settings,
    loaded: Mapping[Path, Catalog],
    catalogs: dict[Path, Catalog],
    environ: Mapping[str, str],
) -> Store:
    catalog_path = settings.catalog_path if config.catalog is None else path.parent / config.catalog
    key = catalog_path.resolve()
    catalog = catalogs.get(key) or loaded.get(key)
    if catalog is None:
        try:
            catalog = Catalog.load(catalog_path)
        except CatalogError as exc:
            raise ValueError(f"catalog: {exc.reason} ({catalog_path})") from None
    catalogs[key] = catalog
    webhook_url, secret = config.webhook_url, config.webhook_secret
    if config.webhook_secret_env:
        value = environ.get(config.webhook_secret_env, "")
        if not value:
            raise ValueError(f"webhook_secret_env: {config.webhook_secret_env} is not set")
        try:
            secret = check_webhook_secret(value)
        except ValueError as exc:
            raise ValueError(f"webhook_secret_env: {config.webhook_secret_env}: {exc}") from None
    if webhook_url is None:
        webhook_url, secret = settings.webhook_url, settings.webhook_secret
    return Store(
        id=store_id,
        name=config.name,
        language=config.language,
        voice=config.voice or settings.realtime_voice,
        catalog=catalog,
        numbers=tuple(config.numbers),
        greeting=config.greeting,
        notes=config.instructions,
        transfer_number=config.transfer_number or settings.store_phone_number,
        after_hours_transfer=config.after_hours_transfer,
        sms_from=config.sms_from or settings.twilio_from_number,
        webhook_url=webhook_url,
        webhook_secret=secret,
        hours=config.hours.opening_hours() if config.hours is not None else None,
    )


def _field_problem(error: Mapping[str, Any]) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "store"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "not a store setting"
    return f"{where}: {message}"


def _stat(path: Path) -> _FileState:
    st = path.stat()
    return _FileState(st.st_mtime_ns, st.st_size)


def _read(path: Path) -> tuple[bytes, _FileState]:
    data = path.read_bytes()
    return data, _stat(path)


def local_now() -> datetime:
    """The wall clock as an aware datetime (opening hours compare it in each store's zone)."""
    return datetime.now().astimezone()
