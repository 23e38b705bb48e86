"""Custom events: validation (pydantic) and recording through the current app's telemetry."""
import json
import math
import re
import time
from datetime import datetime
from typing import Annotated, Dict, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      ValidationError, ValidationInfo, field_validator)
from pydantic_core import PydanticCustomError

import telemetry
from security import redact_strings

MAX_NAME = 512
MAX_KEY = 150
MAX_VALUE = 8192
MAX_PROPERTIES_BYTES = 60 * 1024  # Application Insights accepts 64 KB per item; leave room for the envelope.
RESERVED_EVENT_NAMES = ("UserLogin", "CrudActivity")
RESERVED_PROPERTIES = ("event_id",)
# Names, keys and client ids: no control characters and no invisible or direction-changing ones
# (zero-width, bidirectional overrides and isolates, BOM, NEL, line and paragraph separators:
# U+202E makes "\u202egnp.exe" display as "exe.png"); names need one visible character. Values:
# no control characters except tab, newline and carriage return. These patterns are the
# validation *and* the OpenAPI schema.
_HIDDEN = r"\x00-\x1f\x7f\u0085\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060-\u2069\ufeff"
NAME_PATTERN = rf"^[^{_HIDDEN}]*[^\s{_HIDDEN}][^{_HIDDEN}]*$"
KEY_PATTERN = rf"^[^{_HIDDEN}]+$"
VALUE_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
# A random (version 4) UUID, as crypto.randomUUID() makes: never the nil UUID, which many clients
# sending by mistake would collapse into one event.
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-4[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}$"
_KEY_RE = re.compile(KEY_PATTERN)
_HIDDEN_RE = re.compile(f"[{_HIDDEN}]")
HIDDEN_MESSAGE = "must not contain control, invisible or direction-changing characters"
MAX_CLIENT_ID = 128
# The client's clock is believed from 48 hours back (offline queues) to 5 minutes ahead (skew).
TIMESTAMP_PAST_S = 48 * 3600
TIMESTAMP_FUTURE_S = 5 * 60
# A client clock within this of the server's is believed: shifting by sent_at would add the request's
# transit time to every timestamp (and reorder events sent in two batches).
CLOCK_TOLERANCE_S = 2.0
SENT_AT_DOC = ("When the client sent this request, ISO 8601 with a time zone, by its own clock: the server "
               "shifts each timestamp by its own clock minus this (when they differ by more than 2 s), as "
               "Segment and PostHog do, so a client whose clock is wrong still records the right times")

PropertyValue = Union[StrictBool, StrictInt, StrictFloat,
                      Annotated[StrictStr, Field(max_length=MAX_VALUE, pattern=VALUE_PATTERN)], None]
_DETAILS_SCHEMA = {"propertyNames": {"minLength": 1, "maxLength": MAX_KEY, "pattern": KEY_PATTERN,
                                     "not": {"enum": list(RESERVED_PROPERTIES)}}}


class Event(BaseModel):
    """A custom event as the service accepts it: a name and flat scalar details."""

    model_config = ConfigDict(extra="forbid")

    event_name: Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME, pattern=NAME_PATTERN,
                                           description="Event name shown in customEvents")]
    details: Annotated[Dict[str, PropertyValue], Field(
        default_factory=dict, json_schema_extra=_DETAILS_SCHEMA,
        description="Flat properties; values are sent to Application Insights as strings")]

    @field_validator("event_name", mode="before")
    @classmethod
    def _name_is_visible(cls, value):
        """Name the rule instead of quoting the pattern; lone surrogates cannot be stored or sent."""
        if isinstance(value, str):
            if _HIDDEN_RE.search(value):
                raise ValueError(HIDDEN_MESSAGE)
            if not value.isascii():
                _require_utf8(value)
        return value

    @field_validator("details", mode="before")
    @classmethod
    def _details_scalars(cls, value):
        """Name the key and the rule before pydantic's union errors (which name neither clearly); and fit 64 KB."""
        if not isinstance(value, dict):
            raise ValueError("must be an object")
        size = 0  # a bound on the details as JSON: a character takes at most 6 bytes (\uXXXX)
        for key, item in value.items():
            if key not in _GOOD_KEYS:  # keys repeat from call to call: each is checked once
                _check_key(key)
            kind = item.__class__
            if kind is str:
                if len(item) > MAX_VALUE:
                    raise PydanticCustomError("value_too_long", "must be at most {limit} characters",
                                              {"key": key, "limit": MAX_VALUE})
                if not item.isascii():
                    _require_utf8(item)
                size += len(key) + len(item)
            elif kind is bool or item is None:
                size += len(key) + 5
            elif kind is dict or kind is list or isinstance(item, (dict, list)):
                raise PydanticCustomError("nested_value", "must be a string, number, boolean or null, not nested",
                                          {"key": key})
            elif isinstance(item, float):
                if not math.isfinite(item):
                    raise PydanticCustomError("not_finite", "must be a finite number", {"key": key})
                size += len(key) + 24  # the longest repr of a float
            else:  # int (any length), a str subclass, or a type pydantic refuses next
                size += len(key) + (len(repr(item)) if isinstance(item, int) else
                                    len(item) if isinstance(item, str) else 5)
        if (6 * size + 8 * len(value) > MAX_PROPERTIES_BYTES
                and len(json.dumps(value, ensure_ascii=False, default=str).encode()) > MAX_PROPERTIES_BYTES):
            raise ValueError(f"must be at most {MAX_PROPERTIES_BYTES} bytes as JSON")
        return value


class PublicEvent(Event):
    """A custom event posted by a client: the server's audit names are refused."""

    event_name: Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME, pattern=NAME_PATTERN,
                                           json_schema_extra={"not": {"enum": list(RESERVED_EVENT_NAMES)}},
                                           description="Event name; UserLogin and CrudActivity are reserved")]

    event_id: Annotated[Optional[StrictStr], Field(
        default=None, pattern=UUID_PATTERN,
        description="A client-made random (version 4) UUID: a retried send with the same id is stored once")]
    sent_at: Annotated[Optional[StrictStr], Field(default=None, max_length=64, description=SENT_AT_DOC)]
    timestamp: Annotated[Optional[StrictStr], Field(
        default=None, max_length=64,
        description="When it happened, ISO 8601 with a time zone, by the client's clock; once shifted by the "
                    "clock difference that sent_at shows, from 48 hours ago to 5 minutes ahead of the server")]
    anonymous_id: Annotated[Optional[StrictStr], Field(
        default=None, min_length=1, max_length=MAX_CLIENT_ID, pattern=KEY_PATTERN,
        description="The browser's anonymous visitor id (Application Insights' ai.user.id)")]
    session_id: Annotated[Optional[StrictStr], Field(
        default=None, min_length=1, max_length=MAX_CLIENT_ID, pattern=KEY_PATTERN,
        description="The visit's session id (ai.session.id)")]

    @field_validator("event_name")
    @classmethod
    def _not_reserved(cls, value):
        """Only the server emits the audit events."""
        if value in RESERVED_EVENT_NAMES:
            raise ValueError(f"{value!r} is reserved for events the server emits")
        return value

    @field_validator("anonymous_id", "session_id", mode="before")
    @classmethod
    def _id_is_visible(cls, value):
        """Client ids follow the key rule, with its message."""
        if isinstance(value, str) and _HIDDEN_RE.search(value):
            raise ValueError(HIDDEN_MESSAGE)
        return value

    @field_validator("sent_at")
    @classmethod
    def _sent_at_is_a_time(cls, value):
        """ISO 8601 with a zone (any value of the client's clock: it is what the skew is measured by)."""
        return optional_client_time(value)

    @field_validator("timestamp")
    @classmethod
    def _timestamp_in_range(cls, value, info: ValidationInfo):
        """ISO 8601 with a zone, within [now - 48 h, now + 5 min] once shifted by the client's clock skew."""
        if value is None:
            return None
        context = info.context or {}
        now = context.get("now") or time.time()
        skew = _clock_skew(info.data.get("sent_at"), now)
        when = parse_client_time(value).timestamp() + skew
        if not now - TIMESTAMP_PAST_S <= when <= now + TIMESTAMP_FUTURE_S:
            raise ValueError("must be within the last 48 hours and at most 5 minutes ahead of the server's clock"
                             " (after the correction by sent_at, when it is given)")
        return value

    def epoch(self):
        """The event's time as epoch seconds by the server's clock: the client's timestamp shifted by the skew
        its sent_at shows (a batch's items get the batch's), else None (now)."""
        if not self.timestamp:
            return None
        return parse_client_time(self.timestamp).timestamp() + _clock_skew(self.sent_at, time.time())


def parse_client_time(value):
    """The aware datetime of an ISO 8601 date and time with a zone; ValueError (for a 422) otherwise."""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("must be an ISO 8601 date and time, such as 2026-11-30T09:41:00.000Z") from None
    if when.tzinfo is None:
        raise ValueError("must include a time zone (Z or +hh:mm)")
    return when


def optional_client_time(value):
    """`value` when it is None or an ISO 8601 date and time with a zone; ValueError (a 422 naming the field) otherwise."""
    if value is not None:
        parse_client_time(value)
    return value


def _clock_skew(sent_at, now):
    """Seconds to add to a time of the client's clock to get the server's: now - sent_at, or 0 without sent_at
    or when the two clocks agree within CLOCK_TOLERANCE_S (what is left is the request's transit time)."""
    skew = now - datetime.fromisoformat(sent_at).timestamp() if sent_at else 0.0
    return skew if abs(skew) > CLOCK_TOLERANCE_S else 0.0


class SingleEvent(PublicEvent):
    """POST /event's body: one event, and the API key for clients that cannot set headers (beacons)."""

    api_key: Annotated[Optional[StrictStr], Field(
        default=None, max_length=1024, description="The API key, when the X-Api-Key header cannot be set")]


_GOOD_KEYS = set()  # detail keys that passed _check_key (bounded: cleared when it reaches _GOOD_KEYS_MAX)
_GOOD_KEYS_MAX = 4096


def _check_key(key):
    """Raise ValueError for a detail key that is not 1 to MAX_KEY visible characters, or is reserved; remember a good one."""
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY or _HIDDEN_RE.search(key):
        raise ValueError(f"keys must be 1 to {MAX_KEY} characters and {HIDDEN_MESSAGE}")
    if key in RESERVED_PROPERTIES:
        raise ValueError(f"key {key!r} is reserved")
    if not key.isascii():
        _require_utf8(key)
    if len(_GOOD_KEYS) >= _GOOD_KEYS_MAX:
        _GOOD_KEYS.clear()
    _GOOD_KEYS.add(key)


def _require_utf8(text):
    """Raise ValueError for text that cannot be encoded (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None


def describe_error(exc):
    """One line naming the first invalid field of a pydantic ValidationError."""
    err = exc.errors()[0]
    path = [str(p) for p in err["loc"] if p != "[key]"] + [str((err.get("ctx") or {}).get("key", ""))]
    loc = ".".join(p for p in path if p) or "body"
    return loc, f"{loc}: {err['msg'].removeprefix('Value error, ')}"


def record_event(name, properties, user_id="", strict=True, client=None):
    """Send an already-validated event to the current app's UsageMonitor; returns its event_id.

    `client` is the PublicEvent a client posted: its event_id, timestamp, anonymous and session
    ids go with the record. When the sink cannot take it: strict raises TelemetryUnavailable (a
    route answers 503), else None is returned (the monitor has counted and logged the failure).
    """
    monitor = telemetry.current_monitor()
    props = redact_strings(properties, monitor.settings.redact_keys)
    state = telemetry.current_request_state()
    if state is not None and user_id:  # the request is the user's too (ai.user.authUserId on RequestData)
        state.user_id = user_id
    rec = telemetry.EventRecord(name=name, properties=props, user_id=user_id or "",
                                operation_id=state.operation_id if state is not None else "")
    if client is not None:
        if client.event_id:
            rec.event_id, rec.client_event_id = client.event_id.lower(), True
        rec.timestamp = client.epoch() or rec.timestamp
        rec.anonymous_id, rec.session_id = client.anonymous_id or "", client.session_id or ""
    try:
        return monitor.track_event(rec)
    except telemetry.TelemetryUnavailable:
        if strict:
            raise
        return None


def log_event(event_name, details=None):
    """Validate and record one custom event; returns its event_id (None if not recorded), ValueError if invalid.

    The audit names UserLogin and CrudActivity are refused: use usage_tracking for those.
    """
    try:
        event = PublicEvent(event_name=event_name, details={} if details is None else details)
    except ValidationError as exc:
        raise ValueError(describe_error(exc)[1]) from None
    return record_event(event.event_name, event.details, strict=False)
