"""Validate KQL text with Microsoft's Kusto language service (tests/kql/validate.js).

Setup once: ``npm ci --prefix tests/kql`` (needs node on PATH).
Schemas come from tests/kql/app_tables.json; every table is in the default database.
"""

import json
import shutil
import subprocess
from pathlib import Path

KQL_DIR = Path(__file__).resolve().parent / "kql"
VALIDATE_JS = KQL_DIR / "validate.js"
PACKAGE_DIR = KQL_DIR / "node_modules" / "@kusto" / "language-service-next"
SETUP_HINT = "run `npm ci --prefix tests/kql` (from the repo root)"


def kql_errors(queries: list[str]) -> list[list[dict]]:
    """Return, per query, its Error-severity diagnostics ({severity, code, message, start, length})."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError(f"node not found on PATH; install Node.js, then {SETUP_HINT}")
    if not PACKAGE_DIR.is_dir():
        raise RuntimeError(f"{PACKAGE_DIR} is missing; {SETUP_HINT}")
    proc = subprocess.run(
        [node, str(VALIDATE_JS)],
        input=json.dumps(list(queries)),
        capture_output=True,
        text=True,
        cwd=KQL_DIR,
        timeout=120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"validate.js failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
    result = json.loads(proc.stdout)
    if len(result) != len(queries):
        raise RuntimeError(f"validate.js returned {len(result)} results for {len(queries)} queries")
    return result
