/*
 * usage.js: the browser client of the usage-monitoring service. No build step, no dependencies;
 * /usage.js serves static/usage.min.js, this file minified by terser (`make usage-js`).
 *
 *   <script src="https://api.example.com/usage.js"></script>
 *   Usage.init({endpoint: "https://api.example.com", apiKey: "…", flushInterval: 5000, pageViews: true});
 *   Usage.track("ReportExported", {format: "pdf"});   // returns the event's event_id
 *   Usage.flush();                                     // send what waits now
 *
 * Or the README's snippet: a stub `Usage` that queues calls (with their time) until this script
 * loads, and retries loading it while the service is down. This script replays those calls.
 *
 * Options: endpoint (the service's origin), apiKey, flushInterval (ms, default 5000), maxBatch
 * (events per request, default 20, at most 100), maxQueue (events kept while the service cannot
 * take them, default 1000, oldest dropped), onDrop (called with the number of events dropped and
 * why: a full queue while offline, or events the service refused; a console warning says it too),
 * pageViews (default false), debug (console messages, default false).
 *
 * Each event gets an event_id, its timestamp (each request carries sent_at, the page's clock when
 * sent, so the service corrects a clock that is wrong), an anonymous_id (localStorage) and a session_id
 * (sessionStorage, renewed after 30 minutes idle). track() only appends to the page's queue in
 * memory; a batch goes to POST /events as soon as maxBatch events wait (one request at a time)
 * and every flushInterval. 429, 5xx and network errors are retried with capped exponential backoff
 * with jitter, or after Retry-After; other 4xx drop the batch. While offline or after a failed
 * request, the queue keeps the newest maxQueue events (onDrop and a console warning say how many
 * went); while the service takes events, a burst waits in memory and goes in full.
 *
 * Storage: each page writes its unsent events (the newest maxQueue that fit; the oldest give way
 * when storage is full) to its own localStorage key, 200 ms after a change and when it is hidden.
 * It holds a Web Lock named after that key while it lives; a page that loads adopts the keys whose
 * lock is free (pages closed, reloaded or crashed with unsent events) while holding their lock,
 * so no two pages adopt the same events; open pages look again every flushInterval. Without Web
 * Locks (insecure contexts, old browsers) a page hands its key over when it is hidden for good
 * (pagehide) and the next page to load adopts it.
 * When the page is hidden, what waits is saved and sent by a keepalive fetch; when it unloads, by
 * navigator.sendBeacon as text/plain (no preflight). Nothing here throws into the page.
 */
(function (window) {
  "use strict";
  var stub = window.Usage;
  if (stub && !stub.q) return; // loaded twice: the first copy stays in charge

  var navigator = window.navigator, document = window.document, location = window.location;
  var locks = navigator.locks;
  var LOCAL = "localStorage", SESSION = "sessionStorage";
  var ANONYMOUS_KEY = "usage.anonymous_id", SESSION_KEY = "usage.session", QUEUE_KEY = "usage.queue:";
  var SESSION_IDLE_MS = 30 * 60 * 1000, SAVE_DELAY_MS = 200;
  var BACKOFF_BASE_MS = 1000, BACKOFF_CAP_MS = 60 * 1000;
  var FETCH_MAX_BYTES = 500 * 1000; // the service takes bodies up to 512 KB
  var BEACON_MAX_BYTES = 60 * 1000; // browsers queue at most 64 KB of beacons at a time
  var DEFAULTS = {endpoint: "", apiKey: "", flushInterval: 5000, maxBatch: 20, maxQueue: 1000,
                  onDrop: null, pageViews: false, debug: false};

  var config = null;  // the options, once init ran
  var queue = [];     // this page's unsent events, oldest first; saved under `key`
  var inFlight = {};  // event_id -> 1 for the batch being sent by fetch
  var sending = false, keptAlive = false, draining = false, attempt = 0, retryAt = 0, retryTimer;
  var key, owned = false, saveTimer; // this page's storage key; owned once its lock is held
  var memory = {};    // stands in for storage the browser refuses (private modes, disabled storage)
  var anonymous, session, lastPage, lastHref;

  function log() {
    if (config && config.debug && window.console) {
      console.log.apply(console, ["[usage]"].concat([].slice.call(arguments)));
    }
  }

  // -- storage: never throws; falls back to memory ----------------------------------------------
  function load(area, name) {
    try {
      return JSON.parse(window[area].getItem(name));
    } catch (e) {
      return memory[area + name];
    }
  }

  function store(area, name, value) {
    memory[area + name] = value;
    try {
      window[area].setItem(name, JSON.stringify(value));
      return true;
    } catch (e) {
      log("storage refused", e);
    }
  }

  function unstore(name) {
    delete memory[LOCAL + name];
    try {
      window[LOCAL].removeItem(name);
    } catch (e) { /* storage disabled */ }
  }

  // -- ids ---------------------------------------------------------------------------------------
  // Random bytes come from a pool refilled 4 KB at a time: one crypto call per 256 event ids
  // (crypto.randomUUID costs more than all the rest of track()).
  var pool, used = 4096, HEX = [];
  for (var i = 0; i < 256; i++) HEX[i] = (i + 256).toString(16).slice(1);

  function randomHex(bytes) {
    var text = "", crypto = window.crypto, i;
    if (used + bytes > 4096) {
      pool = new Uint8Array(4096);
      if (crypto && crypto.getRandomValues) crypto.getRandomValues(pool);
      else for (i = 0; i < 4096; i++) pool[i] = Math.random() * 256;
      used = 0;
    }
    for (i = 0; i < bytes; i++) text += HEX[pool[used++]];
    return text;
  }

  // A version 4 UUID: the version nibble 4, the variant bits 10 (from the nibble they replace).
  function uuid() {
    var h = randomHex(16);
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-4" + h.slice(13, 16) + "-" +
      "89ab"[pool[used - 8] >> 4 & 3] + h.slice(17, 20) + "-" + h.slice(20);
  }

  function anonymousId() {
    if (!anonymous) anonymous = load(LOCAL, ANONYMOUS_KEY);
    if (typeof anonymous != "string" || !anonymous) store(LOCAL, ANONYMOUS_KEY, anonymous = uuid());
    return anonymous;
  }

  // The session lives in memory; save() writes it to sessionStorage with the queue.
  function sessionId(now) {
    session = session || load(SESSION, SESSION_KEY);
    if (!session || !session.id || !(now - session.last < SESSION_IDLE_MS)) session = {id: uuid()};
    session.last = now;
    return session.id;
  }

  // -- the queue in storage ------------------------------------------------------------------------
  // Drop the oldest events beyond maxQueue while they cannot go (offline, backing off); online, a
  // burst waits in memory and goes in full.
  function trim() {
    var extra = queue.length - config.maxQueue;
    if (extra > 0 && !sending && down()) {
      queue.splice(0, extra);
      dropped(extra, "queue full: dropped the " + extra + " oldest events");
    }
  }

  // The client's clock now, as sent_at: the service shifts each timestamp by its own clock minus this.
  function sentAt() {
    return new Date().toISOString();
  }

  // Events that will not be sent: a console warning and onDrop(count, why) say so, never silence.
  function dropped(count, why) {
    if (window.console) console.warn("[usage] " + why);
    if (typeof config.onDrop == "function") config.onDrop(count, why);
  }

  function later() {
    if (!saveTimer) saveTimer = setTimeout(save, SAVE_DELAY_MS);
  }

  // Write the newest maxQueue events under this page's key; when storage is full, fewer: the newest.
  function save() {
    clearTimeout(saveTimer);
    saveTimer = 0;
    if (!config) return;
    if (session) store(SESSION, SESSION_KEY, session);
    trim();
    if (!owned) return;
    var events = queue.slice(-config.maxQueue), n = events.length;
    while (n && !store(LOCAL, key, n < events.length ? events.slice(-n) : events)) n = n * 3 >> 2;
    if (n < events.length) log("storage full: kept the newest", n, "of", events.length, "events");
    if (!n) unstore(key);
  }

  // Adopt the events another page left under `name` (its lock held, or handed over).
  function adopt(name) {
    var seen = {}, events = [].concat(load(LOCAL, name) || []);
    queue.forEach(function (e) { seen[e.event_id] = 1; });
    events = events.filter(function (e) { return e && e.event_id && !seen[e.event_id]; });
    if (!events.length) return unstore(name);
    queue = queue.concat(events).sort(function (a, b) {
      return (a.timestamp > b.timestamp) - (a.timestamp < b.timestamp);
    });
    log("adopted", events.length, "unsent events of", name);
    save();       // ours now: in this page's key...
    unstore(name); // ...before they leave the other
    pump(true);
  }

  // The keys of this endpoint that no living page owns: free lock, or handed over (no Web Locks).
  function claim() {
    var prefix = QUEUE_KEY + config.endpoint, names = [], i;
    try {
      for (i = 0; i < window[LOCAL].length; i++) names.push(window[LOCAL].key(i));
    } catch (e) { /* storage disabled */ }
    names.forEach(function (name) {
      if (name == key || (name != prefix && name.indexOf(prefix + " ") != 0)) return;
      if (locks) locks.request(name, {ifAvailable: true}, safe(function (lock) { if (lock) adopt(name); }));
      else if (name == prefix || name.slice(-1) == "!") adopt(name); // no lock: only what was handed over
    });
  }

  function own() {
    owned = true;
    claim();
    save();
  }

  function remove(events) {
    var gone = {};
    events.forEach(function (e) { gone[e.event_id] = 1; });
    queue = queue.filter(function (e) { return !gone[e.event_id]; });
    later();
  }

  var encoder = window.TextEncoder && new TextEncoder(); // (a Blob per event costs a call to the browser)

  function bytes(text) {
    return encoder ? encoder.encode(text).length : text.length * 3;
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

  // Offline, or the last request failed: events stay (a beacon would be lost unseen).
  function down() {
    return attempt > 0 || waiting();
  }

  // Send the next batch by fetch: a full one, or whatever waits when `force` (interval, flush()).
  function pump(force) {
    if (force) draining = true;
    if (!config || sending || !window.fetch) return;
    if (!queue.length) return (draining = false);
    if ((!draining && queue.length < config.maxBatch) || waiting()) return;
    var batch = take(queue, FETCH_MAX_BYTES, true), body = JSON.stringify({events: batch, sent_at: sentAt()});
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
        var errors = response.ok ? answer.errors || [] : [answer.error || {}], n = response.ok ? errors.length : batch.length;
        if (n) dropped(n, "the service refused " + n + " events: " + (errors[0].message || "HTTP " + status));
      });
    }, function (error) {
      retry(null, error);
    }).catch(function (error) {
      log(error);
    }).then(function () {
      sending = false;
      inFlight = {};
      later();
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

  // The page unloads: hand the waiting events to sendBeacon. A keepalive fetch in flight counts as
  // sent (like a beacon); any other batch in flight dies with the page, so it goes by beacon too.
  // The browser never says whether a beacon arrived, so while offline or after a failed request
  // the events stay in localStorage for the next page instead. Then the queue is saved at once;
  // without Web Locks, the page hands its key over.
  function leave() {
    if (!config) return;
    if (navigator.sendBeacon && !down()) {
      if (sending && keptAlive) remove(queue.filter(function (e) { return inFlight[e.event_id]; }));
      for (var events = queue, budget = BEACON_MAX_BYTES, batch, body; events.length; events = events.slice(batch.length)) {
        batch = take(events, budget);
        body = JSON.stringify({events: batch, api_key: config.apiKey, sent_at: sentAt()}); // a string: text/plain, no preflight
        if (!batch.length || !navigator.sendBeacon(config.endpoint + "/events", body)) break;
        budget -= bytes(body);
        remove(batch);
        log("beacon:", batch.length, "events");
      }
    }
    save();
    if (!locks && owned) {
      var saved = load(LOCAL, key);
      unstore(key);
      if (saved) store(LOCAL, key + "!", saved);
      queue = [];
      owned = false;
    }
  }

  // The page is hidden (and may never run again): save now, and send what waits by a keepalive
  // fetch, whose answer the page still sees if it lives on (a beacon refused by a service that
  // just went down would be lost unseen).
  function hide() {
    save();
    pump(true);
  }

  // -- the public API ------------------------------------------------------------------------------
  function track(name, details, time) {
    if (typeof name != "string" || !name) return log("track: the event name must be a non-empty string");
    var flat = {}, field, value, now = time || Date.now();
    for (field in typeof details == "object" ? details : 0) {
      value = details[field];
      if ({}.hasOwnProperty.call(details, field)) {
        if (value === null || /^(string|number|boolean)$/.test(typeof value)) flat[field] = value;
        else log("track: skipped", field, "(not a string, number, boolean or null)");
      }
    }
    var event = {event_id: uuid(), event_name: name, details: flat, timestamp: new Date(now).toISOString(),
                 anonymous_id: anonymousId(), session_id: sessionId(now)};
    queue.push(event);
    if (config) {
      later();
      if (queue.length >= config.maxBatch) pump();
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
    var c = {}, name;
    for (name in DEFAULTS) c[name] = options && options[name] != null ? options[name] : DEFAULTS[name];
    c.endpoint = String(c.endpoint).replace(/\/+$/, "");
    c.maxBatch = Math.max(1, Math.min(100, c.maxBatch | 0));
    config = c;
    key = QUEUE_KEY + c.endpoint + " " + randomHex(8);
    if (locks) { // held until the page goes; then its key is free for the next page to adopt
      locks.request(key, function () {
        safe(own)();
        return new Promise(function () {});
      })["catch"](function () { // refused (an opaque origin): as without Web Locks
        locks = null;
        safe(own)();
      });
    } else own();

    var on = safe(function (type, handler, target) { (target || window).addEventListener(type, safe(handler)); });
    on("online", function () {
      clearTimeout(retryTimer);
      retryAt = attempt = 0;
      pump(true);
    });
    on("pagehide", leave);
    on("pageshow", function (e) { if (e.persisted && !owned) own(); }); // back from the bfcache
    on("visibilitychange", function () { if (document.visibilityState == "hidden") hide(); }, document);
    if (c.flushInterval > 0) setInterval(safe(function () {
      if (locks && owned) claim(); // what tabs closed since left behind (a lock makes it safe at any time)
      pump(true);
    }), c.flushInterval);
    if (c.pageViews) {
      lastHref = document.referrer;
      pageView();
      ["pushState", "replaceState"].forEach(function (method) {
        var original = window.history[method];
        if (original) window.history[method] = function () {
          var result = original.apply(this, arguments); // the page's own errors stay its own
          safe(pageView)();
          return result;
        };
      });
      on("popstate", pageView);
    }
    later();
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

  var api = window.Usage = {
    init: safe(init),
    track: function (name, details) { // safe(track) without `arguments`: the one hot call
      try {
        return track(name, details);
      } catch (e) {
        log("error", e);
      }
    },
    flush: safe(function () { pump(true); })
  };
  // The snippet's stub queued [method, arguments, time] until now.
  ((stub && stub.q) || []).forEach(function (call) {
    if (call[0] == "track") safe(track)(call[1][0], call[1][1], call[2]); // at the time of the call
    else if (api[call[0]]) api[call[0]].apply(api, call[1]);
  });
})(window);
