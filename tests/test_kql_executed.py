"""The Azure queries executed: the dashboard's KQL and the workbook's, run by duckdb-kql on App* tables
built from the envelopes the real exporters delivered to the fake ingestion endpoint.

The same records go to a local-mode app (SQLite) and to an Azure-mode app (OpenCensus exporters);
a second application (another instrumentation key) writes to the same "workspace". The Azure JSON
(our rows through log_analytics._table_rows and monitoring_utils.build_usage) must equal the
local JSON section by section. A second workspace holds sampled traffic (ItemCount 1 and 4): its
figures are checked against an independent computation from the envelopes. Exceptions: none at
these cardinalities (dcount is an estimate in Kusto, exact here; percentilew an estimate in Kusto,
exact here: see kql_duckdb.py).
"""
import json
import types
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import appinsights_tables
import kql_duckdb
from app import create_app
from fake_ingestion import IKEY, FakeIngestion
from log_analytics import _table_rows
from usage_kql import usage_query
from monitoring_utils import build_usage, usage_window
from telemetry import DependencyRecord, EventRecord, RequestRecord, monitor_of

OTHER_IKEY = "99999999-8888-7777-6666-555555555555"
DAYS = 3
DURATIONS = (5.0, 12.0, 30.0, 75.0, 180.0, 450.0)  # one distinct value per histogram bucket: local percentiles are exact
WORKBOOK = Path(__file__).resolve().parent.parent / "workbooks" / "usage.workbook.json"


# -- traffic ---------------------------------------------------------------------------------

def _times(now):
    """A whole-millisecond time on each day of the window: two days ago, yesterday and today (before now)."""
    today = datetime.combine(now.date(), datetime.min.time(), timezone.utc).timestamp()
    into_today = min(3600.0, (now.timestamp() - today) / 2)
    return [round(today - 2 * 86400 + 36000, 3), round(today - 86400 + 50000, 3), round(today + into_today, 3)]


def _op(i, prefix="a"):
    """A trace id; its first 8 hex digits decide sampling (score = int(prefix) / 2**32)."""
    return f"{prefix}{i:07x}" + "0" * 24


def _requests(days, ops):
    """Requests over the window: 3 routes with distinct counts, 2 failures (5xx), 1 client error (4xx)."""
    out, i = [], 0
    for route, method, n, statuses in (("/items/<int:id>", "GET", 7, [200, 200, 404]),
                                       ("/event", "POST", 5, [202]), ("/boom", "GET", 3, [500, 200, 500])):
        for k in range(n):
            out.append(RequestRecord(method, route, f"http://localhost{route}", statuses[k % len(statuses)],
                                     DURATIONS[i % len(DURATIONS)], days[i % 3] + i / 1000, ops(i), f"{i:016x}"))
            i += 1
    return out


def _dependencies(days, ops):
    """Outgoing calls of some of the requests: two targets, one failure."""
    out = []
    for i, (url, status) in enumerate([("http://api.example:8080/x", 200)] * 4 + [("http://api.example:8080/y", 500)]
                                      + [("http://db.example/q", 200)] * 2):
        out.append(DependencyRecord("HTTP", url.split("/")[2], f"GET /{url.rsplit('/', 1)[1]}", url, str(status),
                                    status < 400, DURATIONS[(i + 2) % len(DURATIONS)], days[i % 3] + 0.5 + i / 1000,
                                    ops(i), method="GET", status=status))
    return out


def _events(days):
    """Logins, CRUD and other events by signed-in users, anonymous visitors and sessions."""
    out = []
    for i, user in enumerate(("alice", "alice", "bob", "carol")):
        out.append(EventRecord("UserLogin", {"user_id": user}, user, timestamp=days[i % 3] + 1 + i / 1000,
                               anonymous_id=f"anon-{i % 2}", session_id=f"s-{i}"))
    for i, (action, entity, user) in enumerate((("create", "invoice", "alice"), ("update", "invoice", "alice"),
                                                ("read", "customer", "bob"), ("delete", "invoice", "bob"),
                                                ("create", "customer", "dave"))):
        out.append(EventRecord("CrudActivity", {"action": action, "entity": entity, "user_id": user}, user,
                               timestamp=days[i % 3] + 2 + i / 1000, session_id=f"s-{i}"))
    for i in range(3):
        out.append(EventRecord("ReportExported", {"format": "pdf"}, "", timestamp=days[i % 3] + 3 + i / 1000,
                               anonymous_id=f"anon-{i}", session_id="s-9"))
    out.append(EventRecord("Search", {"q": "x"}, "erin", timestamp=days[2] + 4, client_event_id=True))
    return out


def _sampled_requests(days, route, durations, day, prefix):
    """Requests to `route` (every third one fails) on `days[day]`, or spread over the days when `day` is None.

    Their trace ids start at 1: the all-zero id means "no operation", sampled at random."""
    return [RequestRecord("GET", route, f"http://localhost{route}", 500 if i % 3 == 0 else 200, ms,
                          days[i % 3 if day is None else day] + 7 + i / 1000, _op(i + 1, prefix), f"{i:016x}")
            for i, ms in enumerate(durations)]


def _other_application(days):
    """Another application's telemetry in the same workspace: it must count nowhere."""
    return (_requests(days, lambda i: _op(i, "b"))[:6] + _dependencies(days, lambda i: _op(i, "b"))[:3]
            + [EventRecord("UserLogin", {"user_id": "mallory"}, "mallory", timestamp=days[2] + 5,
                           anonymous_id="anon-m", session_id="s-m"),
               EventRecord("CrudActivity", {"action": "delete", "entity": "invoice", "user_id": "mallory"},
                           "mallory", timestamp=days[2] + 6)])


def _azure_app(tmp, ingestion, ikey=IKEY, rate="1"):
    """An Azure-mode app whose exporters send to `ingestion` with instrumentation key `ikey`."""
    return create_app({"TESTING": True, "TELEMETRY_STORAGE": str(tmp / f"outbox-{ikey}-{rate}"),
                       "APPLICATIONINSIGHTS_CONNECTION_STRING":
                           f"InstrumentationKey={ikey};IngestionEndpoint=http://127.0.0.1:{ingestion.port}/",
                       "EXPORT_INTERVAL": "0.05", "METRICS_EXPORT_INTERVAL": "3600",
                       "TRACE_SAMPLING": "fixed", "TRACE_SAMPLING_RATE": rate})


def _send(app, records, copies=1):
    """Hand each record to the app's monitor `copies` times (a re-send), then flush."""
    monitor = monitor_of(app)
    for _ in range(copies):
        for rec in records:
            kind = {EventRecord: "event", RequestRecord: "request", DependencyRecord: "dependency"}[type(rec)]
            getattr(monitor, f"track_{kind}")(rec)
    assert monitor.flush(10)


def _delivered(ingestion, n):
    """The envelopes of the three dashboard kinds, once at least `n` have arrived."""
    kinds = set(appinsights_tables.TABLES)
    ingestion.wait_for(lambda f: sum(e["data"]["baseType"] in kinds for e in f.envelopes) >= n, timeout=20)
    return [e for e in ingestion.envelopes if e["data"]["baseType"] in kinds]


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    """The same records in a local store and in a workspace (plus another app's), and sampled traffic in a second one."""
    tmp = tmp_path_factory.mktemp("kql")
    now = datetime.now(timezone.utc)
    days = _times(now)
    reqs, deps, evts = _requests(days, _op), _dependencies(days, _op), _events(days)
    duplicates = evts[:2] + evts[-1:]  # re-sent after a crash, by a second tab, by a client retry
    workspace, sampled_ws = FakeIngestion().start(), FakeIngestion().start()
    local = create_app({"TESTING": True, "TELEMETRY_DB": str(tmp / "telemetry.db"), "LOCAL_FLUSH_INTERVAL": "0.01"})
    apps = [local, _azure_app(tmp, workspace), _azure_app(tmp, workspace, OTHER_IKEY),
            _azure_app(tmp, sampled_ws), _azure_app(tmp, sampled_ws, rate="0.25")]
    try:
        for app in apps[:2]:
            _send(app, reqs + deps + evts)
            _send(app, duplicates)
        others = _other_application(days)
        _send(apps[2], others)
        # Sampled traffic: kept operations are those whose score is below the rate ("0…" < 0.25 <= "c…").
        _send(apps[3], _sampled_requests(days, "/mixed", [10.0] * 19, 2, "c"))  # ItemCount 1
        _send(apps[4], _sampled_requests(days, "/mixed", [2000.0], 2, "0")  # ItemCount 4
              + _sampled_requests(days, "/slow", [1000.0, 1100.0, 1200.0, 1300.0], None, "0")
              + [DependencyRecord("HTTP", "api.example:8080", "GET /z", "http://api.example:8080/z", "200", True,
                                  40.0, days[0] + 8, _op(1, "0"), method="GET", status=200)])
        start, end = usage_window(DAYS, now)
        yield types.SimpleNamespace(
            start=start, end=end, local_rows=list(monitor_of(local).source.rows(start, end)),
            envelopes=_delivered(workspace, len(reqs) + len(deps) + len(evts) + len(duplicates) + len(others)),
            sampled=_delivered(sampled_ws, 19 + 1 + 4 + 1))
    finally:
        for app in apps:
            monitor_of(app).close()
        workspace.stop()
        sampled_ws.stop()


@pytest.fixture(scope="module")
def con(traffic):
    """A DuckDB connection whose App* tables hold the workspace's envelopes."""
    connection = kql_duckdb.connect()
    appinsights_tables.load(connection, traffic.envelopes)
    return connection


@pytest.fixture(scope="module")
def sampled_con(traffic):
    """A DuckDB connection whose App* tables hold the sampled workspace's envelopes."""
    connection = kql_duckdb.connect()
    appinsights_tables.load(connection, traffic.sampled)
    return connection


# -- the harness -------------------------------------------------------------------------------

def _doc(rows, traffic, source):
    """The dashboard JSON of section rows, without what differs by nature (source, generation time)."""
    doc = build_usage(rows, traffic.start, traffic.end, DAYS, source)
    del doc["source"], doc["generated_at"]
    return doc


def azure_rows(con, kql):
    """Section rows of a usage query run on DuckDB, read by the same code as Log Analytics' answers."""
    names, rows = kql_duckdb.run(con, kql)
    result = types.SimpleNamespace(tables=[types.SimpleNamespace(columns=names, rows=rows)])
    return _table_rows(result)


def _query(traffic, template=None):
    """The dashboard's query for the traffic's window, scoped to our key (or a mutated copy of it)."""
    return template if template is not None else usage_query(traffic.start, traffic.end, 10, IKEY)


def dashboard_mismatches(traffic, con, sampled_con, kql):
    """Every section where the query's JSON differs from the local JSON or from the sampled traffic's true figures."""
    local = _doc(traffic.local_rows, traffic, "local")
    azure = _doc(azure_rows(con, kql), traffic, "azure")
    found = [(section, azure[section], local[section]) for section in local if azure[section] != local[section]]
    expected = _sampled_truth(traffic.sampled, _dates(traffic))
    got = _sampled_figures(_doc(azure_rows(sampled_con, kql), traffic, "azure"))
    return found + [(k, got[k], expected[k]) for k in expected if got[k] != expected[k]]


def _sampled_figures(doc):
    """The request and dependency figures of a dashboard JSON that sampling weights (averages left out)."""
    req, dep = doc["requests"], doc["dependencies"]
    return {"requests": (req["total"], req["failed"], req["p50_ms"], req["p95_ms"], req["p99_ms"]),
            "requests daily": [(d["count"], d["failed"], d["p95_ms"]) for d in req["daily"]],
            "requests top": [(t["name"], t["count"], t["failed"], t["p95_ms"]) for t in req["top_operations"]],
            "dependencies": (dep["total"], dep["failed"]),
            "dependencies daily": [(d["count"], d["failed"]) for d in dep["daily"]],
            "dependencies top": [(t["type"], t["target"], t["count"], t["failed"]) for t in dep["top_targets"]]}


def _weighted(envelopes, kind):
    """[(baseData, ItemCount, date)] of one baseType."""
    return [(e["data"]["baseData"], appinsights_tables.item_count(e), e["time"][:10])
            for e in envelopes if e["data"]["baseType"] == kind]


def _counts(items):
    """(sum of ItemCount, sum of ItemCount of the failed) of [(baseData, ItemCount, date)]."""
    return sum(w for _, w, _ in items), sum(w for b, w, _ in items if not b["success"])


def _p(items, percent):
    """The weighted nearest-rank percentile of the durations, rounded as the JSON is, or None."""
    value = appinsights_tables.nearest_rank(
        [(appinsights_tables.duration_ms(b["duration"]), w) for b, w, _ in items], percent)
    return None if value is None else round(value, 3)


def _top(groups):
    """Groups ordered as the top lists are: by weighted count, descending, then key."""
    return sorted(groups.items(), key=lambda kv: (-_counts(kv[1])[0], kv[0]))


def _sampled_truth(envelopes, dates):
    """What the sampled requests and dependencies stand for, from the envelopes alone (ItemCount = 100 / sampleRate)."""
    reqs, deps = _weighted(envelopes, "RequestData"), _weighted(envelopes, "RemoteDependencyData")
    by = lambda items, key: {k: [i for i in items if key(i) == k] for k in {key(i) for i in items}}  # noqa: E731
    req_days, dep_days = by(reqs, lambda i: i[2]), by(deps, lambda i: i[2])
    return {"requests": _counts(reqs) + (_p(reqs, 50), _p(reqs, 95), _p(reqs, 99)),
            "requests daily": [_counts(req_days.get(d, [])) + (_p(req_days.get(d, []), 95),) for d in dates],
            "requests top": [(name, *_counts(items), _p(items, 95)) for name, items in _top(by(reqs, lambda i: i[0]["name"]))],
            "dependencies": _counts(deps),
            "dependencies daily": [_counts(dep_days.get(d, [])) for d in dates],
            "dependencies top": [(*key, *_counts(items))
                                 for key, items in _top(by(deps, lambda i: (i[0]["type"], i[0]["target"])))]}


def _dates(traffic):
    """The window's dates, oldest first."""
    return [(traffic.start.date() + timedelta(days=i)).isoformat() for i in range(DAYS)]


def test_the_traffic_reached_both_sides(traffic):
    """Sanity: every kind reached the workspace, duplicates included, and both keys are in it."""
    kinds = {e["data"]["baseType"] for e in traffic.envelopes}
    assert kinds == set(appinsights_tables.TABLES)
    assert {e["iKey"] for e in traffic.envelopes} == {IKEY, OTHER_IKEY}
    ids = [e["data"]["baseData"]["properties"]["event_id"] for e in traffic.envelopes
           if e["data"]["baseType"] == "EventData" and e["iKey"] == IKEY]
    assert len(ids) - len(set(ids)) == 3  # three events arrived twice
    assert {appinsights_tables.item_count(e) for e in traffic.sampled} == {1, 4}
    assert len(traffic.sampled) == 19 + 1 + 4 + 1


def test_azure_json_equals_local_json_section_by_section(traffic, con, sampled_con):
    """The dashboard's query, executed, gives the local figures (and the sampled traffic's true ones)."""
    assert dashboard_mismatches(traffic, con, sampled_con, _query(traffic)) == []
    local = _doc(traffic.local_rows, traffic, "local")
    assert local["events"]["total"] == 13 and local["users"]["logins"] == 4  # duplicates counted once locally
    assert local["requests"]["failed"] == 2 and local["users"]["anonymous"] == 3


def test_without_the_scope_another_applications_rows_are_counted(traffic, con):
    """The IKey filter is what keeps the second application out: the unscoped query counts it."""
    unscoped = _doc(azure_rows(con, usage_query(traffic.start, traffic.end, 10)), traffic, "azure")
    local = _doc(traffic.local_rows, traffic, "local")
    assert unscoped["requests"]["total"] == local["requests"]["total"] + 6
    assert unscoped["users"]["logins"] == local["users"]["logins"] + 1
    other = _doc(azure_rows(con, usage_query(traffic.start, traffic.end, 10, OTHER_IKEY)), traffic, "azure")
    assert (other["requests"]["total"], other["dependencies"]["total"], other["events"]["total"]) == (6, 3, 2)


def test_without_deduplication_repeated_event_ids_are_counted_twice(traffic, con):
    """The arg_min by event_id is what counts a re-sent event once."""
    query = _query(traffic)
    line = ("\n    | summarize arg_min(TimeGenerated, Name, ItemCount, UserAuthenticatedId, UserId, SessionId, Properties)"
            "\n        by EventId = tostring(Properties.event_id));")
    assert line in query
    doubled = _doc(azure_rows(con, query.replace(line, ");")), traffic, "azure")
    assert doubled["events"]["total"] == 13 + 3 and doubled["users"]["logins"] == 4 + 2


# -- weighted percentiles: the macro against an independent computation ----------------------------

@pytest.mark.parametrize("pairs", [
    [(10.0, 8), (20.0, 6), (30.0, 3), (40.0, 1)],
    [(5.0, 1), (1000.0, 4)],
    [(7.0, 1)],
    [(float(v), w) for v, w in zip(range(37, 0, -1), [1, 2, 3, 4, 100] * 8)],
])
@pytest.mark.parametrize("percent", [1, 25, 50, 75, 95, 99, 99.9, 100])
def test_percentilew_is_the_nearest_rank_of_the_weighted_values(pairs, percent):
    con = kql_duckdb.connect()
    con.execute("CREATE TABLE T (V DOUBLE, W BIGINT)")
    con.executemany("INSERT INTO T VALUES (?, ?)", pairs)
    (row,) = kql_duckdb.records(con, f"T | summarize (p) = percentilesw(V, W, {percent}), q = percentilew(V, W, {percent})")
    expected = appinsights_tables.nearest_rank(pairs, percent)
    assert row == {"p": expected, "q": expected}


def test_percentile_tuples_expand_to_single_percentiles():
    text = "summarize n = sum(ItemCount), (p50, p95) = percentilesw(DurationMs, ItemCount, 50, 95) by Name"
    assert kql_duckdb.expand_percentile_tuples(text) == (
        "summarize n = sum(ItemCount), p50 = percentilew(DurationMs, ItemCount, 50), "
        "p95 = percentilew(DurationMs, ItemCount, 95) by Name")
    assert kql_duckdb.expand_percentile_tuples("(a, b) = percentiles(X, 5, 9)") == "a = percentile(X, 5), b = percentile(X, 9)"


# -- the workbook ------------------------------------------------------------------------------------

def _workbook_queries(traffic, ikey=IKEY):
    """The workbook's queries by item name, with the parameters substituted as the workbook does."""
    workbook = json.loads(WORKBOOK.read_text())
    time_range = (f"between (datetime({traffic.start:%Y-%m-%dT%H:%M:%S.%fZ}) .. "
                  f"datetime({traffic.end:%Y-%m-%dT%H:%M:%S.%fZ}))")
    return {item["name"]: item["content"]["query"].replace("{TimeRange}", time_range).replace("{IKey}", ikey)
            for item in workbook["items"] if item["type"] == 3}


def _day(value):
    """A bin(TimeGenerated, 1d) as YYYY-MM-DD."""
    return value.date().isoformat()


def workbook_mismatches(traffic, con, sampled_con, queries):
    """Every workbook figure that differs from the local JSON (or, for requests, from the sampled traffic's truth)."""
    local = _doc(traffic.local_rows, traffic, "local")
    req, dep, evt, users, crud = (local[k] for k in ("requests", "dependencies", "events", "users", "crud"))
    nonzero = lambda daily, key: {d["date"]: d[key] for d in daily if d[key]}  # noqa: E731
    run = lambda name, c=con: kql_duckdb.records(c, queries[name])  # noqa: E731
    got, want = {}, {}
    tiles = {r["Figure"]: r["Value"] for r in run("headline")}
    got["headline"] = tiles
    want["headline"] = {"Requests": req["total"], "Failed requests": round(100.0 * req["failed"] / req["total"], 2),
                        "Request p95": round(req["p95_ms"], 1), "Dependencies": dep["total"], "Events": evt["total"],
                        "Logins": users["logins"], "Unique users": users["unique_users"],
                        "Anonymous visitors": users["anonymous"], "Sessions": users["sessions"]}
    got["requests-daily"] = {_day(r["Day"]): (r["Requests"], r["Failed"]) for r in run("requests-daily")}
    want["requests-daily"] = {d["date"]: (d["count"], d["failed"]) for d in req["daily"] if d["count"]}
    got["latency-daily"] = {_day(r["Day"]): (r["Average (ms)"], r["p95 (ms)"]) for r in run("latency-daily")}
    want["latency-daily"] = {d["date"]: (round(d["avg_ms"], 1), round(d["p95_ms"], 1)) for d in req["daily"] if d["count"]}
    got["dependencies-daily"] = {_day(r["Day"]): (r["Calls"], r["Failed"]) for r in run("dependencies-daily")}
    want["dependencies-daily"] = {d["date"]: (d["count"], d["failed"]) for d in dep["daily"] if d["count"]}
    got["events-daily"] = {_day(r["Day"]): r["Events"] for r in run("events-daily")}
    want["events-daily"] = nonzero(evt["daily"], "count")
    got["active-users-daily"] = {_day(r["Day"]): r["Active users"] for r in run("active-users-daily")}
    want["active-users-daily"] = nonzero(users["daily_active"], "users")
    got["top-operations"] = [(r["Operation"], r["Requests"], r["Failed"], r["p95 (ms)"]) for r in run("top-operations")]
    want["top-operations"] = [(t["name"], t["count"], t["failed"], round(t["p95_ms"], 1)) for t in req["top_operations"]]
    got["top-targets"] = [(r["Type"], r["Target"], r["Calls"], r["Failed"], r["Average (ms)"]) for r in run("top-targets")]
    want["top-targets"] = [(t["type"], t["target"], t["count"], t["failed"], round(t["avg_ms"], 1))
                           for t in dep["top_targets"]]
    got["top-events"] = [(r["Event"], r["Count"], r["Users"]) for r in run("top-events")]
    want["top-events"] = [(t["name"], t["count"], t["users"]) for t in evt["top"]]
    got["crud"] = [{"entity": r["Entity"], "create": r["Create"], "read": r["Read"], "update": r["Update"],
                    "delete": r["Delete"]} for r in run("crud")]
    want["crud"] = crud["by_entity"]
    truth = _sampled_truth(traffic.sampled, _dates(traffic))
    sampled_tiles = {r["Figure"]: r["Value"] for r in run("headline", sampled_con)}
    got["sampled"] = {k: sampled_tiles[k] for k in ("Requests", "Failed requests", "Request p95", "Dependencies")}
    total, failed, _, p95, _ = truth["requests"]
    want["sampled"] = {"Requests": total, "Failed requests": round(100.0 * failed / total, 2),
                       "Request p95": round(p95, 1), "Dependencies": truth["dependencies"][0]}
    got["sampled-top"] = [(r["Operation"], r["Requests"], r["Failed"], r["p95 (ms)"])
                          for r in run("top-operations", sampled_con)]
    want["sampled-top"] = [(name, n, f, round(p95, 1)) for name, n, f, p95 in truth["requests top"]]
    return [(name, got[name], want[name]) for name in want if got[name] != want[name]]


def test_the_workbook_queries_give_the_local_figures(traffic, con, sampled_con):
    assert workbook_mismatches(traffic, con, sampled_con, _workbook_queries(traffic)) == []


def test_the_workbook_scope_keeps_the_other_application_out(traffic, con):
    tiles = {r["Figure"]: r["Value"] for r in kql_duckdb.records(con, _workbook_queries(traffic, OTHER_IKEY)["headline"])}
    assert (tiles["Requests"], tiles["Dependencies"], tiles["Events"], tiles["Logins"]) == (6, 3, 2, 1)


# -- mutations: each plausible mistake fails the harness ----------------------------------------------

QUERY_MUTATIONS = {
    "count() for sum(ItemCount)": ("sum(ItemCount)", "count()"),
    "inverted Success filter": ("Success == false", "Success == true"),
    "unweighted percentiles": ("percentilesw(DurationMs, ItemCount, ", "percentiles(DurationMs, "),
    "unweighted daily/top p95": ("percentilew(DurationMs, ItemCount, 95)", "percentile(DurationMs, 95)"),
    "users from UserId": ("dcountif(UserAuthenticatedId, isnotempty(UserAuthenticatedId))",
                          "dcountif(UserId, isnotempty(UserId))"),
    "misspelt login event": ('Name == "UserLogin"', 'Name == "UserLogins"'),
    "misspelt CRUD event": ('Name == "CrudActivity"', 'Name == "CrudActivities"'),
    "no scope": ('\n    | where IKey =~ "', '\n    | where IKey !~ "'),
}


@pytest.mark.parametrize("name", QUERY_MUTATIONS)
def test_a_mutated_dashboard_query_fails_the_harness(traffic, con, sampled_con, name):
    old, new = QUERY_MUTATIONS[name]
    query = _query(traffic)
    assert old in query
    assert dashboard_mismatches(traffic, con, sampled_con, query.replace(old, new)) != []


def test_each_request_or_dependency_count_with_count_fails_the_harness(traffic, con, sampled_con):
    """Every single sum(ItemCount) of a request or dependency section matters (events are never sampled)."""
    query = _query(traffic)
    evt_start = query.index("(Evt")
    positions = [i for i in range(evt_start) if query.startswith("sum(ItemCount)", i)]
    assert len(positions) == 6
    for i in positions:
        mutated = query[:i] + "count()" + query[i + len("sum(ItemCount)"):]
        assert dashboard_mismatches(traffic, con, sampled_con, mutated) != [], query[i - 80:i]


WORKBOOK_MUTATIONS = {
    "a tile with count()": ("headline", "(Req | summarize Value = todouble(sum(ItemCount))",
                            "(Req | summarize Value = todouble(count())"),
    "dependency tile with count()": ("headline", "(Dep | summarize Value = todouble(sum(ItemCount))",
                                     "(Dep | summarize Value = todouble(count())"),
    "unweighted p95 tile": ("headline", "percentilew(DurationMs, ItemCount, 95)", "percentile(DurationMs, 95)"),
    "inverted Success filter": ("headline", "Success == false", "Success == true"),
    "users from UserId": ("headline", "dcountif(UserAuthenticatedId, isnotempty(UserAuthenticatedId))",
                          "dcountif(UserId, isnotempty(UserId))"),
    "misspelt login event": ("headline", 'Name == "UserLogin"', 'Name == "UserLogins"'),
    "top operations with count()": ("top-operations", "sum(ItemCount)", "count()"),
    "events not deduplicated": ("events-daily", "| summarize arg_min(TimeGenerated, *) by EventId", "| extend EventId"),
}


@pytest.mark.parametrize("name", WORKBOOK_MUTATIONS)
def test_a_mutated_workbook_query_fails_the_harness(traffic, con, sampled_con, name):
    item, old, new = WORKBOOK_MUTATIONS[name]
    queries = _workbook_queries(traffic)
    assert old in queries[item]
    queries[item] = queries[item].replace(old, new)
    assert workbook_mismatches(traffic, con, sampled_con, queries) != []
