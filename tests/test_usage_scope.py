"""The Azure usage query counts one application's telemetry (USAGE_IKEY) and each event_id once.

What the scope and the de-duplication compute is proven by running the query (test_kql_executed.py);
here: the setting, its default, its validation and its way into the query text that is sent.
"""
import json
import time
from datetime import datetime, timezone

import pytest
from azure.core.credentials import AccessToken

import config
from app import create_app
from kql_check import kql_errors
from log_analytics import LogAnalyticsUsageSource
from usage_kql import COLUMNS, usage_query
from telemetry import monitor_of

IKEY = "11111111-2222-3333-4444-555555555555"
OTHER = "99999999-8888-7777-6666-555555555555"
WORKSPACE = "00000000-1111-2222-3333-444444444444"
URL = f"https://api.loganalytics.io/v1/workspaces/{WORKSPACE}/query"
START, END = datetime(2026, 11, 1, tzinfo=timezone.utc), datetime(2026, 11, 8, tzinfo=timezone.utc)
DEDUP = ("| summarize arg_min(TimeGenerated, Name, ItemCount, UserAuthenticatedId, UserId, SessionId, Properties)\n"
         "        by EventId = tostring(Properties.event_id));")


class FakeCredential:
    """A TokenCredential that never touches the network."""

    def get_token(self, *scopes, **kwargs):
        return AccessToken("test-token", int(time.time()) + 3600)


def test_the_scoped_query_filters_every_table_on_the_key_and_is_valid_kql():
    query = usage_query(START, END, 10, IKEY.upper())
    assert query.count(f'| where IKey =~ "{IKEY}"') == 3
    assert query.count(DEDUP) == 1 and query.index(DEDUP) > query.index("let Evt = materialize(AppEvents")
    assert "IKey" not in usage_query(START, END, 10)
    assert kql_errors([query, usage_query(START, END, 10)]) == [[], []]


@pytest.mark.parametrize("ikey", ["", "x", f'{IKEY}" or true or "', 42])
def test_a_key_that_is_not_a_guid_is_refused(ikey):
    with pytest.raises(ValueError):
        usage_query(START, END, 10, ikey)
    with pytest.raises(ValueError):
        LogAnalyticsUsageSource(WORKSPACE, FakeCredential(), ikey=ikey)


def _azure_app(tmp_path, **extra):
    return create_app({"TESTING": True, "TELEMETRY_STORAGE": str(tmp_path),
                       "APPLICATIONINSIGHTS_CONNECTION_STRING": f"InstrumentationKey={IKEY.upper()};"
                                                                "IngestionEndpoint=http://127.0.0.1:9/",
                       "LOG_ANALYTICS_WORKSPACE_ID": WORKSPACE, **extra}, credential=FakeCredential())


def _sent_query(app, requests_mock):
    """The KQL the app's dashboard sends to Log Analytics."""
    body = {"tables": [{"name": "PrimaryResult", "columns": [{"name": n, "type": t} for n, t in COLUMNS],
                        "rows": []}]}
    requests_mock.post(URL, json=body)
    try:
        assert app.test_client().get("/dashboard/usage?days=7").status_code == 200
    finally:
        monitor_of(app).close()
    return json.loads(requests_mock.request_history[0].body)["query"]


def test_by_default_the_dashboard_counts_the_connection_strings_key(tmp_path, requests_mock):
    app = _azure_app(tmp_path)
    assert monitor_of(app).settings.usage_ikey == IKEY
    assert f'| where IKey =~ "{IKEY}"' in _sent_query(app, requests_mock)


def test_usage_ikey_counts_another_key(tmp_path, requests_mock):
    app = _azure_app(tmp_path, USAGE_IKEY=OTHER)
    query = _sent_query(app, requests_mock)
    assert f'| where IKey =~ "{OTHER}"' in query and IKEY not in query


@pytest.mark.parametrize("value", ["not-a-guid", f'{IKEY}"'])
def test_a_bad_usage_ikey_is_refused_at_start_naming_it(tmp_path, value):
    with pytest.raises(config.ConfigError) as info:
        _azure_app(tmp_path, USAGE_IKEY=value)
    assert "USAGE_IKEY" in str(info.value)
