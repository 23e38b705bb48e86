"""Custom events: validation (pydantic) and recording through the current app's telemetry."""
import json
import math
from typing import Annotated, Dict, Optional, Union

from pydantic_core import PydanticCustomError
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError, field_validator

import telemetry

MAX_NAME = 512
MAX_KEY = 150
MAX_VALUE = 8192
MAX_PROPERTIES_BYTES = 60 * 1024  # Application Insights accepts 64 KB per item; leave room for the envelope.
RESERVED_EVENT_NAMES = frozenset({"UserLogin", "CrudActivity"})
RESERVED_PROPERTIES = frozenset({"event_id"})

PropertyKey = Annotated[str, Field(min_length=1, max_length=MAX_KEY)]
PropertyValue = Union[StrictBool, StrictInt, StrictFloat, Annotated[StrictStr, Field(max_length=MAX_VALUE)], None]


class Event(BaseModel):
    """A custom event as the service accepts it: a name and flat scalar details."""

    model_config = ConfigDict(extra="forbid")

    event_name: Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME)]
    details: Dict[PropertyKey, PropertyValue] = Field(default_factory=dict)

    @field_validator("event_name")
    @classmethod
    def _name_not_blank(cls, value):
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("details", mode="before")
    @classmethod
    def _details_scalars(cls, value):
        """Name the key and the rule before pydantic's union errors (which name neither clearly)."""
        if not isinstance(value, dict):
            raise ValueError("must be an object")
        for key, item in value.items():
            if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY:
                raise ValueError(f"keys must be 1 to {MAX_KEY} characters, got {len(str(key))}")
            if isinstance(item, (dict, list)):
                raise PydanticCustomError("nested_value", "must be a string, number, boolean or null, not nested",
                                          {"key": key})
            if isinstance(item, str) and len(item) > MAX_VALUE:
                raise PydanticCustomError("value_too_long", "must be at most {limit} characters",
                                          {"key": key, "limit": MAX_VALUE})
        return value

    @field_validator("details")
    @classmethod
    def _details_fit(cls, value):
        clash = RESERVED_PROPERTIES.intersection(value)
        if clash:
            raise ValueError(f"key {sorted(clash)[0]!r} is reserved")
        for key, item in value.items():
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"value of {key!r} must be a finite number")
        if len(json.dumps(value, ensure_ascii=False).encode()) > MAX_PROPERTIES_BYTES:
            raise ValueError(f"must be at most {MAX_PROPERTIES_BYTES} bytes as JSON")
        return value


class PublicEvent(Event):
    """A custom event posted by a client: the server's audit names are refused."""

    @field_validator("event_name")
    @classmethod
    def _not_reserved(cls, value):
        if value in RESERVED_EVENT_NAMES:
            raise ValueError(f"{value!r} is reserved for events the server emits")
        return value


def stringify(value):
    """Render one scalar as Application Insights expects: a string (JSON spelling for non-strings)."""
    return value if isinstance(value, str) else json.dumps(value)


def describe_error(exc):
    """One line naming the first invalid field of a pydantic ValidationError."""
    err = exc.errors()[0]
    path = [str(p) for p in err["loc"] if p != "[key]"] + [str((err.get("ctx") or {}).get("key", ""))]
    loc = ".".join(p for p in path if p) or "body"
    return loc, f"{loc}: {err['msg'].removeprefix('Value error, ')}"


def record_event(name, properties, user_id=""):
    """Send an already-validated event through the telemetry pipeline; returns its event_id."""
    props = {k: stringify(v) for k, v in properties.items()}
    rec = telemetry.EventRecord(name=name, properties=props, user_id=user_id or "",
                                operation_id=telemetry.current_operation_id())
    rec.properties["event_id"] = rec.event_id
    return telemetry.current().track_event(rec)


def log_event(event_name, details=None):
    """Validate and record one custom event; returns its event_id, raises ValueError when invalid.

    The audit names UserLogin and CrudActivity are refused: use usage_tracking for those.
    """
    try:
        event = PublicEvent(event_name=event_name, details={} if details is None else details)
    except ValidationError as exc:
        raise ValueError(describe_error(exc)[1]) from None
    return record_event(event.event_name, event.details)
