-- wrk script: POST the same small event as a frontend would, and print a JSON summary.
-- Usage: wrk -s bench/post_event.lua <url>   (BENCH_PATH overrides the path; GET when BENCH_METHOD=GET)
wrk.method = os.getenv("BENCH_METHOD") or "POST"
if wrk.method == "POST" then
  wrk.body = '{"event_name": "ReportExported", "details": {"format": "pdf", "pages": 3}}'
  wrk.headers["Content-Type"] = "application/json"
end
local path = os.getenv("BENCH_PATH")
if path then wrk.path = path end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nBENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
