"""The benchmark's WSGI entry point: `create_app()` exactly as `app:app` builds it.

Bench-only knobs, both unset by default: BENCH_EXPERIMENTS applies the measured recommendations of
bench/experiments.py before the app is built; BENCH_LOCAL_CACHE_TTL (seconds) turns on the local
store's result cache (LocalStore.cache_ttl) for the "dashboard, cached" scenario -- the app itself
does not expose it.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import experiments  # noqa: E402

experiments.apply()  # BENCH_EXPERIMENTS (empty: none) -- measured recommendations, see experiments.py

from app import create_app  # noqa: E402

app = create_app()

_ttl = os.environ.get("BENCH_LOCAL_CACHE_TTL")
if _ttl and hasattr(app.extensions.get("usage_source"), "cache_ttl"):
    app.extensions["usage_source"].cache_ttl = float(_ttl)
