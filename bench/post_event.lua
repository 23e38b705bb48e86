-- wrk script: POST one small JSON event to /event; done() prints one JSON line for bench/run.py.
wrk.method = "POST"
wrk.path = "/event"
wrk.body = '{"event_name": "ReportExported", "details": {"format": "pdf", "pages": 3}}'
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nBENCH_JSON {"requests":%d,"duration_us":%d,"non_2xx":%d,"socket_errors":%d,' ..
    '"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
