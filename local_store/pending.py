"""The pending file: what close() could not write in time, saved next to the database and imported at the next start.

`<db>.pending.jsonl` holds one {"kind", "row"} object a line. A starting process renames it (and
the claims of processes that died) to claims of its own, `<db>.pending.jsonl.<pid>.<n>`, so two
workers never import the same rows; the writer imports them as its first batch and removes them
once committed.
"""
import contextlib
import glob
import json
import logging
import os

from journal import lines, pid_alive
from local_store.schema import COLUMN_DEFAULTS, COLUMNS

log = logging.getLogger(__name__)


def save(path, rows):
    """Append rows (by insert kind) to the pending file at `path`, synced; on failure leave no half record and raise."""
    size = None
    try:
        lines = []
        for key, params in rows.items():
            kind = key.split()[-1]  # "ignore event" -> "event"
            columns = COLUMNS[kind]
            lines.extend(json.dumps({"kind": kind, "row": dict(zip(columns, row))}, separators=(",", ":"))
                         for row in params)
        size = os.path.getsize(path) if os.path.exists(path) else 0
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        if size is not None:
            with contextlib.suppress(OSError):
                os.truncate(path, size)  # no half record for the next start to trip on
        raise


def claim(base):
    """Rename the pending file `base` (and claims of dead processes) to this process's claims; return them."""
    pid = os.getpid()
    candidates = [base] if os.path.exists(base) else []
    for path in sorted(glob.glob(glob.escape(base) + ".*.*")):
        owner = path[len(base) + 1:].split(".")[0]
        if owner.isdigit() and (int(owner) == pid or not pid_alive(int(owner))):
            candidates.append(path)
    claims = []
    for n, path in enumerate(candidates):
        name = f"{base}.{pid}.{n}"
        while name in candidates[n + 1:] or (name != path and os.path.exists(name)):
            name += "x"
        try:
            os.replace(path, name)
        except OSError:  # another worker claimed it first
            continue
        claims.append(name)
    return claims


def load(claims, base):
    """The rows (by "ignore <kind>" insert) of the claimed files; unreadable lines are skipped with one error line."""
    rows, bad = {}, 0
    for name in claims:
        try:
            for line in lines(name):
                try:
                    item = json.loads(line)
                    kind, row = item["kind"], item["row"]
                    rows.setdefault(f"ignore {kind}", []).append(_values(COLUMNS[kind], row))
                except (ValueError, KeyError, TypeError, AttributeError):
                    bad += 1
        except OSError as exc:
            log.error("local store cannot read %s (%s); it is left for the next start", name, exc)
    if bad:
        log.error("local store skipped %d unreadable line(s) of %s", bad, base)
    return rows


def _values(columns, row):
    """A row's INSERT parameters: from a list in column order (the journal) or an object by column name."""
    if isinstance(row, list):
        if len(row) != len(columns):
            raise ValueError("a row of the wrong length")
        return tuple(row)
    return tuple(row.get(c, COLUMN_DEFAULTS.get(c)) for c in columns)


def remove(claims):
    """Remove claimed files whose rows are committed (or that held none)."""
    for name in claims:
        with contextlib.suppress(OSError):
            os.remove(name)
