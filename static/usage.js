/*
 * usage.js: the browser client of the usage-monitoring service. No build step, no dependencies.
 *
 *   <script src="https://api.example.com/usage.js"></script>
 *   Usage.init({endpoint: "https://api.example.com", apiKey: "…", flushInterval: 5000, pageViews: true});
 *   Usage.track("ReportExported", {format: "pdf"});   // returns the event's event_id
 *   Usage.flush();                                     // send what waits now
 *
 * Options: endpoint (the service's origin), apiKey, flushInterval (ms, default 5000), maxBatch
 * (events per request, default 20, at most 100), maxQueue (events kept while unsent, default
 * 1000, oldest dropped), pageViews (default false), debug (console messages, default false).
 *
 * Each event gets an event_id, its timestamp, an anonymous_id (localStorage) and a session_id
 * (sessionStorage, renewed after 30 minutes idle). Events wait in localStorage until the service
 * accepted them, so they survive reloads and offline periods, and keep their event_id across
 * retries (the service stores an event_id once). Batches go to POST /events when maxBatch events
 * are waiting and every flushInterval; 429, 5xx and network errors are retried with capped
 * exponential backoff with jitter, or after Retry-After; other 4xx drop the batch. When the page
 * is hidden or unloads, the waiting events go by navigator.sendBeacon. Nothing here throws into
 * the page.
 */
(function (window) {
  "use strict";
  if (window.Usage) return; // loaded twice: the first copy stays in charge

  var navigator = window.navigator, document = window.document, location = window.location;
  var LOCAL = "localStorage", SESSION = "sessionStorage";
  var ANONYMOUS_KEY = "usage.anonymous_id", SESSION_KEY = "usage.session", QUEUE_KEY = "usage.queue:";
  var SESSION_IDLE_MS = 30 * 60 * 1000;
  var BACKOFF_BASE_MS = 1000, BACKOFF_CAP_MS = 60 * 1000;
  var FETCH_MAX_BYTES = 500 * 1000; // the service takes bodies up to 512 KB
  var BEACON_MAX_BYTES = 60 * 1000; // browsers queue at most 64 KB of beacons at a time
  var DEFAULTS = {endpoint: "", apiKey: "", flushInterval: 5000, maxBatch: 20, maxQueue: 1000,
                  pageViews: false, debug: false};

  var config = null;  // the options, once init ran
  var queue = [];     // this page's unsent events, oldest first; mirrored in localStorage
  var inFlight = {};  // event_id -> 1 for the batch being sent by fetch
  var sending = false, keptAlive = false, draining = false, attempt = 0, retryAt = 0, retryTimer;
  var memory = {};    // stands in for storage the browser refuses (private modes, disabled storage)
  var lastPage, lastHref;

  function log() {
    if (config && config.debug && window.console) {
      console.log.apply(console, ["[usage]"].concat([].slice.call(arguments)));
    }
  }

  // -- storage: never throws; falls back to memory ----------------------------------------------
  function load(area, key) {
    try {
      return JSON.parse(window[area].getItem(key));
    } catch (e) {
      return memory[area + key];
    }
  }

  function store(area, key, value) {
    memory[area + key] = value;
    try {
      window[area].setItem(key, JSON.stringify(value));
    } catch (e) {
      log("storage refused", e);
    }
  }

  // -- ids ---------------------------------------------------------------------------------------
  function randomHex(bytes) {
    var crypto = window.crypto, array = new Uint8Array(bytes), text = "", i;
    if (crypto && crypto.getRandomValues) crypto.getRandomValues(array);
    else for (i = 0; i < bytes; i++) array[i] = Math.random() * 256;
    for (i = 0; i < bytes; i++) text += (array[i] + 256).toString(16).slice(1);
    return text;
  }

  function uuid() {
    var crypto = window.crypto;
    if (crypto && crypto.randomUUID) return crypto.randomUUID(); // secure contexts only
    var h = randomHex(16); // a version 4 UUID from random bytes
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-4" + h.slice(13, 16) + "-" +
      "89ab"[parseInt(h[16], 16) & 3] + h.slice(17, 20) + "-" + h.slice(20);
  }

  function anonymousId() {
    var id = load(LOCAL, ANONYMOUS_KEY);
    if (typeof id != "string" || !id) store(LOCAL, ANONYMOUS_KEY, id = uuid());
    return id;
  }

  function sessionId() {
    var now = Date.now(), session = load(SESSION, SESSION_KEY);
    if (!session || !session.id || !(now - session.last < SESSION_IDLE_MS)) session = {id: uuid()};
    session.last = now;
    store(SESSION, SESSION_KEY, session);
    return session.id;
  }

  // -- the queue -----------------------------------------------------------------------------------
  // localStorage holds this page's queue and what other tabs of the origin keep there (left as
  // found). stored(skip): the stored events that are neither in this page's queue nor in `skip`
  // (the ids this page just sent or dropped).
  function stored(skip) {
    queue.forEach(function (e) { skip[e.event_id] = 1; });
    return [].concat(load(LOCAL, QUEUE_KEY + config.endpoint) || []).filter(function (e) {
      return e && e.event_id && !skip[e.event_id];
    });
  }

  function save(gone) {
    store(LOCAL, QUEUE_KEY + config.endpoint, stored(gone || {}).concat(queue).slice(-config.maxQueue));
  }

  // Drop the oldest events beyond maxQueue; returns their ids for save().
  function bound() {
    var gone = {}, extra = queue.length - (config || DEFAULTS).maxQueue;
    if (extra > 0) {
      queue.splice(0, extra).forEach(function (e) { gone[e.event_id] = 1; });
      log("queue full: dropped the", extra, "oldest events");
    }
    return gone;
  }

  function remove(events) {
    var gone = {};
    events.forEach(function (e) { gone[e.event_id] = 1; });
    queue = queue.filter(function (e) { return !gone[e.event_id]; });
    save(gone);
  }

  function bytes(text) {
    return window.Blob ? new Blob([text]).size : text.length * 3;
  }

  // The oldest events that fit maxBatch and maxBytes (at least one when `always`).
  function take(events, maxBytes, always) {
    var batch = [], size = 100 + bytes(config.apiKey);
    for (var i = 0; i < events.length && batch.length < config.maxBatch; i++) {
      size += bytes(JSON.stringify(events[i])) + 1;
      if (size > maxBytes && (batch.length || !always)) break;
      batch.push(events[i]);
    }
    return batch;
  }

  // -- sending -------------------------------------------------------------------------------------
  function traceparent() {
    return "00-" + randomHex(16) + "-" + randomHex(8) + "-01";
  }

  function waiting() {
    return Date.now() < retryAt || navigator.onLine === false;
  }

  // Send the next batch by fetch: a full one, or whatever waits when `force` (interval, flush()).
  function pump(force) {
    if (force) draining = true;
    if (!config || sending || !window.fetch) return;
    if (!queue.length) return (draining = false);
    if ((!draining && queue.length < config.maxBatch) || waiting()) return;
    var batch = take(queue, FETCH_MAX_BYTES, true), body = JSON.stringify({events: batch});
    sending = true;
    keptAlive = bytes(body) < BEACON_MAX_BYTES; // a keepalive fetch outlives the page (up to 64 KB)
    batch.forEach(function (e) { inFlight[e.event_id] = 1; });
    new Promise(function (resolve) { // a fetch that throws (wrapped by the page?) is a network error too
      resolve(fetch(config.endpoint + "/events", {
        method: "POST",
        headers: {"Content-Type": "application/json", "X-Api-Key": config.apiKey, "traceparent": traceparent()},
        body: body,
        credentials: "omit",
        keepalive: keptAlive
      }));
    }).then(function (response) {
      var status = response.status;
      if (status == 429 || status >= 500) return retry(response.headers.get("Retry-After"), "HTTP " + status);
      attempt = 0;
      remove(batch); // accepted, or refused for good: items with errors are dropped either way
      return response.json().then(function (answer) {
        if (!response.ok || (answer.errors || []).length) log("HTTP " + status + ": dropped events", answer);
      });
    }, function (error) {
      retry(null, error);
    }).catch(function (error) {
      log(error);
    }).then(function () {
      sending = false;
      inFlight = {};
      pump();
    });
  }

  function retry(retryAfter, reason) {
    var delay = retryAfter == null || retryAfter === "" ? NaN : +retryAfter * 1000;
    if (isNaN(delay)) delay = Date.parse(retryAfter) - Date.now(); // Retry-After as an HTTP date
    if (!(delay >= 0)) delay = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * Math.pow(2, attempt)) * (0.5 + Math.random() / 2);
    attempt++;
    retryAt = Date.now() + delay;
    clearTimeout(retryTimer);
    retryTimer = setTimeout(function () { retryAt = 0; pump(true); }, delay);
    log(reason, "- retrying in", Math.round(delay), "ms");
  }

  // The page is hidden or unloading: hand the waiting events to sendBeacon. The batch in flight
  // stays with its fetch, unless the page unloads: then a keepalive fetch counts as sent (like a
  // beacon), and any other is re-sent by beacon since it dies with the page. While offline or
  // backing off, events stay in localStorage for the next page instead: a beacon is never retried.
  function beacon(unloading) {
    if (!config || !navigator.sendBeacon || waiting()) return;
    if (unloading && sending && keptAlive) remove(queue.filter(function (e) { return inFlight[e.event_id]; }));
    var events = queue.filter(function (e) { return unloading || !inFlight[e.event_id]; });
    for (var budget = BEACON_MAX_BYTES, batch, body; events.length; events = events.slice(batch.length)) {
      batch = take(events, budget);
      body = JSON.stringify({events: batch, api_key: config.apiKey}); // a string: text/plain, no preflight
      if (!batch.length || !navigator.sendBeacon(config.endpoint + "/events", body)) break;
      budget -= bytes(body);
      remove(batch);
      log("beacon:", batch.length, "events");
    }
  }

  // -- the public API ------------------------------------------------------------------------------
  function track(name, details) {
    if (typeof name != "string" || !name) return log("track: the event name must be a non-empty string");
    var flat = {}, key, value;
    for (key in typeof details == "object" ? details : 0) {
      value = details[key];
      if ({}.hasOwnProperty.call(details, key)) {
        if (value === null || /^(string|number|boolean)$/.test(typeof value)) flat[key] = value;
        else log("track: skipped", key, "(not a string, number, boolean or null)");
      }
    }
    var event = {event_id: uuid(), event_name: name, details: flat, timestamp: new Date().toISOString(),
                 anonymous_id: anonymousId(), session_id: sessionId()};
    queue.push(event);
    var gone = bound();
    if (config) {
      save(gone);
      pump();
    }
    return event.event_id;
  }

  function pageView() {
    var page = location.pathname + location.search;
    if (page != lastPage) track("PageView", {page: page, referrer: lastHref});
    lastPage = page;
    lastHref = location.href;
  }

  function init(options) {
    if (config) return log("init: already initialised");
    var c = {}, key;
    for (key in DEFAULTS) c[key] = options && options[key] != null ? options[key] : DEFAULTS[key];
    c.endpoint = String(c.endpoint).replace(/\/+$/, "");
    c.maxBatch = Math.max(1, Math.min(100, c.maxBatch | 0));
    config = c;
    queue = stored({}).concat(queue); // events earlier pages left unsent, then those tracked before init
    save(bound());
    if (queue.length) log("resuming", queue.length, "unsent events");

    var on = safe(function (type, handler, target) { (target || window).addEventListener(type, safe(handler)); });
    on("online", function () {
      clearTimeout(retryTimer);
      retryAt = attempt = 0;
      pump(true);
    });
    on("pagehide", function () { beacon(true); });
    on("visibilitychange", function () { if (document.visibilityState == "hidden") beacon(); }, document);
    if (c.flushInterval > 0) setInterval(safe(function () { pump(true); }), c.flushInterval);
    if (c.pageViews) {
      lastHref = document.referrer;
      pageView();
      ["pushState", "replaceState"].forEach(function (name) {
        var original = window.history[name];
        if (original) window.history[name] = function () {
          var result = original.apply(this, arguments); // the page's own errors stay its own
          safe(pageView)();
          return result;
        };
      });
      on("popstate", pageView);
    }
    pump(true);
  }

  function safe(fn) {
    return function () {
      try {
        return fn.apply(this, arguments);
      } catch (e) {
        log("error", e);
      }
    };
  }

  window.Usage = {
    init: safe(init),
    track: safe(track),
    flush: safe(function () { pump(true); })
  };
})(window);
