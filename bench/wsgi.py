"""The benchmark's WSGI entry point: `create_app()` exactly as `app:app` builds it, plus the bench's
own bare endpoint.

`/bench/bare` does nothing (204): the ceiling of scenario (a). It is an app route like the service's
own, so the app-wide request hooks (timing, request tracking, security headers) run for it as for
every route; only the view's work differs. The service does not serve it: the bench registers it here.

BENCH_EXPERIMENTS (unset by default) applies the measured recommendations of bench/experiments.py
before the app is built.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import experiments  # noqa: E402

experiments.apply()  # BENCH_EXPERIMENTS (empty: none) -- measured recommendations, see experiments.py

from app import create_app  # noqa: E402


def bench_bare():
    """Does nothing: the ceiling for benchmarks (scenario (a))."""
    return "", 204


app = create_app()
app.add_url_rule("/bench/bare", view_func=bench_bare, methods=["GET", "POST"])
