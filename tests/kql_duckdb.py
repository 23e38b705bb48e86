"""Run KQL on DuckDB (duckdb-kql, test-only) over App* tables built by appinsights_tables.

duckdb-kql translates KQL to DuckDB SQL and refuses (KqlUnsupportedError) what it cannot translate
faithfully. Of our queries it lacks only the weighted percentiles, and the tuple form
`(a, b) = percentiles...(...)`. Two additions, both here and both pinned by tests
(test_kql_executed.py):

* `percentilew(x, w, p)` is registered as an aggregate whose SQL is the DuckDB macro
  `kql_percentilew`: Kusto's documented semantics, the nearest-rank percentile of the values with
  each value counted `w` times (smallest value whose rank is >= p% of the total weight). Kusto
  computes an estimate of it (T-Digest); this is the exact value.
* `(a, b, c) = percentilesw(x, w, 50, 95, 99)` is expanded to `a = percentilew(x, w, 50), ...`
  (and the unweighted `percentiles` to `percentile`), what Kusto documents it to mean. The
  rewrite changes nothing else in the text.
"""
import re

import duckdb_kql
from duckdb_kql.translate import functions as _functions

_MACROS = (
    """CREATE OR REPLACE MACRO kql_nearest_rank(l, p) AS
       CASE WHEN len(l) = 0 THEN NULL ELSE list_sort(l)[greatest(1, ceil(p / 100.0 * len(l)))::BIGINT] END""",
    """CREATE OR REPLACE MACRO kql_percentilew(x, w, p) AS kql_nearest_rank(coalesce(flatten(
       list(list_resize([x], CAST(w AS BIGINT), x)) FILTER (WHERE x IS NOT NULL AND w > 0)), []), p)""",
)
_TUPLE = re.compile(r"\(([\w\s,]+)\)\s*=\s*(percentilesw?)\(([^()]*)\)")


def connect():
    """A DuckDB connection (UTC) with the weighted-percentile macro."""
    _functions.AGGREGATE_FUNCTIONS.setdefault(
        "percentilew", _functions.AggregateSpec("percentilew", "kql_percentilew({0}, {1}, {2})", (3,)))
    con = duckdb_kql.connect()
    for macro in _MACROS:
        con.execute(macro)
    return con


def expand_percentile_tuples(kql):
    """`(a, b) = percentilesw(x, w, 50, 95)` -> `a = percentilew(x, w, 50), b = percentilew(x, w, 95)` (same for percentiles)."""
    def expand(match):
        names = [n.strip() for n in match.group(1).split(",")]
        args = [a.strip() for a in match.group(3).split(",")]
        weighted = match.group(2) == "percentilesw"
        fixed, percents = args[:len(args) - len(names)], args[len(args) - len(names):]
        if len(fixed) != (2 if weighted else 1):
            raise ValueError(f"cannot expand {match.group(0)!r}")
        single = "percentilew" if weighted else "percentile"
        return ", ".join(f"{n} = {single}({', '.join(fixed + [p])})" for n, p in zip(names, percents))
    return _TUPLE.sub(expand, kql)


def run(con, kql):
    """(column names, rows as tuples) of a KQL query."""
    result = duckdb_kql.query(con, expand_percentile_tuples(kql))
    return [d[0] for d in result.description], result.fetchall()


def records(con, kql):
    """A KQL query's rows as dicts."""
    names, rows = run(con, kql)
    return [dict(zip(names, r)) for r in rows]
