"""Usage statistics for the dashboard: one JSON shape, built from local or Log Analytics rows."""
from datetime import datetime, timedelta, timezone

from telemetry import current_monitor
from usage_tracking import CRUD_ACTIONS


class UsageSourceUnavailable(Exception):
    """No usage source is configured (Azure mode without LOG_ANALYTICS_WORKSPACE_ID)."""


def usage_window(days, now=None):
    """[start, end]: midnight UTC `days - 1` days ago until now, so there are exactly `days` dates."""
    end = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    start = datetime.combine(end.date() - timedelta(days=days - 1), datetime.min.time(), timezone.utc)
    return start, end


def get_usage_stats(days=30):
    """Usage statistics for the last `days` days from the current app's usage source."""
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 90:
        raise ValueError("days must be an integer between 1 and 90")
    monitor = current_monitor()
    if monitor.source is None:
        raise UsageSourceUnavailable("LOG_ANALYTICS_WORKSPACE_ID is not set")
    start, end = usage_window(days)
    return build_usage(monitor.usage_rows(start, end), start, end, days, monitor.source_name)


def _iso(dt):
    """ISO-8601 UTC with a Z suffix."""
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _num(value):
    """A latency as a rounded float, or None."""
    return None if value is None else round(float(value), 3)


def _daily(rows, dates, *fields, ms=()):
    """One zero-filled entry per date, oldest first; the `ms` latency fields are null on a day without data."""
    by_day = {r["day"]: r for r in rows}
    out = []
    for date in dates:
        row = by_day.get(date, {})
        entry = {"date": date, **{f: int(row.get(f) or 0) for f in fields}}
        entry.update({f: _num(row.get(f)) for f in ms})
        out.append(entry)
    return out


def build_usage(rows, start, end, days, source):
    """Turn section rows into the dashboard's JSON document."""
    sections = {}
    for row in rows:
        sections.setdefault(row["section"], []).append(row)

    def one(name):
        found = sections.get(name)
        return found[0] if found else {}

    def many(name):
        return sections.get(name, [])

    dates = [(start.date() + timedelta(days=i)).isoformat() for i in range(days)]
    req, dep, evt = one("req_summary"), one("dep_summary"), one("evt_summary")
    login, active = one("login_summary"), one("active_summary")
    by_action = {a: 0 for a in CRUD_ACTIONS}
    by_entity = {}
    for row in many("crud"):
        action = (row.get("action") or "").lower()
        if action not in by_action:
            continue
        by_action[action] += int(row["count"])
        entity = by_entity.setdefault(row["name"], {"entity": row["name"], **{a: 0 for a in CRUD_ACTIONS}})
        entity[action] += int(row["count"])
    return {
        "source": source,
        "generated_at": _iso(datetime.now(timezone.utc)),
        "timespan": {"start": _iso(start), "end": _iso(end), "days": days},
        "requests": {
            "total": int(req.get("count") or 0),
            "failed": int(req.get("failed") or 0),
            "avg_ms": _num(req.get("avg_ms")),
            "p50_ms": _num(req.get("p50_ms")),
            "p95_ms": _num(req.get("p95_ms")),
            "p99_ms": _num(req.get("p99_ms")),
            "daily": _daily(many("req_daily"), dates, "count", "failed", ms=("avg_ms", "p95_ms")),
            "top_operations": [
                {"name": r["name"], "count": int(r["count"]), "failed": int(r["failed"] or 0),
                 "p95_ms": _num(r["p95_ms"])} for r in many("req_top")],
        },
        "dependencies": {
            "total": int(dep.get("count") or 0),
            "failed": int(dep.get("failed") or 0),
            "avg_ms": _num(dep.get("avg_ms")),
            "daily": _daily(many("dep_daily"), dates, "count", "failed", ms=("p95_ms",)),
            "top_targets": [
                {"type": r["type"], "target": r["target"], "count": int(r["count"]),
                 "failed": int(r["failed"] or 0), "avg_ms": _num(r["avg_ms"]), "p95_ms": _num(r.get("p95_ms"))}
                for r in many("dep_top")],
        },
        "events": {
            "total": int(evt.get("count") or 0),
            "daily": _daily(many("evt_daily"), dates, "count"),
            "top": [{"name": r["name"], "count": int(r["count"]), "users": int(r["users"] or 0)}
                    for r in many("evt_top")],
        },
        "users": {
            "logins": int(login.get("count") or 0),
            "unique_users": int(active.get("users") or 0),
            "anonymous": int(one("anonymous_summary").get("users") or 0),
            "sessions": int(one("session_summary").get("users") or 0),
            "daily_active": _daily(many("active_daily"), dates, "users"),
        },
        "crud": {
            "total": sum(by_action.values()),
            "by_action": by_action,
            "by_entity": sorted(by_entity.values(), key=lambda e: (-sum(e[a] for a in CRUD_ACTIONS), e["entity"])),
        },
    }
