"""Flask CLI commands of the extension: `flask usage` and `flask telemetry status|drain`.

UsageMonitor.init_app registers them on `app.cli`, so they work for `flask --app app ...` and for
any host app that has the extension. Nothing here touches the exporters' internals: the Azure
sink's `outbox()` and `drain()` do.
"""
import json
import os
import pathlib
import sqlite3

import click
from flask import current_app
from flask.cli import AppGroup, with_appcontext

from local_store.connection import sqlite_connect
from log_analytics import UsageQueryError
from monitoring_utils import UsageSourceUnavailable, get_usage_stats
from telemetry import monitor_of
from usage_tracking import CRUD_ACTIONS

_MB = 1024 * 1024
_LOCAL_TABLES = ("events", "requests", "dependencies", "traces")


# -- flask usage ------------------------------------------------------------------------------------

@click.command("usage")
@click.option("--days", type=click.IntRange(1, 90), default=30, show_default=True,
              help="Days in the window, today (UTC) included.")
@click.option("--json", "as_json", is_flag=True, help="Print GET /dashboard/usage's JSON instead of tables.")
@with_appcontext
def usage_command(days, as_json):
    """Usage statistics: the report of GET /dashboard/usage, from the same source."""
    try:
        stats = get_usage_stats(days)
    except UsageSourceUnavailable as exc:
        raise click.ClickException(f"no usage source: {exc}") from None
    except UsageQueryError as exc:
        later = f"; retry after {exc.retry_after} s" if exc.retry_after else ""
        raise click.ClickException(f"usage query failed: {exc.message}{later}") from None
    click.echo(json.dumps(stats, sort_keys=False, indent=2) if as_json else render_usage(stats))


def render_usage(stats):
    """The usage report as aligned plain-text tables."""
    req, dep, evt, users, crud = (stats[k] for k in ("requests", "dependencies", "events", "users", "crud"))
    span = stats["timespan"]
    headline = [
        ("requests", req["total"], ""),
        ("failed requests", req["failed"], _share(req["failed"], req["total"])),
        *((f"request {k[:3]} ms", _ms(req[k]), "") for k in ("avg_ms", "p50_ms", "p95_ms", "p99_ms")),
        ("dependencies", dep["total"], ""),
        ("failed dependencies", dep["failed"], _share(dep["failed"], dep["total"])),
        ("dependency avg ms", _ms(dep["avg_ms"]), ""),
        ("events", evt["total"], ""),
        ("logins", users["logins"], ""),
        ("unique users", users["unique_users"], ""),
        ("anonymous visitors", users["anonymous"], ""),
        ("sessions", users["sessions"], ""),
        ("CRUD operations", crud["total"], ", ".join(f"{a} {crud['by_action'][a]}" for a in CRUD_ACTIONS)),
    ]
    parts = [
        f"Usage, last {span['days']} days: {span['start']} to {span['end']} (source: {stats['source']})",
        _section("Headline figures", _table(("figure", "value", ""), headline, "lrl", header=False)),
        _section("Top operations", _table(
            ("operation", "count", "failed", "p95 ms"),
            [(o["name"], o["count"], o["failed"], _ms(o["p95_ms"])) for o in req["top_operations"]], "lrrr")),
        _section("Top dependency targets", _table(
            ("type", "target", "count", "failed", "avg ms", "p95 ms"),
            [(t["type"], t["target"], t["count"], t["failed"], _ms(t["avg_ms"]), _ms(t.get("p95_ms")))
             for t in dep["top_targets"]],
            "llrrrr")),
        _section("Top events", _table(
            ("event", "count", "users"), [(e["name"], e["count"], e["users"]) for e in evt["top"]], "lrr")),
        _section("CRUD by entity", _table(
            ("entity",) + tuple(CRUD_ACTIONS) + ("total",),
            [(e["entity"], *(e[a] for a in CRUD_ACTIONS), sum(e[a] for a in CRUD_ACTIONS))
             for e in crud["by_entity"]], "l" + "r" * (len(CRUD_ACTIONS) + 1))),
    ]
    return "\n\n".join(parts)


def _ms(value):
    return "-" if value is None else f"{value:.1f}"


def _share(part, whole):
    return f"({100.0 * part / whole:.1f} %)" if whole else ""


def _section(title, body):
    return f"{title}\n{body}"


def _table(headers, rows, align, header=True, indent="  "):
    """Rows as columns padded to their widest cell; 'r' columns right-aligned."""
    if not rows:
        return f"{indent}(none)"
    cells = [[str(c) for c in row] for row in ([headers] if header else []) + [tuple(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        line = "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align))
        lines.append(indent + line.rstrip())
    if header:
        lines.insert(1, indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- flask telemetry ----------------------------------------------------------------------------------

telemetry_group = AppGroup("telemetry", help="The telemetry pipeline: its state and its offline storage.")


@telemetry_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def status_command(as_json):
    """The mode, the monitor's health and, in Azure mode, the outbox on disk; in local mode, the database."""
    monitor = monitor_of(current_app)
    settings = monitor.settings
    report = {"mode": settings.mode, "health": monitor.health()}
    if settings.mode == "azure":
        report["outbox"] = {"path": os.path.abspath(settings.telemetry_storage),
                            "max_mb_per_folder": settings.telemetry_storage_max_mb,
                            "folders": monitor.sink.outbox()}
        report["delivery"] = monitor.sink.stats.snapshot()
    else:
        report["database"] = _database(settings.telemetry_db)
    click.echo(json.dumps(report, indent=2) if as_json else _render_status(report))


def _database(path):
    """The local store's file: path, size on disk (with its WAL) and row counts, read-only."""
    path = os.path.abspath(path)
    out = {"path": path, "exists": os.path.exists(path), "bytes": 0, "rows": {}}
    if not out["exists"]:
        return out
    out["bytes"] = sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
    try:
        conn = sqlite_connect(pathlib.Path(path).as_uri() + "?mode=ro", uri=True, timeout=5)
    except sqlite3.Error as exc:
        out["error"] = str(exc)
        return out
    try:
        for table in _LOCAL_TABLES:
            try:
                out["rows"][table] = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            except sqlite3.OperationalError as exc:  # a store not created yet has no tables
                if "no such table" not in str(exc):
                    out["error"] = str(exc)
                out["rows"][table] = None
    finally:
        conn.close()
    return out


def _render_status(report):
    """The status report as text."""
    health = report["health"]
    lines = [f"mode: {report['mode']}"]
    if health.get("started"):
        queues = health.get("queued")
        if isinstance(queues, dict):  # azure: one queue per exporter
            depth = ", ".join(f"{k} {v}" for k, v in queues.items())
        else:
            depth = f"{queues} (written {health.get('written')}, write errors {health.get('write_errors')})"
        lines.append(f"sink: started in this process; queued: {depth}")
    else:
        lines.append("sink: not started in this process (each serving process has its own queues)")
    failures = health.get("record_failures") or {}
    lines.append("record failures: " + (", ".join(f"{k} {v}" for k, v in failures.items()) or "none"))
    if report["mode"] == "azure":
        outbox = report["outbox"]
        lines.append(f"outbox: {outbox['path']} (at most {outbox['max_mb_per_folder']:g} MB per folder)")
        rows = [(name, f["files"], f["leased"], f"{f['bytes'] / _MB:.2f}",
                 "-" if f["oldest_age_s"] is None else f"{f['oldest_age_s']:.1f}", "FULL" if f["full"] else "no")
                for name, f in outbox["folders"].items()]
        lines.append(_table(("folder", "files", "leased", "MB", "oldest s", "full"), rows, "lrrrrl"))
        delivery = report["delivery"]
        counters = ", ".join(f"{k} {delivery[k]}" for k in ("sent", "stored", "resent", "retries", "rejected",
                                                             "dropped_storage_full", "overflowed"))
        lines.append(f"delivery in this process: {counters}")
        full = ", ".join(delivery["full_folders"]) or "none"
        lines.append(f"storage full (this process saw): {full}")
        lines.append(f"last delivery error: {delivery['last_error'] or 'none'}")
    else:
        db = report["database"]
        if not db["exists"]:
            lines.append(f"database: {db['path']} (not created yet)")
        else:
            lines.append(f"database: {db['path']} ({db['bytes'] / _MB:.2f} MB with its WAL)")
            lines.append(_table(("table", "rows"), [(t, "-" if n is None else n) for t, n in db["rows"].items()],
                                "lr"))
        if db.get("error"):
            lines.append(f"database error: {db['error']}")
    return "\n".join(lines)


@telemetry_group.command("drain")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds to spend sending before giving up.")
def drain_command(timeout):
    """Send everything stored in the outbox now (Azure mode); exit 1 when ingestion does not accept it."""
    monitor = monitor_of(current_app)
    settings = monitor.settings
    if settings.mode != "azure":
        click.echo(f"local mode: telemetry is written straight to {os.path.abspath(settings.telemetry_db)}; "
                   "nothing to drain")
        return
    sink = monitor.start().sink  # its background sender may take some batches too: both are counted
    before = sink.stats.snapshot()
    stored = sum(f["files"] for f in sink.outbox().values())
    if not stored:
        click.echo("the outbox is empty; nothing to drain")
        return
    with click.progressbar(length=stored, label="Sending stored telemetry", show_pos=True) as bar:
        result = sink.drain(timeout, progress=bar.update)
        if not result["error"]:
            bar.update(max(0, stored - bar.pos))
    after = sink.stats.snapshot()
    left = sum(f["files"] for f in sink.outbox().values())
    summary = (f"sent {after['resent'] - before['resent']} stored items, {stored - left} of {stored} batches; "
               f"{left} left in the outbox")
    if after["rejected"] > before["rejected"]:
        summary += f"; ingestion refused {after['rejected'] - before['rejected']} items (dropped)"
    if result["error"]:
        raise click.ClickException(
            f"ingestion did not accept a batch of {result['folder']}: {result['error']}; {summary} "
            f"({os.path.abspath(settings.telemetry_storage)})")
    click.echo(summary)


COMMANDS = (usage_command, telemetry_group)
