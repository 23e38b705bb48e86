"""workbooks/usage.workbook.json: an Azure Monitor Workbook gallery template with the dashboard's sections.

Its structure is checked here, and every query is validated by Microsoft's Kusto language service
(tests/kql_check.py) against the App* table schemas, with `{TimeRange}` replaced by what the
workbook substitutes for it (`> ago(...)` for a relative range, `between (...)` for a custom one).
"""
import json
import os
import re

import pytest

from kql_check import kql_errors

WORKBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workbooks",
                        "usage.workbook.json")
RESOURCE_TYPE = "microsoft.operationalinsights/workspaces"  # the App* tables live in the workspace
IKEY = "11111111-2222-3333-4444-555555555555"
TIME_RANGES = ("> ago(1d)", "between (datetime(2026-11-01T00:00:00Z) .. datetime(2026-11-08T00:00:00Z))")

# item name -> (visualization, text each query must contain)
SECTIONS = {
    "headline": ("tiles", ["AppRequests", "AppDependencies", "AppEvents", "sum(ItemCount)",
                           "sumif(ItemCount, Success == false)", "percentilew(DurationMs, ItemCount, 95)",
                           'Name == "UserLogin"', "dcountif(UserAuthenticatedId, isnotempty(UserAuthenticatedId))",
                           "dcountif(UserId, isnotempty(UserId))", "dcountif(SessionId, isnotempty(SessionId))"]),
    "requests-daily": ("timechart", ["AppRequests", "sum(ItemCount)", "sumif(ItemCount, Success == false)",
                                     "bin(TimeGenerated, 1d)"]),
    "latency-daily": ("timechart", ["AppRequests", "sum(DurationMs * ItemCount)",
                                    "percentilew(DurationMs, ItemCount, 95)", "bin(TimeGenerated, 1d)"]),
    "dependencies-daily": ("timechart", ["AppDependencies", "sum(ItemCount)", "sumif(ItemCount, Success == false)",
                                         "bin(TimeGenerated, 1d)"]),
    "events-daily": ("barchart", ["AppEvents", "sum(ItemCount)", "bin(TimeGenerated, 1d)"]),
    "active-users-daily": ("timechart", ["AppEvents", "dcountif(UserAuthenticatedId, isnotempty(UserAuthenticatedId))",
                                         "bin(TimeGenerated, 1d)"]),
    "top-operations": ("table", ["AppRequests", "sum(ItemCount)", "sumif(ItemCount, Success == false)",
                                 "percentilew(DurationMs, ItemCount, 95)"]),
    "top-targets": ("table", ["AppDependencies", "DependencyType", "Target", "sum(ItemCount)",
                              "sumif(ItemCount, Success == false)"]),
    "top-events": ("table", ["AppEvents", "sum(ItemCount)",
                             "dcountif(UserAuthenticatedId, isnotempty(UserAuthenticatedId))"]),
    "crud": ("table", ["AppEvents", 'Name == "CrudActivity"', "Properties.entity", "Properties.action",
                       "sumif(ItemCount"]),
}
HEADLINE_FIGURES = ["Requests", "Failed requests", "Request p95", "Dependencies", "Events", "Logins",
                    "Unique users", "Anonymous visitors", "Sessions"]


@pytest.fixture(scope="module")
def workbook():
    with open(WORKBOOK, encoding="utf-8") as fh:
        return json.load(fh)


def _queries(workbook):
    return {item["name"]: item["content"] for item in workbook["items"] if item["type"] == 3}


def test_it_is_a_gallery_template_with_a_time_range(workbook):
    assert workbook["version"] == "Notebook/1.0"
    assert {item["type"] for item in workbook["items"]} == {1, 3, 9}
    assert len({item["name"] for item in workbook["items"]}) == len(workbook["items"])  # names are unique
    parameter_items = [item for item in workbook["items"] if item["type"] == 9]
    assert len(parameter_items) == 1 and workbook["items"].index(parameter_items[0]) < min(
        i for i, item in enumerate(workbook["items"]) if item["type"] == 3)  # set before any query uses it
    (time_range,) = [p for p in parameter_items[0]["content"]["parameters"] if p["name"] == "TimeRange"]
    assert time_range["type"] == 4 and time_range["isRequired"] is True
    assert time_range["value"] == {"durationMs": 30 * 86400 * 1000}  # the dashboard's default, 30 days
    assert {"durationMs": 90 * 86400 * 1000} in time_range["typeSettings"]["selectableValues"]
    (ikey,) = [p for p in parameter_items[0]["content"]["parameters"] if p["name"] == "IKey"]
    assert ikey["type"] == 1 and ikey["isRequired"] is True  # text: the application's instrumentation key


def test_every_section_of_the_dashboard_is_there(workbook):
    queries = _queries(workbook)
    assert set(queries) == set(SECTIONS)
    for name, (visualization, needed) in SECTIONS.items():
        content = queries[name]
        assert content["version"] == "KqlItem/1.0"
        assert content["queryType"] == 0 and content["resourceType"] == RESOURCE_TYPE, name
        assert content["visualization"] == visualization, name
        assert content["title"], name
        missing = [text for text in needed if text not in content["query"]]
        assert not missing, (name, missing)
    headings = [item["content"]["json"] for item in workbook["items"] if item["type"] == 1]
    assert headings[0].startswith("# Usage")
    for heading in ("## Headline figures", "## Requests", "## Dependencies", "## Events and users",
                    "## CRUD by entity and action"):
        assert heading in headings
    headline = queries["headline"]
    for figure in HEADLINE_FIGURES:
        assert f'Figure = "{figure}"' in headline["query"], figure
    tiles = headline["tileSettings"]
    assert (tiles["titleContent"]["columnMatch"], tiles["leftContent"]["columnMatch"]) == ("Figure", "Value")


def test_every_query_filters_on_the_time_range_and_the_application(workbook):
    for name, content in _queries(workbook).items():
        query = content["query"]
        tables = re.findall(r"\b(App[A-Za-z]+)\b", query)
        assert tables, name
        # Each table read is followed by the workbook's time filter and the application's key.
        reads = re.findall(r"\bApp[A-Za-z]+\s*\|\s*where TimeGenerated \{TimeRange\}\s*\|\s*where IKey =~ \"\{IKey\}\"", query)
        assert len(reads) == len(tables), name
        assert set(re.findall(r"\{[^}]*\}", query)) == {"{TimeRange}", "{IKey}"}, name  # no other placeholder
        # Events are counted once per event_id, as the dashboard counts them.
        assert query.count("summarize arg_min(TimeGenerated, *) by EventId = tostring(Properties.event_id)") == \
            tables.count("AppEvents"), name


@pytest.mark.parametrize("time_range", TIME_RANGES)
def test_every_query_is_valid_kql(workbook, time_range):
    queries = _queries(workbook)
    texts = [content["query"].replace("{TimeRange}", time_range).replace("{IKey}", IKEY) for content in queries.values()]
    errors = dict(zip(queries, kql_errors(texts)))
    assert errors == {name: [] for name in queries}


def test_the_validator_sees_a_broken_workbook_query(workbook):
    """The harness really analyses these queries: a misspelt column inside the headline's union is an error."""
    query = _queries(workbook)["headline"]["query"].replace("{TimeRange}", TIME_RANGES[0])
    broken = query.replace("dcountif(SessionId, isnotempty(SessionId))", "dcountif(SessionIdX, isnotempty(SessionIdX))")
    assert broken != query
    (errors,) = kql_errors([broken])
    assert errors and "SessionIdX" in errors[0]["message"]
