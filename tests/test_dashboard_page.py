"""The /dashboard page in a real headless Chromium, over a seeded local store (and an Azure app without a workspace)."""
import os
import re
import threading

import pytest
from werkzeug.serving import make_server

from app import create_app
from browser_harness import console, wait_for
from fake_ingestion import FakeIngestion
from monitoring_utils import get_usage_stats
from telemetry import monitor_of
from usage_tracking import log_crud_activity, log_user_login

OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
TOKEN = "dashboard-secret"


class Served:
    """An app served by werkzeug on 127.0.0.1 in a thread."""

    def __init__(self, app):
        self.app = app
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        monitor_of(self.app).close()


def _seed(app):
    """Requests (one failing route), a dependency-free mix of events, logins and CRUD."""
    client = app.test_client()
    app.add_url_rule("/items/<int:item_id>", view_func=lambda item_id: ("", 204 if item_id else 500))
    for i in range(12):
        client.get(f"/items/{i % 4}")
    client.post("/events", json={"events": [
        {"event_name": "ReportExported", "anonymous_id": f"anon-{i % 3}", "session_id": f"s-{i}"} for i in range(5)]})
    with app.test_request_context():
        for user in (1, 2, 2):
            log_user_login(user)
        log_crud_activity("update", 1, "invoice")
        log_crud_activity("create", 2, "customer")
    assert monitor_of(app).flush()


@pytest.fixture
def seeded(tmp_path):
    app = create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "seeded.db"), "LOCAL_FLUSH_INTERVAL": "0.01"})
    _seed(app)
    served = Served(app)
    yield served
    served.close()


def _open(driver, served, width=1280, height=800):
    driver.set_window_size(width, height)
    driver.get(served.url + "/dashboard")


def _metrics(driver):
    return driver.execute_script(
        "var out = {}; document.querySelectorAll('[data-metric]').forEach(function (e) {"
        " out[e.dataset.metric] = e.textContent; }); return out;")


def _value(text):
    """The number a formatted figure shows ('1,234', '12.5 ms'), or None for '–'."""
    if text == "–":
        return None
    return float(text.replace(",", "").replace(" ms", ""))


def _json_value(report, path):
    value = report
    for key in path.split("."):
        value = value[key]
    return value


def _visible(driver, element_id):
    return driver.execute_script(f"return !document.getElementById('{element_id}').hidden;")


def test_every_figure_equals_the_json_and_the_charts_render(driver, seeded):
    _open(driver, seeded)
    wait_for(lambda: _visible(driver, "report"), message="the report")
    # The page's own requests are recorded too: settle them, read the report without a request
    # (so it records nothing), then let the page query that same state again.
    assert monitor_of(seeded.app).flush()
    with seeded.app.app_context():
        report = get_usage_stats(30)
    before = driver.find_element("id", "updated").get_attribute("datetime")
    driver.find_element("id", "refresh").click()
    wait_for(lambda: driver.find_element("id", "updated").get_attribute("datetime") != before, message="a refresh")
    shown = _metrics(driver)
    assert set(shown) == {"requests.total", "requests.failed", "requests.p95_ms", "dependencies.total", "events.total",
                          "users.logins", "users.unique_users", "users.anonymous", "users.sessions"}
    for path, text in shown.items():
        expected = _json_value(report, path)
        if expected is None or _value(text) is None:
            assert _value(text) == expected, (path, text, expected)
        else:  # shown to one decimal: JavaScript's toFixed and Python's round may part at a tie (28.15)
            assert abs(_value(text) - expected) <= 0.05 + 1e-9, (path, text, expected)
    assert shown["users.logins"] == "3" and shown["users.anonymous"] == "3"
    share = 100 * report["requests"]["failed"] / report["requests"]["total"]
    assert report["requests"]["failed"] == 3, "3 of the 12 seeded requests failed"
    assert driver.find_element("id", "failed-share").text == f"{share:.1f} %"
    assert driver.find_element("id", "source").text == "local"
    for name in ("requests", "latency", "dependencies", "events", "users"):
        marks = driver.execute_script(
            f"return document.querySelectorAll('[data-chart=\"{name}\"] svg rect, [data-chart=\"{name}\"] svg circle,"
            f" [data-chart=\"{name}\"] svg polyline').length;")
        assert marks > 0, f"the {name} chart is empty"
    rows = driver.execute_script(
        "return Array.from(document.querySelectorAll('[data-table=\"operations\"] tbody tr'))"
        ".map(function (r) { return Array.from(r.cells).map(function (c) { return c.textContent; }); });")
    assert ["GET /items/<int:item_id>", "12", "3"] == rows[0][:3]
    crud = driver.execute_script("return document.querySelector('[data-table=\"crud\"] tbody').textContent;")
    assert "invoice" in crud and "customer" in crud
    assert "Content Security Policy" not in console(driver), "the page breaks its own CSP"


def test_the_page_requests_nothing_outside_its_origin_and_fits_360px(driver, seeded):
    os.makedirs(OUTPUT, exist_ok=True)
    _open(driver, seeded)
    wait_for(lambda: _visible(driver, "report"), message="the report")
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(function (e) { return e.name; });")
    assert resources and all(r.startswith(seeded.url + "/") for r in resources), resources
    driver.save_screenshot(os.path.join(OUTPUT, "dashboard-1280x800.png"))
    _open(driver, seeded, 360, 800)
    wait_for(lambda: _visible(driver, "report"), message="the report at 360 px")
    overflow = driver.execute_script("return document.documentElement.scrollWidth - document.documentElement.clientWidth;")
    assert overflow <= 0, f"the page scrolls sideways by {overflow} px at 360 px"
    driver.save_screenshot(os.path.join(OUTPUT, "dashboard-360x800.png"))
    assert os.path.getsize(os.path.join(OUTPUT, "dashboard-360x800.png")) > 10000


def test_days_selector_reloads_the_report(driver, seeded):
    _open(driver, seeded)
    wait_for(lambda: _visible(driver, "report"), message="the report")
    driver.execute_script("var s = document.getElementById('days'); s.value = '7'; s.dispatchEvent(new Event('change'));")
    wait_for(lambda: driver.execute_script(
        "return document.querySelectorAll('[data-chart=\"events\"] svg rect').length;") == 7, message="7 daily bars")


def test_token_flow_keeps_the_token_out_of_urls(driver, tmp_path):
    app = create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "t.db"), "DASHBOARD_TOKEN": TOKEN})
    _seed(app)
    served = Served(app)
    try:
        _open(driver, served)
        wait_for(lambda: _visible(driver, "token-form"), message="the token form")
        assert not _visible(driver, "report")
        driver.find_element("id", "token").send_keys("wrong")
        driver.find_element("css selector", "#token-form button").click()
        wait_for(lambda: _visible(driver, "token-form") and driver.execute_script(
            "return sessionStorage.getItem('usage-dashboard-token');") is None, message="the wrong token refused")
        driver.find_element("id", "token").send_keys(TOKEN)
        driver.find_element("css selector", "#token-form button").click()
        wait_for(lambda: _visible(driver, "report"), message="the report after the token")
        assert driver.execute_script("return sessionStorage.getItem('usage-dashboard-token');") == TOKEN
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(function (e) { return e.name; });")
        assert all(TOKEN not in r for r in resources + [driver.current_url]), "the token never goes in a URL"
        driver.refresh()
        wait_for(lambda: _visible(driver, "report"), message="the report after a reload (sessionStorage)")
        driver.find_element("id", "sign-out").click()
        wait_for(lambda: _visible(driver, "token-form"), message="the token form after signing out")
        assert driver.execute_script("return sessionStorage.getItem('usage-dashboard-token');") is None
    finally:
        driver.execute_script("sessionStorage.clear();")
        served.close()


def test_empty_state(driver, tmp_path):
    served = Served(create_app({"TESTING": True, "TELEMETRY_DB": str(tmp_path / "empty.db")}))
    try:
        driver.get(served.url + "/")  # `/` redirects to the dashboard
        wait_for(lambda: _visible(driver, "empty"), message="the empty state")
        assert driver.current_url == served.url + "/dashboard"
        assert re.search(r"curl .*/event", driver.find_element("id", "empty").text, re.S)
    finally:
        served.close()


def test_unavailable_source_shows_the_message_and_a_retry(driver, tmp_path):
    fake = FakeIngestion().start()
    app = create_app({"TESTING": True, "APPLICATIONINSIGHTS_CONNECTION_STRING": fake.connection_string,
                      "DASHBOARD_AUTH": "off", "TELEMETRY_STORAGE": str(tmp_path / "outbox")})
    served = Served(app)
    try:
        _open(driver, served)
        wait_for(lambda: _visible(driver, "status"), message="the error state")
        assert "LOG_ANALYTICS_WORKSPACE_ID" in driver.find_element("id", "status-message").text
        assert _visible(driver, "retry")
        driver.find_element("id", "retry").click()
        wait_for(lambda: _visible(driver, "status"), message="the error state again after a retry")
    finally:
        served.close()
        fake.stop()
