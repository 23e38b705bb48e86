"""The KQL harness both rejects bad queries and accepts good ones."""

import pytest

from kql_check import kql_errors

REALISTIC = """
let startTime = datetime(2024-06-01T00:00:00Z);
let endTime = datetime(2024-06-08);
let requests = AppRequests
    | where TimeGenerated between (startTime .. endTime)
    | extend Action = tostring(Properties.action), Kind = "request";
let dependencies = AppDependencies
    | where TimeGenerated between (startTime .. endTime)
    | extend Action = tostring(Properties.action), Kind = "dependency";
union requests, dependencies
| extend Day = startofday(TimeGenerated)
| summarize Users = dcount(UserId),
            Calls = sum(ItemCount),
            Failures = sumif(ItemCount, Success == false),
            (P50, P95, P99) = percentilesw(DurationMs, ItemCount, 50, 95, 99)
    by Day, Kind, Action
| project Day = format_datetime(Day, 'yyyy-MM-dd'), Kind, Action, Users, Calls, Failures, P50, P95, P99
"""

QUERIES = {
    "valid": "AppRequests | where TimeGenerated > ago(1d) "
    "| summarize total=sum(ItemCount), p95=percentile(DurationMs, 95) by bin(TimeGenerated, 1d)",
    "unknown_column": "AppRequests | where DurationMsX > 1",
    "unknown_table": "AppRequestz | take 10",
    "type_error": "AppEvents | summarize sum(Name)",
    "realistic": REALISTIC,
}


@pytest.fixture(scope="module")
def errors():
    """Errors per query name, from one validate.js run (node startup is ~2.5 s)."""
    return dict(zip(QUERIES, kql_errors(list(QUERIES.values()))))


def test_valid_query_has_no_errors(errors):
    """A plain AppRequests aggregation is accepted."""
    assert errors["valid"] == []


def test_unknown_column_is_an_error(errors):
    """A misspelt column is reported."""
    assert errors["unknown_column"] and "DurationMsX" in errors["unknown_column"][0]["message"]


def test_unknown_table_is_an_error(errors):
    """A table missing from app_tables.json is reported."""
    assert errors["unknown_table"] and "AppRequestz" in errors["unknown_table"][0]["message"]


def test_type_error_is_an_error(errors):
    """sum() over a string column is reported as an Error."""
    assert errors["type_error"]
    assert all(e["severity"] == "Error" for e in errors["type_error"])


def test_realistic_multi_statement_query_has_no_errors(errors):
    """let/union/extend/summarize/project with real functions is accepted."""
    assert errors["realistic"] == []
