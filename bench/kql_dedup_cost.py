"""What counting each event_id once costs the usage query: 1,000,000 AppEvents rows, run on DuckDB.

Builds AppEvents (30 days, 1 % of the rows a second copy of the previous event_id, logins, CRUD
and 50 other names, 5,000 users, 20,000 anonymous ids and sessions) in an in-memory DuckDB, and
runs the dashboard's usage query (log_analytics.usage_query, scoped to one key) through duckdb-kql
(tests/kql_duckdb.py) as it is and as it was before events were de-duplicated (no `materialize(...
| summarize arg_min(TimeGenerated, ...) by EventId)`): median of --repeat runs each, after one
warm-up. Prints one JSON line.

This measures DuckDB on this machine, not Log Analytics: it says what the extra step costs
relative to the rest of the query, not how long the query takes in Azure.
Needs requirements-dev.txt (duckdb-kql).
"""
import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import appinsights_tables  # noqa: E402
import kql_duckdb  # noqa: E402
from usage_kql import usage_query  # noqa: E402

IKEY = "11111111-2222-3333-4444-555555555555"
DEDUP = ("\n    | summarize arg_min(TimeGenerated, Name, ItemCount, UserAuthenticatedId, UserId, SessionId, Properties)"
         "\n        by EventId = tostring(Properties.event_id));")


def load(con, rows, start):
    """Fill AppEvents with `rows` events over the 30 days from `start` (1 % duplicated event_ids)."""
    appinsights_tables.create_tables(con)
    con.execute(f"""
        INSERT INTO AppEvents (TimeGenerated, IKey, ItemCount, Name, Properties, UserAuthenticatedId, UserId,
                               SessionId, OperationId)
        SELECT TIMESTAMP '{start:%Y-%m-%d %H:%M:%S}' + to_seconds((k * 2592000 // {rows})::BIGINT),
               '{IKEY}', 1,
               CASE WHEN i % 20 = 0 THEN 'UserLogin' WHEN i % 10 = 1 THEN 'CrudActivity' ELSE 'Event' || (i % 50) END,
               json_object('event_id', md5(k::VARCHAR), 'entity', 'entity' || (i % 7),
                           'action', ['create', 'read', 'update', 'delete'][1 + i % 4]),
               CASE WHEN i % 3 = 0 THEN 'user' || (i % 5000) ELSE '' END, 'anon' || (i % 20000),
               'session' || (i % 20000), md5(i::VARCHAR)
        FROM (SELECT i, CASE WHEN i % 100 = 0 THEN i - 1 ELSE i END AS k FROM range(1, {rows} + 1) t(i))
    """)


def timed(con, kql, repeat):
    """Median seconds of `repeat` runs of a KQL query (after one warm-up run)."""
    kql_duckdb.run(con, kql)
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        kql_duckdb.run(con, kql)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main():
    """Load the rows, time both queries, print the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    end = datetime(2026, 12, 1, tzinfo=timezone.utc)
    start = end - timedelta(days=30)
    con = kql_duckdb.connect()
    load(con, args.rows, start)
    query = usage_query(start, end, 10, IKEY)
    assert DEDUP in query
    with_dedup = timed(con, query, args.repeat)
    before = query.replace("let Evt = materialize(AppEvents", "let Evt = AppEvents").replace(DEDUP, ";")
    without = timed(con, before, args.repeat)  # the query as it was: every copy counted
    print(json.dumps({"rows": args.rows, "repeat": args.repeat, "with_dedup_ms": round(with_dedup * 1000, 1),
                      "without_dedup_ms": round(without * 1000, 1), "ratio": round(with_dedup / without, 2)}))


if __name__ == "__main__":
    main()
