"""Tests for log_analytics: the real LogsQueryClient against a requests-mock'ed Logs API (no network)."""

import re
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
import requests
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError

import log_analytics as la
from log_analytics import LogAnalyticsUsageSource, UsageQueryError
from usage_kql import COLUMNS, SECTIONS, usage_query

WORKSPACE = "00000000-1111-2222-3333-444444444444"
URL = f"https://api.loganalytics.io/v1/workspaces/{WORKSPACE}/query"
END = datetime(2024, 5, 8, 12, 30, tzinfo=timezone.utc)
START = END - timedelta(days=7)
FAR_FUTURE = int(time.time()) + 10 * 365 * 24 * 3600
SECRET_TOKEN = "fake-token-s3cret"


class FakeCredential:
    """A TokenCredential that never touches the network."""

    def __init__(self, error=None):
        self.error = error
        self.calls = 0

    def get_token(self, *scopes, **kwargs):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return AccessToken(SECRET_TOKEN, FAR_FUTURE)


class FakeClock:
    """A settable monotonic clock."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def table(rows):
    """A Logs API success body with the usage columns."""
    return {
        "tables": [
            {
                "name": "PrimaryResult",
                "columns": [{"name": name, "type": kql_type} for name, kql_type in COLUMNS],
                "rows": rows,
            }
        ]
    }


def blank(section, **values):
    """One raw result row (a JSON list) of ``section`` with unused columns at their defaults."""
    defaults = {
        "section": section, "day": "", "name": "", "type": "", "target": "", "action": "",
        "count": 0, "failed": 0, "users": 0,
        "avg_ms": None, "p50_ms": None, "p95_ms": None, "p99_ms": None,
    }
    defaults.update(values)
    return [defaults[name] for name, _ in COLUMNS]


OK_BODY = table([blank("req_summary", count=5, failed=1, avg_ms=10.0, p50_ms=8.0, p95_ms=20.0, p99_ms=30.0)])


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def make_source(clock):
    created = []

    def make(**kwargs):
        kwargs.setdefault("clock", clock)
        client_kwargs = kwargs.pop("client_kwargs", {"retry_backoff_factor": 0})
        credential = kwargs.pop("credential", FakeCredential())
        source = LogAnalyticsUsageSource(WORKSPACE, credential, client_kwargs=client_kwargs, **kwargs)
        created.append(source)
        return source

    yield make
    for source in created:
        source.close()


def error_body(code, message):
    return {"error": {"code": code, "message": message, "innererror": {"code": code, "message": message}}}


# --- usage_query -------------------------------------------------------------------------


def test_usage_query_has_no_placeholders_and_embeds_iso_datetimes():
    query = usage_query(START, END, top=7)
    assert "{" not in query and "}" not in query
    start_iso = "2024-05-01T12:30:00.000000Z"
    end_iso = "2024-05-08T12:30:00.000000Z"
    assert START.isoformat().startswith(start_iso[:19]) and END.isoformat().startswith(end_iso[:19])
    between = f"TimeGenerated between (datetime({start_iso}) .. datetime({end_iso}))"
    for table_name in ("AppRequests", "AppDependencies", "AppEvents"):
        assert re.search(rf"{table_name}\s*\|\s*where {re.escape(between)}", query), table_name
    assert query.count(between) == 3
    assert query.count("take 7") == 3
    for section in SECTIONS:
        assert f'section = "{section}"' in query
    final = query.strip().splitlines()[-2]
    assert final == "| project " + ", ".join(
        f"['{name}']" if name == "count" else name for name, _ in COLUMNS
    )


def test_usage_query_normalises_timezones():
    # Naive datetimes are UTC; aware ones are converted to UTC.
    cest = timezone(timedelta(hours=2))
    aware = usage_query(datetime(2024, 5, 1, 14, 30, tzinfo=cest), datetime(2024, 5, 2, 14, 30, tzinfo=cest))
    naive = usage_query(datetime(2024, 5, 1, 12, 30), datetime(2024, 5, 2, 12, 30))
    assert aware == naive
    assert "datetime(2024-05-01T12:30:00.000000Z)" in naive


@pytest.mark.parametrize(
    "args, exc",
    [
        ((START, START), ValueError),
        ((END, START), ValueError),
        (("2024-05-01", END), TypeError),
        ((START, END, 0), ValueError),
        ((START, END, True), ValueError),
        ((START, END, "10"), ValueError),
    ],
)
def test_usage_query_rejects_bad_arguments(args, exc):
    with pytest.raises(exc):
        usage_query(*args)


def test_usage_query_is_valid_kql():
    from kql_check import kql_errors

    assert kql_errors([usage_query(START, END, top=10)]) == [[]]


# --- construction ------------------------------------------------------------------------


def test_construction_is_lazy_and_offline(requests_mock):
    credential = FakeCredential()
    source = LogAnalyticsUsageSource(WORKSPACE, credential)
    assert source._client is None
    assert credential.calls == 0
    assert requests_mock.call_count == 0


# --- success -----------------------------------------------------------------------------


def test_rows_parses_success_into_typed_dicts_and_sends_query(requests_mock, make_source):
    rows = [
        blank("req_summary", count=120, failed=3, avg_ms=12.5, p50_ms=10, p95_ms=40.25, p99_ms=99.0),
        blank("req_daily", day="2024-05-07", count=60, failed=1),
        blank("req_top", name="GET /items/<int:id>", count=50, failed=2, p95_ms=31.5),
        blank("dep_top", type="SQL", target="db.example", count=10, avg_ms=3.25),
        blank("evt_top", name="UserLogin", count=4, users=2),
        blank("crud", name="item", action="create", count=4),
        blank("active_summary", users=7, avg_ms="NaN"),
    ]
    requests_mock.post(URL, json=table(rows))
    source = make_source()

    result = source.rows(START, END)

    assert result[0] == {
        "section": "req_summary", "day": "", "name": "", "type": "", "target": "", "action": "",
        "count": 120, "failed": 3, "users": 0,
        "avg_ms": 12.5, "p50_ms": 10.0, "p95_ms": 40.25, "p99_ms": 99.0,
    }
    assert [list(r) for r in result] == [[name for name, _ in COLUMNS]] * len(rows)
    assert [r["section"] for r in result] == [r[0] for r in rows]
    assert result[1]["day"] == "2024-05-07" and result[1]["avg_ms"] is None
    assert result[2]["name"] == "GET /items/<int:id>" and result[2]["p95_ms"] == 31.5
    assert (result[3]["type"], result[3]["target"], result[3]["avg_ms"]) == ("SQL", "db.example", 3.25)
    assert (result[4]["count"], result[4]["users"]) == (4, 2)
    assert (result[5]["name"], result[5]["action"], result[5]["count"]) == ("item", "create", 4)
    assert result[6]["users"] == 7 and result[6]["avg_ms"] is None  # NaN -> None
    for row in result:
        for name, kql_type in COLUMNS:
            value = row[name]
            if kql_type == "string":
                assert isinstance(value, str)
            elif kql_type == "long":
                assert type(value) is int
            else:
                assert value is None or type(value) is float
    assert type(result[0]["p50_ms"]) is float  # JSON 10 in a real column

    assert requests_mock.call_count == 1
    request = requests_mock.last_request
    assert request.method == "POST"
    assert request.url == URL
    assert request.json() == {
        "query": usage_query(START, END, 10),
        "timespan": "2024-05-01T12:30:00.000Z/2024-05-08T12:30:00.000Z",
        "workspaces": None,
    }
    assert request.headers["Authorization"] == f"Bearer {SECRET_TOKEN}"
    assert request.headers["Prefer"] == "wait=30"


def test_rows_uses_configured_top_timeout_and_endpoint(requests_mock, make_source):
    url = f"https://api.loganalytics.azure.cn/v1/workspaces/{WORKSPACE}/query"
    requests_mock.post(url, json=OK_BODY)
    source = make_source(top=3, timeout=12.5, endpoint="https://api.loganalytics.azure.cn")
    source.rows(START, END)
    request = requests_mock.last_request
    assert request.json()["query"] == usage_query(START, END, 3)
    assert request.headers["Prefer"] == "wait=13"


def test_rows_maps_columns_by_name(requests_mock, make_source):
    body = table([blank("evt_summary", count=9)])
    columns = body["tables"][0]["columns"]
    order = list(reversed(range(len(columns))))
    body["tables"][0]["columns"] = [columns[i] for i in order]
    body["tables"][0]["rows"] = [[row[i] for i in order] for row in body["tables"][0]["rows"]]
    requests_mock.post(URL, json=body)
    assert make_source().rows(START, END)[0]["count"] == 9


def test_rows_empty_table_is_empty_list(requests_mock, make_source):
    requests_mock.post(URL, json=table([]))
    assert make_source().rows(START, END) == []


def test_rows_unexpected_schema_is_502(requests_mock, make_source):
    requests_mock.post(URL, json={"tables": [{"name": "PrimaryResult", "columns": [{"name": "x", "type": "long"}],
                                             "rows": [[1]]}]})
    with pytest.raises(UsageQueryError) as info:
        make_source().rows(START, END)
    assert info.value.status == 502


def test_rows_rejects_bad_window_without_http(requests_mock, make_source):
    source = make_source()
    with pytest.raises(ValueError):
        source.rows(END, START)
    with pytest.raises(TypeError):
        source.rows("yesterday", END)
    assert requests_mock.call_count == 0


# --- partial results and errors ---------------------------------------------------------


def test_partial_result_is_502_naming_its_cause_held_briefly_and_not_cached(requests_mock, make_source, clock):
    partial = dict(OK_BODY)
    partial["error"] = {
        "code": "PartialError",
        "message": "There were some errors when processing your query.",
        "details": [{"code": "EngineError", "message": "Something went wrong processing your query on the server.",
                     "innererror": {"code": "-2133196797", "message": "Query result set has exceeded the limit"}}],
    }
    partial["error"]["details"][0]["message"] += f" in workspace {WORKSPACE}"
    partial["error"]["details"][0]["innererror"]["message"] += f" of workspace {WORKSPACE}"
    requests_mock.post(URL, [{"json": partial}, {"json": OK_BODY}])
    source = make_source()
    with pytest.raises(UsageQueryError) as info:
        source.rows(START, END)
    assert (info.value.status, info.value.retry_after) == (502, la._PARTIAL_HOLD)
    assert info.value.message == ("Log Analytics returned a partial result (PartialError: There were some errors "
                                  "when processing your query.; EngineError: Query result set has exceeded the "
                                  "limit of workspace <workspace>)")
    assert WORKSPACE not in info.value.message and SECRET_TOKEN not in info.value.message
    assert requests_mock.call_count == 1
    assert source.problems() == [], "a partial result is no throttle"

    clock.advance(la._PARTIAL_HOLD - 1)
    with pytest.raises(UsageQueryError) as info:
        source.rows(START, END)  # held briefly, like a throttle: the same answer without a query
    assert (info.value.status, info.value.retry_after) == (502, 1)
    assert info.value.message.startswith("Log Analytics returned a partial result (PartialError")
    assert requests_mock.call_count == 1

    clock.advance(1)
    assert source.rows(START, END)[0]["count"] == 5, "not cached: queried again once the hold ends"
    assert requests_mock.call_count == 2


def test_429_with_retry_after_is_503_not_retried_and_held(requests_mock, make_source, clock):
    requests_mock.post(URL, [
        {"status_code": 429, "headers": {"Retry-After": "7"},
         "json": error_body("ThrottledError", "Too many requests")},
        {"json": OK_BODY},
    ])
    source = make_source()
    with pytest.raises(UsageQueryError) as info:
        source.rows(START, END)
    assert (info.value.status, info.value.retry_after) == (503, 7)
    assert requests_mock.call_count == 1  # the SDK would have slept 7 s and retried; we do not

    clock.advance(3)
    with pytest.raises(UsageQueryError) as info:
        source.rows(START, END)  # fails fast while the service asked us to wait
    assert (info.value.status, info.value.retry_after) == (503, 4)
    assert requests_mock.call_count == 1

    clock.advance(5)
    assert source.rows(START, END)[0]["count"] == 5
    assert requests_mock.call_count == 2


def test_429_retry_after_http_date_and_missing(requests_mock, make_source):
    future = datetime.now(timezone.utc) + timedelta(seconds=120)
    requests_mock.post(URL, [
        {"status_code": 429, "headers": {"Retry-After": future.strftime("%a, %d %b %Y %H:%M:%S GMT")}, "json": {}},
        {"status_code": 429, "json": {}},
        {"json": OK_BODY},
    ])
    source = make_source()
    with pytest.raises(UsageQueryError) as info:
        source.rows(START, END)
    assert info.value.status == 503 and 100 <= info.value.retry_after <= 121
    source.clear_cache()  # also lifts the throttle hold
    with pytest.raises(UsageQueryError) as info:
        source.rows(START, END)
    assert (info.value.status, info.value.retry_after) == (503, la._DEFAULT_THROTTLE_HOLD)
    source.clear_cache()
    source.rows(START, END)
    assert requests_mock.call_count == 3


@pytest.mark.parametrize("status, calls", [(429, 1), (503, 3)])  # a 503 is retried (back-off 0 here) first
def test_429_or_503_without_retry_after_holds_for_the_default(requests_mock, make_source, clock, status, calls):
    requests_mock.post(URL, [{"status_code": status, "json": error_body("ThrottledError", "Too many requests")}] * calls
                       + [{"json": OK_BODY}])
    source = make_source()
    with pytest.raises(UsageQueryError) as info:
        source.rows(START, END)
    assert (info.value.status, info.value.retry_after) == (503, 30)
    assert requests_mock.call_count == calls
    problems = source.problems()
    assert len(problems) == 1 and f"HTTP {status}" in problems[0] and "held for 30 s more" in problems[0], problems

    clock.advance(29)
    with pytest.raises(UsageQueryError) as info:
        source.rows(START, END)  # held on the injected clock: no query
    assert (info.value.status, info.value.retry_after) == (503, 1)
    assert requests_mock.call_count == calls

    clock.advance(1)
    assert source.problems() == []
    assert source.rows(START, END)[0]["count"] == 5
    assert requests_mock.call_count == calls + 1


@pytest.fixture
def sleeps(monkeypatch):
    """The retry sleeps of the Logs API client, recorded instead of slept (no wall clock in these tests)."""
    from azure.core.pipeline.transport import RequestsTransport
    slept = []
    monkeypatch.setattr(RequestsTransport, "sleep", lambda self, seconds: slept.append(seconds))
    return slept


@pytest.mark.parametrize("retry_after, calls, waits", [
    ("1", 3, [1, 1]),  # both retries fit in the 3 s
    ("2", 2, [2]),  # a second 2 s wait would not fit
    ("3", 2, [3]),
    ("5", 1, []),  # the SDK used to sleep 5 s twice: 10 s
])
def test_a_503_with_retry_after_waits_at_most_3_s_in_all(requests_mock, make_source, sleeps, retry_after, calls,
                                                         waits):
    requests_mock.post(URL, status_code=503, headers={"Retry-After": retry_after},
                       json=error_body("ServiceUnavailable", "later"))
    with pytest.raises(UsageQueryError) as info:
        make_source().rows(START, END)
    assert (info.value.status, info.value.retry_after) == (503, int(retry_after))
    assert requests_mock.call_count == calls
    assert sleeps == waits and sum(sleeps) <= la._MAX_RETRY_WAIT


def test_the_default_back_off_fits_the_3_s_too(requests_mock, make_source, sleeps):
    requests_mock.post(URL, status_code=500, json=error_body("InternalServerError", "boom"))
    source = make_source(client_kwargs={"retry_total": 5, "retry_backoff_factor": 1, "retry_backoff_max": 10})
    with pytest.raises(UsageQueryError):
        source.rows(START, END)
    # Back-offs 0 (no sleep), 2, then 4 s: the third retry would not fit in the 3 s, so it is not made.
    assert sleeps == [2] and requests_mock.call_count == 3


def test_500_is_503_after_client_retries(requests_mock, make_source):
    requests_mock.post(URL, status_code=500, json=error_body("InternalServerError", "boom"))
    source = make_source()  # default policy: retry_total=2 (backoff 0 for the test)
    with pytest.raises(UsageQueryError) as info:
        source.rows(START, END)
    assert info.value.status == 503
    assert info.value.retry_after is None
    assert requests_mock.call_count == 3


def test_500_without_retries_is_one_call(requests_mock, make_source):
    requests_mock.post(URL, status_code=500, json=error_body("InternalServerError", "boom"))
    with pytest.raises(UsageQueryError) as info:
        make_source(client_kwargs={"retry_total": 0}).rows(START, END)
    assert info.value.status == 503
    assert requests_mock.call_count == 1


def test_503_html_page_keeps_its_status(requests_mock, make_source):
    requests_mock.post(URL, status_code=503, text="<html>Service Unavailable</html>",
                       headers={"Content-Type": "text/html"})
    with pytest.raises(UsageQueryError) as info:
        make_source().rows(START, END)
    assert info.value.status == 503
    assert requests_mock.call_count == 3


def test_502_gateway_is_503_and_not_retried(requests_mock, make_source):
    # azure-core only retries POST on 500/503/504 (or when Retry-After is present).
    requests_mock.post(URL, status_code=502, text="Bad Gateway")
    with pytest.raises(UsageQueryError) as info:
        make_source().rows(START, END)
    assert info.value.status == 503
    assert requests_mock.call_count == 1


def test_400_is_502_with_safe_message(requests_mock, make_source):
    requests_mock.post(URL, status_code=400, json=error_body(
        "BadArgumentError", f"Failed to resolve table expression in workspace {WORKSPACE}"))
    with pytest.raises(UsageQueryError) as info:
        make_source().rows(START, END)
    error = info.value
    assert error.status == 502 and error.retry_after is None
    assert "400" in error.message and "BadArgumentError" in error.message
    assert str(error) == error.message
    for secret in (WORKSPACE, SECRET_TOKEN, "Failed to resolve"):
        assert secret not in error.message
    assert requests_mock.call_count == 1


def test_4xx_with_retry_after_is_not_retried(requests_mock, make_source):
    # Stock azure-core would retry (and sleep) on any status carrying Retry-After.
    requests_mock.post(URL, status_code=400, headers={"Retry-After": "1"},
                       json=error_body("BadArgumentError", "bad"))
    with pytest.raises(UsageQueryError) as info:
        make_source().rows(START, END)
    assert info.value.status == 502
    assert requests_mock.call_count == 1


def test_503_with_long_retry_after_is_not_slept_through(requests_mock, make_source):
    requests_mock.post(URL, status_code=503, headers={"Retry-After": "120"},
                       json=error_body("ServiceUnavailable", "later"))
    started = time.monotonic()
    with pytest.raises(UsageQueryError) as info:
        make_source().rows(START, END)
    assert (info.value.status, info.value.retry_after) == (503, 120)
    assert requests_mock.call_count == 1
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("status", [401, 403, 404])
def test_other_client_errors_are_502(requests_mock, make_source, status):
    requests_mock.post(URL, status_code=status, json=error_body("Forbidden", "nope"))
    with pytest.raises(UsageQueryError) as info:
        make_source().rows(START, END)
    assert info.value.status == 502
    assert requests_mock.call_count == 1


def test_credential_failure_is_502_without_http(requests_mock, make_source):
    credential = FakeCredential(error=ClientAuthenticationError(f"no token for {SECRET_TOKEN}"))
    with pytest.raises(UsageQueryError) as info:
        make_source(credential=credential).rows(START, END)
    assert info.value.status == 502
    assert SECRET_TOKEN not in info.value.message
    assert requests_mock.call_count == 0


@pytest.mark.parametrize("exc", [requests.exceptions.ConnectionError, requests.exceptions.ReadTimeout,
                                 requests.exceptions.ConnectTimeout])
def test_network_errors_and_timeouts_are_503(requests_mock, make_source, exc):
    requests_mock.post(URL, exc=exc)
    with pytest.raises(UsageQueryError) as info:
        make_source().rows(START, END)
    assert info.value.status == 503
    assert requests_mock.call_count == 1  # azure-core does not retry a POST after transport errors


def test_malformed_success_body_is_502(requests_mock, make_source):
    requests_mock.post(URL, text="not json", headers={"Content-Type": "application/json"})
    with pytest.raises(UsageQueryError) as info:
        make_source().rows(START, END)
    assert info.value.status == 502


def test_programming_errors_are_not_wrapped(requests_mock, make_source, monkeypatch):
    requests_mock.post(URL, json=OK_BODY)
    source = make_source()
    monkeypatch.setattr(la, "_table_rows", lambda result: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        source.rows(START, END)
    monkeypatch.undo()
    assert source.rows(START, END)[0]["count"] == 5  # the failed flight was cleaned up


def test_error_does_not_poison_later_calls(requests_mock, make_source):
    requests_mock.post(URL, [{"status_code": 500, "json": error_body("InternalServerError", "boom")},
                             {"json": OK_BODY}])
    source = make_source(client_kwargs={"retry_total": 0})
    with pytest.raises(UsageQueryError):
        source.rows(START, END)
    assert source.rows(START, END)[0]["count"] == 5
    assert source.rows(START, END)[0]["count"] == 5  # now cached
    assert requests_mock.call_count == 2


# --- cache and single flight -------------------------------------------------------------


def test_cache_hit_within_ttl_and_refresh_after_expiry(requests_mock, make_source, clock):
    requests_mock.post(URL, json=OK_BODY)
    source = make_source(cache_ttl=60)
    first = source.rows(START, END)
    first[0]["count"] = -1  # callers get copies
    clock.advance(59)
    # "now" moved on: same span, same UTC end date -> same cache entry.
    assert source.rows(START + timedelta(seconds=59), END + timedelta(seconds=59))[0]["count"] == 5
    assert requests_mock.call_count == 1
    clock.advance(2)
    source.rows(START, END)
    assert requests_mock.call_count == 2


def test_cache_keys_on_span(requests_mock, make_source):
    requests_mock.post(URL, json=OK_BODY)
    source = make_source()
    source.rows(START, END)
    source.rows(END - timedelta(days=30), END)
    source.rows(END - timedelta(days=30), END)
    assert requests_mock.call_count == 2


def test_clear_cache_and_zero_ttl(requests_mock, make_source):
    requests_mock.post(URL, json=OK_BODY)
    source = make_source()
    source.rows(START, END)
    source.clear_cache()
    source.rows(START, END)
    assert requests_mock.call_count == 2
    uncached = make_source(cache_ttl=0)
    uncached.rows(START, END)
    uncached.rows(START, END)
    assert requests_mock.call_count == 4


def _run_concurrently(func, n=8):
    """Call ``func`` from ``n`` threads released together; return (results, errors)."""
    barrier = threading.Barrier(n)
    results, errors = [None] * n, [None] * n

    def worker(i):
        barrier.wait()
        try:
            results[i] = func()
        except Exception as exc:  # noqa: BLE001 - collected for assertions
            errors[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    return results, errors


def test_single_flight_concurrent_miss_makes_one_call(requests_mock, make_source):
    def slow(request, context):
        time.sleep(0.3)
        return OK_BODY

    requests_mock.post(URL, json=slow)
    source = make_source()
    results, errors = _run_concurrently(lambda: source.rows(START, END))
    assert errors == [None] * 8
    assert requests_mock.call_count == 1
    assert all(r == results[0] for r in results) and results[0][0]["count"] == 5
    assert len({id(r) for r in results}) == 8  # each caller got its own copy


def test_single_flight_shares_errors_and_does_not_cache_them(requests_mock, make_source):
    def slow_fail(request, context):
        time.sleep(0.3)
        context.status_code = 500
        return error_body("InternalServerError", "boom")

    requests_mock.post(URL, json=slow_fail)
    source = make_source()
    results, errors = _run_concurrently(lambda: source.rows(START, END))
    assert results == [None] * 8
    assert all(isinstance(e, UsageQueryError) and e.status == 503 for e in errors)
    assert len({id(e) for e in errors}) == 8
    assert requests_mock.call_count == 3  # one leader query, with its 2 retries

    requests_mock.post(URL, json=OK_BODY)
    assert source.rows(START, END)[0]["count"] == 5
    assert requests_mock.call_count == 4
