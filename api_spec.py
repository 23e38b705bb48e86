"""The HTTP contract: request validation and the OpenAPI document, both from the same pydantic models."""
import functools
import json
import re
from typing import Annotated, Any, Dict, List, Literal, Optional

from flask import request
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator
from pydantic.json_schema import models_json_schema

from logging_utils import SENT_AT_DOC, PublicEvent, describe_error, optional_client_time

_DAYS = re.compile(r"[0-9]{1,2}")


class ApiError(Exception):
    """An error answered as {"error": {"code", "message", "field"?}} with an HTTP status."""

    def __init__(self, status, code, message, field=None, headers=None, errors=None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.field, self.headers, self.errors = field, headers or {}, errors


# -- request models (the validation) ------------------------------------------------------
class UsageQuery(BaseModel):
    """Query string of GET /dashboard/usage."""

    model_config = ConfigDict(extra="ignore")

    days: Annotated[int, Field(ge=1, le=90, description="Days in the window, today included")] = 30

    @field_validator("days", mode="before")
    @classmethod
    def _digits_only(cls, value):
        """Only plain decimal digits: no sign, spaces, decimals or exponents."""
        if isinstance(value, str) and not _DAYS.fullmatch(value):
            raise ValueError("must be an integer from 1 to 90")
        return value


# -- response models (documentation and schemathesis' conformance checks) -------------------
class ItemError(BaseModel):
    """Why one item of a batch was refused."""

    index: int
    code: str
    message: str
    field: Optional[str] = None


class ErrorDetail(BaseModel):
    """What went wrong."""

    code: str
    message: str
    field: Optional[str] = None
    errors: Optional[List[ItemError]] = Field(default=None, description="POST /events: why each item was refused")


class ErrorResponse(BaseModel):
    """Every error body."""

    error: ErrorDetail


class EventAccepted(BaseModel):
    """POST /event's answer."""

    status: Literal["accepted"]
    event_id: Annotated[str, Field(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")]


class EventBatch(BaseModel):
    """POST /events' body: events shaped like POST /event's, each validated on its own."""

    model_config = ConfigDict(extra="forbid")

    events: Annotated[List[Any], Field(
        min_length=1, json_schema_extra={"items": {"$ref": "#/components/schemas/PublicEvent"}},
        description="1 to MAX_BATCH_EVENTS (default 100) events")]
    sent_at: Annotated[Optional[StrictStr], Field(default=None, max_length=64, description=SENT_AT_DOC)]
    api_key: Annotated[Optional[str], Field(
        default=None, max_length=1024, description="The API key, when the X-Api-Key header cannot be set")]

    @field_validator("sent_at")
    @classmethod
    def _sent_at_is_a_time(cls, value):
        """ISO 8601 with a zone, as on each event."""
        return optional_client_time(value)


class BatchAccepted(BaseModel):
    """POST /events' answer: the valid items are recorded even when others are refused."""

    status: Literal["accepted"]
    accepted: int
    event_ids: List[Optional[str]]
    errors: List[ItemError]


Ms = Optional[float]


class DailyCount(BaseModel):
    date: str
    count: int


class DailyFailed(DailyCount):
    failed: int


class DailyRequests(DailyFailed):
    avg_ms: Annotated[Ms, Field(description="Mean duration that day; null without requests")]
    p95_ms: Annotated[Ms, Field(description="95th percentile duration that day; null without requests")]


class DailyDependencies(DailyFailed):
    p95_ms: Annotated[Ms, Field(description="95th percentile duration that day; null without dependencies")]


class DailyUsers(BaseModel):
    date: str
    users: int


class TopOperation(BaseModel):
    name: str
    count: int
    failed: int
    p95_ms: Ms


class TopTarget(BaseModel):
    type: str
    target: str
    count: int
    failed: int
    avg_ms: Ms
    p95_ms: Annotated[Ms, Field(description="95th percentile duration of the calls to this target")]


class TopEvent(BaseModel):
    name: str
    count: int
    users: int


class Timespan(BaseModel):
    start: str
    end: str
    days: int


class RequestStats(BaseModel):
    total: int
    failed: int
    avg_ms: Ms
    p50_ms: Ms
    p95_ms: Ms
    p99_ms: Ms
    daily: List[DailyRequests]
    top_operations: List[TopOperation]


class DependencyStats(BaseModel):
    total: int
    failed: int
    avg_ms: Ms
    daily: List[DailyDependencies]
    top_targets: List[TopTarget]


class EventStats(BaseModel):
    total: int
    daily: List[DailyCount]
    top: List[TopEvent]


class UserStats(BaseModel):
    logins: int
    unique_users: int
    anonymous: Annotated[int, Field(description="Distinct anonymous visitor ids (events' anonymous_id)")]
    sessions: Annotated[int, Field(description="Distinct session ids")]
    daily_active: List[DailyUsers]


class CrudCounts(BaseModel):
    create: int
    read: int
    update: int
    delete: int


class EntityCounts(CrudCounts):
    entity: str


class CrudStats(BaseModel):
    total: int
    by_action: CrudCounts
    by_entity: List[EntityCounts]


class UsageReport(BaseModel):
    """GET /dashboard/usage's answer; the same shape in local and Azure mode."""

    source: Literal["local", "azure_monitor"]
    generated_at: str
    timespan: Timespan
    requests: RequestStats
    dependencies: DependencyStats
    events: EventStats
    users: UserStats
    crud: CrudStats


class Disk(BaseModel):
    path: str
    free_mb: Optional[float]


class Health(BaseModel):
    """GET /healthz's answer: 200 "ok", or 503 "degraded" listing the problems."""

    status: Literal["ok", "degraded"]
    problems: List[str]
    mode: Literal["local", "azure"]
    usage_source: str
    pid: Annotated[int, Field(description="The answering worker: `telemetry` is its own view")]
    telemetry: Dict[str, object]
    disk: Disk
    shared: Annotated[Dict[str, object], Field(
        description="State on disk that every worker shares: the local database, or the Azure outbox per folder")]


class Live(BaseModel):
    """GET /livez's answer."""

    status: Literal["alive"]


# -- the registry -----------------------------------------------------------------------------
_DESCRIPTIONS = {200: "OK", 202: "Accepted", 400: "Malformed request", 401: "Missing or wrong credential",
                 413: "Body too large", 415: "Content-Type is neither application/json nor text/plain",
                 422: "A field breaks the rules (the error names it)", 429: "Rate limit exceeded",
                 502: "Log Analytics failed",
                 503: "Temporarily unavailable: telemetry cannot take it, or Log Analytics is unavailable or not configured"}


class ApiSpec:
    """Routes declare their models here; the decorator validates with them and the spec renders them."""

    def __init__(self, title, version):
        self.title, self.version = title, version
        self._operations = []

    def operation(self, path, method, summary, *, body=None, query=None, response=None, status=200,
                  errors=(), security=None, alternate=None):
        """Decorate a view: validate its JSON body / query string and record it in the spec.

        `alternate` is (status, model) for a second documented answer with a body of its own
        (GET /healthz: 503 with the same document).
        """
        self._operations.append(dict(path=path, method=method.lower(), summary=summary, body=body,
                                     query=query, response=response, status=status, errors=errors,
                                     security=security, alternate=alternate))

        def decorator(view):
            @functools.wraps(view)
            def wrapper(*args, **kwargs):
                if query is not None:
                    kwargs["query"] = _validate(query, request.args.to_dict(), 400, "invalid_parameter")
                if body is not None:
                    kwargs["body"] = _validate(body, parse_json_object(), 422, "validation_error")
                return view(*args, **kwargs)
            return wrapper
        return decorator

    def render(self, security_schemes=None, active_security=()):
        """The OpenAPI 3.1 document for the operations registered so far."""
        models = {ErrorResponse, PublicEvent}
        for op in self._operations:
            models.update(m for m in (op["body"], op["query"], op["response"]) if m is not None)
            if op["alternate"] is not None:
                models.add(op["alternate"][1])
        _, defs = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                     ref_template="#/components/schemas/{model}")
        paths = {}
        for op in self._operations:
            paths.setdefault(op["path"], {})[op["method"]] = self._render_op(op, active_security)
        doc = {"openapi": "3.1.0", "info": {"title": self.title, "version": self.version},
               "paths": paths, "components": {"schemas": defs.get("$defs", {})}}
        if security_schemes:
            doc["components"]["securitySchemes"] = security_schemes
        return doc

    @staticmethod
    def _render_op(op, active_security):
        """One operation object."""
        ref = lambda m: {"$ref": f"#/components/schemas/{m.__name__}"}  # noqa: E731
        responses = {str(op["status"]): {"description": _DESCRIPTIONS.get(op["status"], "OK")}}
        if op["response"] is not None:
            responses[str(op["status"])]["content"] = {"application/json": {"schema": ref(op["response"])}}
        if op["alternate"] is not None:
            code, model = op["alternate"]
            responses[str(code)] = {"description": "Degraded: `problems` says what is wrong",
                                    "content": {"application/json": {"schema": ref(model)}}}
        errors = set(op["errors"])
        secured = op["security"] in active_security
        if secured:
            errors.add(401)
        for code in sorted(errors):
            responses[str(code)] = {"description": _DESCRIPTIONS[code],
                                    "content": {"application/json": {"schema": ref(ErrorResponse)}}}
        out = {"summary": op["summary"], "responses": responses}
        if op["query"] is not None:
            schema = op["query"].model_json_schema()
            out["parameters"] = [
                {"name": name, "in": "query", "required": name in schema.get("required", []), "schema": prop}
                for name, prop in schema["properties"].items()]
        if op["body"] is not None:
            out["requestBody"] = {"required": True, "content": {
                media: {"schema": ref(op["body"])} for media in BODY_MEDIA_TYPES}}
        if secured:
            out["security"] = [{op["security"]: []}]
        return out


def _validate(model, data, status, code):
    """Validate data with model or raise ApiError naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        field, message = describe_error(exc)
        raise ApiError(status, code, message, field=field) from None


def _unique_keys(pairs):
    """object_pairs_hook refusing duplicate keys."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name):
    """parse_constant refusing NaN and Infinity, which are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


_MAX_DEPTH = 32
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constants)


def _depth(data):
    """The deepest nesting of JSON arrays and objects in data, strings skipped."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


# text/plain is what navigator.sendBeacon(url, string) sends: a CORS-safelisted type, no preflight.
BODY_MEDIA_TYPES = ("application/json", "text/plain")


def parse_json_object():
    """The request body (JSON, sent as application/json or text/plain) as an object, or an ApiError."""
    if request.mimetype not in BODY_MEDIA_TYPES:
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json or text/plain")
    data = request.get_data(cache=True)
    if data.count(b"[") + data.count(b"{") > _MAX_DEPTH and _depth(data) > _MAX_DEPTH:
        raise ApiError(400, "invalid_json", f"the body nests deeper than {_MAX_DEPTH} levels", field="body")
    try:
        body = _DECODER.decode(data.decode(json.detect_encoding(data), "surrogatepass"))
    except (ValueError, RecursionError) as exc:
        reason = str(exc) if isinstance(exc, ValueError) and "duplicate" in str(exc) else "the body is not valid JSON"
        raise ApiError(400, "invalid_json", reason, field="body") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "The body must be a JSON object", field="body")
    return body
