/* The usage dashboard: fetches /dashboard/usage and draws figures, SVG charts and tables.
   No dependencies and no request outside this origin; the token lives in sessionStorage only. */
(function () {
  "use strict";

  var TOKEN_KEY = "usage-dashboard-token";
  var REFRESH_MS = 60000;
  var SVG = "http://www.w3.org/2000/svg";
  var timer = null;
  var lastReport = null;

  function $(id) { return document.getElementById(id); }

  function get(obj, path) {
    return path.split(".").reduce(function (o, k) { return o == null ? undefined : o[k]; }, obj);
  }

  function formatCount(n) { return n == null ? "–" : Number(n).toLocaleString("en-US"); }

  function formatMs(n) {
    return n == null ? "–" : Number(n).toLocaleString("en-US", {maximumFractionDigits: 1}) + " ms";
  }

  function formatMetric(path, value) { return /_ms$/.test(path) ? formatMs(value) : formatCount(value); }

  function show(id, visible) { $(id).hidden = !visible; }

  function token() { return sessionStorage.getItem(TOKEN_KEY); }

  function setStatus(message, retry) {
    $("status-message").textContent = message;
    show("retry", !!retry);
    show("status", true);
  }

  function clearStates() {
    ["status", "token-form", "empty", "report"].forEach(function (id) { show(id, false); });
  }

  function load() {
    var days = $("days").value;
    var headers = {"Accept": "application/json"};
    if (token()) { headers.Authorization = "Bearer " + token(); }
    show("sign-out", !!token());
    return fetch(document.body.dataset.usageUrl + "?days=" + encodeURIComponent(days),
                 {headers: headers, credentials: "same-origin", cache: "no-store"})
      .then(function (response) {
        return response.json().catch(function () { return {}; }).then(function (body) {
          clearStates();
          if (response.ok) { render(body); return; }
          var message = (body.error && body.error.message) || ("HTTP " + response.status);
          if (response.status === 401) {
            if (token()) { sessionStorage.removeItem(TOKEN_KEY); show("sign-out", false); }
            show("token-form", true);
            $("token").focus();
          } else if (response.status === 502 || response.status === 503) {
            setStatus("The usage source is unavailable: " + message, true);
          } else {
            setStatus(message, true);
          }
        });
      })
      .catch(function (error) {
        clearStates();
        setStatus("The service did not answer (" + error.message + ").", true);
      });
  }

  function render(report) {
    lastReport = report;
    $("source").textContent = report.source;
    var updated = $("updated");
    updated.textContent = new Date(report.generated_at).toLocaleString();
    updated.setAttribute("datetime", report.generated_at);
    var empty = !report.requests.total && !report.events.total && !report.dependencies.total;
    if (empty) {
      $("event-url").textContent = new URL("/event", window.location.href).href;
      show("empty", true);
      return;
    }
    show("report", true);  // first: the charts are drawn at their laid-out width
    document.querySelectorAll("[data-metric]").forEach(function (el) {
      el.textContent = formatMetric(el.dataset.metric, get(report, el.dataset.metric));
    });
    var total = report.requests.total;
    $("failed-share").textContent = total ? (100 * report.requests.failed / total).toFixed(1) + " %" : "";
    var req = report.requests.daily;
    chart("requests", req, [{key: "count", cls: "s-main"}, {key: "failed", cls: "s-bad"}], "bar");
    chart("latency", req, [{key: "avg_ms", cls: "s-main"}, {key: "p95_ms", cls: "s-alt"}], "line");
    chart("dependencies", report.dependencies.daily,
          [{key: "count", cls: "s-main"}, {key: "failed", cls: "s-bad"}], "bar");
    chart("events", report.events.daily, [{key: "count", cls: "s-main"}], "bar");
    chart("users", report.users.daily_active, [{key: "users", cls: "s-main"}], "line");
    table("operations", report.requests.top_operations, function (r) {
      return [r.name, formatCount(r.count), formatCount(r.failed), formatMs(r.p95_ms).replace(" ms", "")];
    }, 1);
    table("targets", report.dependencies.top_targets, function (r) {
      return [r.type, r.target, formatCount(r.count), formatCount(r.failed), formatMs(r.avg_ms).replace(" ms", ""),
              formatMs(r.p95_ms).replace(" ms", "")];
    }, 2);
    table("events", report.events.top, function (r) { return [r.name, formatCount(r.count), formatCount(r.users)]; }, 1);
    table("crud", report.crud.by_entity, function (r) {
      return [r.entity, formatCount(r.create), formatCount(r.read), formatCount(r.update), formatCount(r.delete)];
    }, 1);
  }

  /* Fill a table; the first `textCols` cells of a row are text, the rest right-aligned numbers. */
  function table(name, rows, cells, textCols) {
    var body = document.querySelector('[data-table="' + name + '"] tbody');
    body.textContent = "";
    if (!rows.length) {
      var td = body.insertRow().insertCell();
      td.colSpan = body.parentNode.tHead.rows[0].cells.length;
      td.className = "none";
      td.textContent = "None in this period";
      return;
    }
    rows.forEach(function (row) {
      var tr = body.insertRow();
      cells(row).forEach(function (text, i) {
        var cell = tr.insertCell();
        cell.textContent = text;
        if (i < textCols) { cell.title = text; } else { cell.className = "num"; }
      });
    });
  }

  function el(tag, attrs, parent) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (parent) { parent.appendChild(node); }
    return node;
  }

  /* A small SVG chart: bars (series side by side) or lines, a zero-based y axis with 3 ticks,
     and the first and last dates on the x axis. Each bar and point has a <title> tooltip. */
  function chart(name, daily, series, kind) {
    var holder = document.querySelector('[data-chart="' + name + '"]');
    holder.textContent = "";
    // Drawn at the holder's own width, so the text stays readable on a phone.
    var W = Math.max(280, Math.round(holder.clientWidth || 600)), H = 180, L = 44, R = 8, T = 8, B = 22;
    var svg = el("svg", {viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": name, "class": "plot"}, holder);
    var max = 0;
    daily.forEach(function (d) { series.forEach(function (s) { max = Math.max(max, d[s.key] || 0); }); });
    max = niceMax(max);
    var plotW = W - L - R, plotH = H - T - B, n = daily.length, step = plotW / Math.max(n, 1);
    function y(v) { return T + plotH - (plotH * (v || 0)) / max; }
    [0, 0.5, 1].forEach(function (f) {
      var v = max * f;
      el("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), "class": "grid"}, svg);
      el("text", {x: L - 4, y: y(v) + 4, "class": "tick", "text-anchor": "end"}, svg).textContent = short(v);
    });
    if (n) {
      el("text", {x: L, y: H - 6, "class": "tick"}, svg).textContent = daily[0].date;
      if (n > 1) {
        el("text", {x: W - R, y: H - 6, "class": "tick", "text-anchor": "end"}, svg).textContent = daily[n - 1].date;
      }
    }
    series.forEach(function (s, si) {
      if (kind === "bar") {
        var bw = Math.max(1, (step * 0.8) / series.length);
        daily.forEach(function (d, i) {
          var v = d[s.key] || 0;
          var rect = el("rect", {x: L + i * step + step * 0.1 + si * bw, y: y(v), width: bw,
                                 height: Math.max(0, T + plotH - y(v)), "class": s.cls}, svg);
          el("title", {}, rect).textContent = d.date + ": " + formatCount(d[s.key]) + " " + s.key;
        });
      } else {
        var points = [];
        daily.forEach(function (d, i) {
          if (d[s.key] == null) { return; }
          var px = L + i * step + step / 2;
          points.push(px.toFixed(1) + "," + y(d[s.key]).toFixed(1));
          var dot = el("circle", {cx: px, cy: y(d[s.key]), r: 2.5, "class": s.cls}, svg);
          el("title", {}, dot).textContent = d.date + ": " + d[s.key] + " " + s.key;
        });
        if (points.length > 1) { el("polyline", {points: points.join(" "), "class": "line " + s.cls}, svg); }
      }
    });
  }

  function niceMax(v) {
    if (v <= 0) { return 1; }
    var p = Math.pow(10, Math.floor(Math.log10(v))), m = v / p;
    return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
  }

  function short(v) {
    return v >= 1e6 ? (v / 1e6).toFixed(v % 1e6 ? 1 : 0) + "M" : v >= 1e3 ? (v / 1e3).toFixed(v % 1e3 ? 1 : 0) + "k"
      : String(Math.round(v * 10) / 10);
  }

  function schedule() {
    if (timer) { clearInterval(timer); timer = null; }
    if ($("auto-refresh").checked) { timer = setInterval(load, REFRESH_MS); }
  }

  document.addEventListener("DOMContentLoaded", function () {
    $("days").addEventListener("change", load);
    $("refresh").addEventListener("click", load);
    $("retry").addEventListener("click", load);
    $("auto-refresh").addEventListener("change", schedule);
    $("sign-out").addEventListener("click", function () {
      sessionStorage.removeItem(TOKEN_KEY);
      load();
    });
    $("token-form").addEventListener("submit", function (event) {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, $("token").value);
      $("token").value = "";
      load();
    });
    var resizing = null;
    window.addEventListener("resize", function () {
      clearTimeout(resizing);
      resizing = setTimeout(function () { if (lastReport && !$("report").hidden) { render(lastReport); } }, 150);
    });
    load();
  });
}());
