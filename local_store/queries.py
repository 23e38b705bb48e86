"""The dashboard's reads: the usage section rows of a window, from the rollups when they cover it, else raw rows.

The dashboard's window is whole UTC days up to now; for such a window every figure comes from the
rollups (tens of rows per day instead of every raw row). "Now" is the moment the query reads: rows
another worker committed in the milliseconds between the caller computing the window's end and
the read are counted. Any other window, a row dated more than a minute after the end (a clock gone
wrong), or a store whose raw rows were updated or deleted behind the triggers' back, is answered
from the raw tables (slower, exact) until the next start-up rebuilds the rollups.

Top lists merge the compacted days' top rows (see maintenance.compact_day; OTHER rows left out)
with the live rows of the other days: exact while a day has at most TOP_K names, approximate beyond.

Latency percentiles from the rollups: per day (and per request name, or dependency type and target) a histogram over fixed
log-scale buckets, 16 per doubling (each bucket's upper edge is 2^(1/16) = 1.044 times its
lower edge), keeping the count and the smallest and largest duration in each bucket. The
nearest-rank percentile is located exactly (its bucket and its rank within the bucket); its
value is exact when that bucket holds one distinct duration (or the rank is the bucket's first
or last), else interpolated between the bucket's smallest and largest duration, so it is off
by less than 4.4 % of the value at worst.
"""
import itertools
import math

from local_store.rows import DAY_SECONDS, midnight, utc_day
from local_store.schema import DISTINCT_IDS, OTHER


def _row(section, **values):
    """One section row with every column present."""
    row = {"section": section, "day": "", "name": "", "type": "", "target": "", "action": "",
           "count": 0, "failed": 0, "users": 0, "avg_ms": None, "p50_ms": None,
           "p95_ms": None, "p99_ms": None}
    row.update(values)
    return row


# Rows stamped after the window's end but already committed when the dashboard reads: the end
# is "now" as computed a few milliseconds before the read, and the other worker's writer may
# commit rows of those milliseconds in between. They count as "now". A row later than this
# (a clock gone wrong) sends the query to the raw tables, which apply the end exactly.
_NOW_GRACE_S = 60.0


def usage_rows(conn, t0, t1, top):
    """The usage section rows: from the rollups when they cover the window, else from raw rows."""
    users = rollups_cover(conn, t0, t1)
    if users:
        return rollup_usage_rows(conn, utc_day(t0), utc_day(t1), top, users)
    return raw_usage_rows(conn, t0, t1, top)


def rollups_cover(conn, t0, t1):
    """How the rollups answer [t0, t1]: None (they cannot: use the raw rows), "last" or "days".

    They can when t0 is a midnight (UTC), the rollups are complete and no row of t1's day is
    later than t1 (give or take _NOW_GRACE_S): the window is then whole days. Distinct users
    come from each user's last active day ("last": cheap) unless some event is dated after
    t1's day, then from the per-day user tables ("days").
    """
    if t1 < t0 or t0 % DAY_SECONDS:
        return None
    d1 = utc_day(t1)
    complete, later, *latest = conn.execute(
        "SELECT (SELECT value FROM store_meta WHERE key = 'rollups'),"
        " (SELECT 1 FROM ev_day WHERE day > ?1 LIMIT 1),"
        " (SELECT max_ts FROM ev_day_total WHERE day = ?1),"
        " (SELECT max_ts FROM req_day_total WHERE day = ?1),"
        " (SELECT max_ts FROM dep_day_total WHERE day = ?1)", (d1,)).fetchone()
    if complete != "complete" or any(ts is not None and ts > t1 + _NOW_GRACE_S for ts in latest):
        return None
    return "days" if later else "last"


def _avg(total_ms, count):
    """The mean, or None for no rows."""
    return None if not count else total_ms / count


def _percentiles(hist, ps):
    """Nearest-rank percentiles from [(n, min_ms, max_ms)] in bucket order (see the module doc)."""
    total = sum(n for n, _, _ in hist)
    if not total:
        return [None] * len(ps)
    out = []
    for p in ps:
        rank = min(max(math.ceil(p * total), 1), total)  # the smallest rank r with r >= p * n
        below = 0
        for n, lo, hi in hist:
            if below + n >= rank:
                j = rank - below
                if lo == hi or j == 1:
                    value = lo
                elif j == n:
                    value = hi
                else:
                    value = lo + (hi - lo) * (j - 1) / (n - 1)
                out.append(value)
                break
            below += n
    return out


def _window_days(d0, d1):
    """Every day from d0 to d1 (YYYY-MM-DD), inclusive."""
    out, t = [], midnight(d0)
    while (day := utc_day(t)) <= d1:
        out.append(day)
        t += DAY_SECONDS
    return out


def rollup_usage_rows(conn, d0, d1, top, users="last"):
    """The usage section rows for the whole days [d0, d1] from the rollups (see rollups_cover).

    Totals and daily series come from the per-day totals; the top lists from the top lists of
    the compacted days (see maintenance.compact_day, OTHER rows left out) and the live rows of the others.
    """
    days = (d0, d1)
    compacted = [d for (d,) in conn.execute("SELECT day FROM compacted_days WHERE day BETWEEN ? AND ?", days)]

    def source(live, top_table, cols, skip_other):
        """(FROM clause, parameters) of `cols` of the window's per-day rows: top lists and live rows."""
        if not compacted:
            return f"(SELECT {cols} FROM {live} WHERE day BETWEEN ? AND ?)", days
        done = set(compacted)
        live_days = [d for d in _window_days(d0, d1) if d not in done]
        parts = [f"SELECT {cols} FROM {top_table} WHERE day IN ({', '.join('?' * len(compacted))})"
                 + (f" AND {skip_other} <> '{OTHER}'" if skip_other else "")]
        if live_days:
            parts.append(f"SELECT {cols} FROM {live} WHERE day IN ({', '.join('?' * len(live_days))})")
        return "(" + " UNION ALL ".join(parts) + ")", tuple(compacted) + tuple(live_days)

    total, failed, sum_ms = conn.execute(
        "SELECT COALESCE(SUM(n), 0), COALESCE(SUM(failed), 0), SUM(sum_ms) FROM req_day_total"
        " WHERE day BETWEEN ? AND ?", days).fetchone()
    hist = conn.execute(
        "SELECT SUM(n), MIN(min_ms), MAX(max_ms) FROM req_hist_all WHERE day BETWEEN ? AND ?"
        " GROUP BY bucket ORDER BY bucket", days).fetchall()
    p50, p95, p99 = _percentiles(hist, (0.50, 0.95, 0.99))
    yield _row("req_summary", count=total, failed=failed, avg_ms=_avg(sum_ms, total),
               p50_ms=p50, p95_ms=p95, p99_ms=p99)
    p95_by_day = {day: _percentiles([(n, lo, hi) for _, n, lo, hi in buckets], (0.95,))[0]
                  for day, buckets in itertools.groupby(conn.execute(
                      "SELECT day, n, min_ms, max_ms FROM req_hist_all WHERE day BETWEEN ? AND ?"
                      " ORDER BY day, bucket", days), key=lambda r: r[0])}
    for day, count, failed, sum_ms in conn.execute(
            "SELECT day, n, failed, sum_ms FROM req_day_total WHERE day BETWEEN ? AND ?", days):
        yield _row("req_daily", day=day, count=count, failed=failed, avg_ms=_avg(sum_ms, count),
                   p95_ms=p95_by_day.get(day))
    req, req_p = source("req_day", "req_day_top", "name, n, failed", "name")
    top_ops = conn.execute(
        f"SELECT name, SUM(n), SUM(failed) FROM {req} GROUP BY name ORDER BY SUM(n) DESC, name LIMIT ?",
        req_p + (top,)).fetchall()
    for name, count, failed in top_ops:
        hist = conn.execute(
            "SELECT SUM(n), MIN(min_ms), MAX(max_ms) FROM req_hist WHERE name = ? AND day BETWEEN ? AND ?"
            " GROUP BY bucket ORDER BY bucket", (name,) + days).fetchall()
        yield _row("req_top", name=name, count=count, failed=failed, p95_ms=_percentiles(hist, (0.95,))[0])

    total, failed, sum_ms = conn.execute(
        "SELECT COALESCE(SUM(n), 0), COALESCE(SUM(failed), 0), SUM(sum_ms) FROM dep_day_total"
        " WHERE day BETWEEN ? AND ?", days).fetchone()
    yield _row("dep_summary", count=total, failed=failed, avg_ms=_avg(sum_ms, total))
    dep_p95_by_day = {day: _percentiles([(n, lo, hi) for _, n, lo, hi in buckets], (0.95,))[0]
                      for day, buckets in itertools.groupby(conn.execute(
                          "SELECT day, n, min_ms, max_ms FROM dep_hist_all WHERE day BETWEEN ? AND ?"
                          " ORDER BY day, bucket", days), key=lambda r: r[0])}
    for day, count, failed in conn.execute(
            "SELECT day, n, failed FROM dep_day_total WHERE day BETWEEN ? AND ?", days):
        yield _row("dep_daily", day=day, count=count, failed=failed, p95_ms=dep_p95_by_day.get(day))
    dep, dep_p = source("dep_day", "dep_day_top", "type, target, n, failed, sum_ms", "type")
    window = _window_days(d0, d1)  # one seek per day and target
    for typ, target, count, failed, sum_ms in conn.execute(
            f"SELECT type, target, SUM(n), SUM(failed), SUM(sum_ms) FROM {dep}"
            " GROUP BY type, target ORDER BY SUM(n) DESC, target LIMIT ?", dep_p + (top,)).fetchall():
        hist = conn.execute(
            "SELECT SUM(n), MIN(min_ms), MAX(max_ms) FROM dep_hist WHERE type = ? AND target = ?"
            f" AND day IN ({', '.join('?' * len(window))}) GROUP BY bucket ORDER BY bucket",
            (typ, target) + tuple(window)).fetchall()
        yield _row("dep_top", type=typ, target=target, count=count, failed=failed, avg_ms=_avg(sum_ms, count),
                   p95_ms=_percentiles(hist, (0.95,))[0])

    (total,) = conn.execute("SELECT COALESCE(SUM(n), 0) FROM ev_day_total WHERE day BETWEEN ? AND ?",
                            days).fetchone()
    yield _row("evt_summary", count=total)
    users_by_day = dict(conn.execute(
        "SELECT day, users FROM ev_day_users WHERE day BETWEEN ? AND ?", days).fetchall())
    for day, count in conn.execute("SELECT day, n FROM ev_day_total WHERE day BETWEEN ? AND ?", days):
        yield _row("evt_daily", day=day, count=count)
        yield _row("active_daily", day=day, users=users_by_day.get(day, 0))

    def users_of(name):
        if users == "last":
            return conn.execute("SELECT COUNT(*) FROM ev_name_user_last WHERE name = ? AND last_day >= ?",
                                (name, d0)).fetchone()[0]
        return conn.execute("SELECT COUNT(DISTINCT user_id) FROM ev_name_user_day WHERE name = ?"
                            " AND day BETWEEN ? AND ?", (name,) + days).fetchone()[0]

    ev, ev_p = source("ev_day", "ev_day_top", "name, n", "name")
    for name, count in conn.execute(
            f"SELECT name, SUM(n) FROM {ev} GROUP BY name ORDER BY SUM(n) DESC, name LIMIT ?",
            ev_p + (top,)).fetchall():
        yield _row("evt_top", name=name, count=count, users=users_of(name))
    window = _window_days(d0, d1)  # one seek per day, not a scan of every name of the window
    (count,) = conn.execute(f"SELECT COALESCE(SUM(n), 0) FROM ev_day WHERE name = 'UserLogin'"
                            f" AND day IN ({', '.join('?' * len(window))})", window).fetchone()
    yield _row("login_summary", count=count, users=users_of("UserLogin") if count else 0)
    if users == "last":
        (active,) = conn.execute("SELECT COUNT(*) FROM ev_user_last WHERE last_day >= ?", (d0,)).fetchone()
    else:
        (active,) = conn.execute("SELECT COUNT(DISTINCT user_id) FROM ev_user_day WHERE day BETWEEN ? AND ?",
                                 days).fetchone()
    yield _row("active_summary", users=active)
    for kind, _ in DISTINCT_IDS:
        if users == "last":
            (count,) = conn.execute(f"SELECT COUNT(*) FROM ev_{kind}_last WHERE last_day >= ?", (d0,)).fetchone()
        else:
            (count,) = conn.execute(f"SELECT COUNT(DISTINCT id) FROM ev_{kind}_day WHERE day BETWEEN ? AND ?",
                                    days).fetchone()
        yield _row(f"{kind}_summary", users=count)
    for entity, action, count in conn.execute(
            "SELECT entity, action, SUM(n) FROM crud_day WHERE day BETWEEN ? AND ?"
            " GROUP BY entity, action", days):
        yield _row("crud", name=entity, action=action, count=count)


def _percentile_sql(p):
    """Nearest-rank percentile over the ranked CTE `r`."""
    return f"MIN(CASE WHEN rn >= {p} * n THEN duration_ms END)"


def raw_usage_rows(conn, t0, t1, top):
    """Yield the usage section rows from SQL over the three raw tables (any window; exact)."""
    span = (t0, t1)
    ranked = ("WITH r AS (SELECT day, name, duration_ms, success,"
              " ROW_NUMBER() OVER (PARTITION BY {part} ORDER BY duration_ms) AS rn,"
              " COUNT(*) OVER (PARTITION BY {part}) AS n"
              " FROM requests WHERE ts BETWEEN ? AND ?) ")
    q = (ranked.format(part="1") + "SELECT COUNT(*), COALESCE(SUM(success = 0), 0), AVG(duration_ms), "
         + ", ".join(_percentile_sql(p) for p in (0.50, 0.95, 0.99)) + " FROM r")
    total, failed, avg, p50, p95, p99 = conn.execute(q, span).fetchone()
    yield _row("req_summary", count=total, failed=failed, avg_ms=avg, p50_ms=p50, p95_ms=p95, p99_ms=p99)
    q = (ranked.format(part="day") + "SELECT day, COUNT(*), SUM(success = 0), AVG(duration_ms), "
         + _percentile_sql(0.95) + " FROM r GROUP BY day")
    for day, count, failed, avg, p95 in conn.execute(q, span):
        yield _row("req_daily", day=day, count=count, failed=failed, avg_ms=avg, p95_ms=p95)
    q = (ranked.format(part="name") + "SELECT name, COUNT(*), SUM(success = 0), "
         + _percentile_sql(0.95) + " FROM r GROUP BY name ORDER BY COUNT(*) DESC, name LIMIT ?")
    for name, count, failed, p95 in conn.execute(q, span + (top,)):
        yield _row("req_top", name=name, count=count, failed=failed, p95_ms=p95)

    total, failed, avg = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(success = 0), 0), AVG(duration_ms) FROM dependencies"
        " WHERE ts BETWEEN ? AND ?", span).fetchone()
    yield _row("dep_summary", count=total, failed=failed, avg_ms=avg)
    dep_ranked = ("WITH r AS (SELECT day, type, target, duration_ms, success,"
                  " ROW_NUMBER() OVER (PARTITION BY {part} ORDER BY duration_ms) AS rn,"
                  " COUNT(*) OVER (PARTITION BY {part}) AS n"
                  " FROM dependencies WHERE ts BETWEEN ? AND ?) ")
    for day, count, failed, p95 in conn.execute(
            dep_ranked.format(part="day") + "SELECT day, COUNT(*), SUM(success = 0), "
            + _percentile_sql(0.95) + " FROM r GROUP BY day", span):
        yield _row("dep_daily", day=day, count=count, failed=failed, p95_ms=p95)
    for typ, target, count, failed, avg, p95 in conn.execute(
            dep_ranked.format(part="type, target") + "SELECT type, target, COUNT(*), SUM(success = 0),"
            " AVG(duration_ms), " + _percentile_sql(0.95) + " FROM r GROUP BY type, target"
            " ORDER BY COUNT(*) DESC, target LIMIT ?", span + (top,)):
        yield _row("dep_top", type=typ, target=target, count=count, failed=failed, avg_ms=avg, p95_ms=p95)

    (total,) = conn.execute("SELECT COUNT(*) FROM events WHERE ts BETWEEN ? AND ?", span).fetchone()
    yield _row("evt_summary", count=total)
    for day, count, users in conn.execute(
            "SELECT day, COUNT(*), COUNT(DISTINCT NULLIF(user_id, '')) FROM events"
            " WHERE ts BETWEEN ? AND ? GROUP BY day", span):
        yield _row("evt_daily", day=day, count=count)
        yield _row("active_daily", day=day, users=users)
    for name, count, users in conn.execute(
            "SELECT name, COUNT(*), COUNT(DISTINCT NULLIF(user_id, '')) FROM events"
            " WHERE ts BETWEEN ? AND ? GROUP BY name ORDER BY COUNT(*) DESC, name LIMIT ?",
            span + (top,)):
        yield _row("evt_top", name=name, count=count, users=users)
    count, users = conn.execute(
        "SELECT COUNT(*), COUNT(DISTINCT NULLIF(user_id, '')) FROM events"
        " WHERE ts BETWEEN ? AND ? AND name = 'UserLogin'", span).fetchone()
    yield _row("login_summary", count=count, users=users)
    (users,) = conn.execute(
        "SELECT COUNT(DISTINCT NULLIF(user_id, '')) FROM events WHERE ts BETWEEN ? AND ?",
        span).fetchone()
    yield _row("active_summary", users=users)
    for kind, column in DISTINCT_IDS:
        (count,) = conn.execute(f"SELECT COUNT(DISTINCT NULLIF({column}, '')) FROM events WHERE ts BETWEEN ? AND ?",
                                span).fetchone()
        yield _row(f"{kind}_summary", users=count)
    for entity, action, count in conn.execute(
            "SELECT entity, action, COUNT(*) FROM events WHERE ts BETWEEN ? AND ?"
            " AND name = 'CrudActivity' GROUP BY entity, action", span):
        yield _row("crud", name=entity, action=action, count=count)
