"""Application Insights envelopes as rows of the Log Analytics App* tables, in DuckDB: the one place the mapping lives.

Ingestion turns each accepted envelope into one row of a workspace table; the columns used here,
per the table references (tests/kql/app_tables.json lists every column and its type):

=========================  ===========================================================================
Envelope                   Column
=========================  ===========================================================================
data.baseType              the table: RequestData -> AppRequests, RemoteDependencyData -> AppDependencies,
                           EventData -> AppEvents (others are not read by the dashboard)
time                       TimeGenerated (a request's or dependency's start; an event's own time)
iKey                       IKey
sampleRate (percent)       ItemCount = 100 / sampleRate, rounded to a whole number; 1 without sampleRate
tags ai.operation.id       OperationId
tags ai.operation.parentId ParentId
tags ai.operation.name     OperationName
tags ai.user.authUserId    UserAuthenticatedId
tags ai.user.id            UserId
tags ai.session.id         SessionId
baseData.name              Name
baseData.properties        Properties (dynamic)
baseData.id                Id (requests, dependencies)
baseData.duration          DurationMs (d.hh:mm:ss.ffffff in milliseconds)
baseData.success           Success
baseData.responseCode      ResultCode (requests); baseData.resultCode for dependencies
baseData.url               Url (requests)
baseData.type / target     DependencyType / Target (dependencies)
baseData.data              Data (dependencies)
=========================  ===========================================================================

Every other column of the documented schema exists too: an empty string for a string column (a
Kusto string is never null), null otherwise.
"""
import json
import math
from datetime import datetime, timezone
from pathlib import Path

SCHEMAS = json.loads((Path(__file__).resolve().parent / "kql" / "app_tables.json").read_text())
TABLES = {"RequestData": "AppRequests", "RemoteDependencyData": "AppDependencies", "EventData": "AppEvents"}
_DUCKDB_TYPES = {"string": "VARCHAR", "datetime": "TIMESTAMP", "real": "DOUBLE", "int": "INTEGER",
                 "long": "BIGINT", "bool": "BOOLEAN", "dynamic": "JSON"}
_TAGS = {"OperationId": "ai.operation.id", "ParentId": "ai.operation.parentId",
         "OperationName": "ai.operation.name", "UserAuthenticatedId": "ai.user.authUserId",
         "UserId": "ai.user.id", "SessionId": "ai.session.id"}


def item_count(envelope):
    """ItemCount as ingestion sets it: 100 / sampleRate (a whole number), 1 when the item was not sampled."""
    rate = envelope.get("sampleRate")
    return 1 if rate is None else round(100.0 / rate)


def duration_ms(text):
    """An envelope duration, d.hh:mm:ss.ffffff, in milliseconds."""
    days, _, clock = text.partition(".")
    hours, minutes, seconds = clock.split(":")
    return ((int(days) * 24 + int(hours)) * 60 + int(minutes)) * 60000 + float(seconds) * 1000


def _time(text):
    """An envelope time (ISO 8601, Z) as a naive UTC datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc).replace(tzinfo=None)


def row(envelope):
    """(table, {column: value}) for one envelope."""
    data = envelope["data"]
    table, base = TABLES[data["baseType"]], data["baseData"]
    tags = envelope.get("tags", {})
    values = {"TimeGenerated": _time(envelope["time"]), "IKey": envelope["iKey"], "ItemCount": item_count(envelope),
              "Name": base.get("name", ""), "Properties": json.dumps(base.get("properties") or {}),
              "Type": table, **{column: tags.get(tag, "") for column, tag in _TAGS.items()}}
    if table == "AppRequests":
        values.update(Id=base["id"], DurationMs=duration_ms(base["duration"]), Success=base["success"],
                      ResultCode=base["responseCode"], Url=base.get("url", ""))
    elif table == "AppDependencies":
        values.update(Id=base["id"], DurationMs=duration_ms(base["duration"]), Success=base["success"],
                      ResultCode=base.get("resultCode", ""), DependencyType=base.get("type", ""),
                      Target=base.get("target", ""), Data=base.get("data", ""))
    return table, values


def create_tables(con):
    """Create empty AppRequests, AppDependencies and AppEvents with their documented columns."""
    for table in TABLES.values():
        columns = ", ".join(f'"{name}" {_DUCKDB_TYPES[kind]}' for name, kind in SCHEMAS[table].items())
        con.execute(f'CREATE OR REPLACE TABLE "{table}" ({columns})')


def load(con, envelopes):
    """Create the tables and insert one row per envelope of the three kinds (others are skipped)."""
    create_tables(con)
    by_table = {table: [] for table in TABLES.values()}
    for envelope in envelopes:
        if envelope.get("data", {}).get("baseType") in TABLES:
            table, values = row(envelope)
            by_table[table].append(values)
    for table, rows in by_table.items():
        if not rows:
            continue
        schema = SCHEMAS[table]
        names = list(schema)
        marks = ", ".join("CAST(? AS JSON)" if schema[n] == "dynamic" else "?" for n in names)
        con.executemany(f'INSERT INTO "{table}" VALUES ({marks})',
                        [[_cell(values, n, schema[n]) for n in names] for values in rows])


def _cell(values, name, kind):
    """A column's value, or the default of an unmapped column ('' for a string, else null)."""
    if name in values:
        return values[name]
    return "" if kind == "string" else None


def nearest_rank(pairs, percent):
    """The weighted nearest-rank percentile of [(value, weight)], each value counted `weight` times; None when empty."""
    expanded = sorted(v for v, w in pairs for _ in range(w))
    if not expanded:
        return None
    return expanded[max(1, math.ceil(percent / 100.0 * len(expanded))) - 1]
