// logbook console: small progressive enhancement on top of server-rendered
// pages (every page works without it). No inline script: CSP is 'self'.
"use strict";
document.addEventListener("change", function (e) {
  var t = e.target;
  // Selects in an auto-submitting filter form apply at once.
  if (t instanceof HTMLSelectElement && t.form && t.form.classList.contains("autosubmit")) {
    t.form.requestSubmit();
  }
});

// The session's timeline: records per level over its time (uPlot), drawn
// from the JSON of [data-timeline]. A click opens the logs from that
// moment; a drag opens the logs of the selected range.
function drawTimelines(root) {
  if (typeof uPlot === "undefined") return;
  root.querySelectorAll("[data-timeline]").forEach(function (el) {
    if (el.dataset.drawn) return;
    el.dataset.drawn = "1";
    fetch(el.dataset.timeline, { credentials: "same-origin" })
      .then(function (r) {
        if (r.ok) return r.json();
        // The hub explains a refusal in the page's one-line message.
        return r.text().then(function (html) {
          var doc = new DOMParser().parseFromString(html, "text/html");
          var why = doc.querySelector("p.error");
          throw new Error("No timeline: " + (why ? why.textContent : "HTTP " + r.status));
        });
      })
      .then(function (t) { plot(el, t); })
      .catch(function (e) {
        el.classList.add("empty");
        el.textContent = String(e.message || e);
      });
  });
}

function plot(el, t) {
  var css = getComputedStyle(document.documentElement);
  var xs = [];
  for (var i = 0; i < t.buckets; i++) xs.push((t.start_ns + i * t.step_ns) / 1e9);
  var data = [xs];
  var series = [{}];
  t.series.forEach(function (s) {
    // Errors and fatals are marks: a point where there are some, nothing
    // where there are none.
    var marks = s.level === "error" || s.level === "fatal";
    data.push(marks ? s.counts.map(function (c) { return c > 0 ? c : null; }) : s.counts);
    series.push({
      label: s.level,
      stroke: css.getPropertyValue("--" + s.level).trim() || "gray",
      width: marks ? 2.5 : 1.5,
      points: { show: marks, size: 9 },
    });
  });
  var logs = el.dataset.logs;
  var iso = function (secs) { return new Date(secs * 1000).toISOString(); };
  var open = function (since, until) {
    var q = "?order=asc&since=" + encodeURIComponent(iso(since));
    if (until !== undefined) q += "&until=" + encodeURIComponent(iso(until));
    window.location.href = logs + q;
  };
  var u = new uPlot({
    width: Math.max(el.clientWidth, 300),
    height: 220,
    scales: { x: { time: true } },
    // Times in UTC, as everywhere else in the console.
    tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"); },
    axes: [
      { stroke: css.getPropertyValue("--muted").trim() },
      { stroke: css.getPropertyValue("--muted").trim() },
    ],
    cursor: { drag: { x: true, y: false } },
    series: series,
    hooks: {
      setSelect: [function (u) {
        if (u.select.width < 3) return;
        open(u.posToVal(u.select.left, "x"), u.posToVal(u.select.left + u.select.width, "x"));
      }],
    },
  }, data, el);
  var down = null;
  u.over.addEventListener("mousedown", function (e) { down = e.clientX; });
  u.over.addEventListener("mouseup", function (e) {
    // A click, not a drag: the logs from the bucket under the cursor.
    if (down !== null && Math.abs(e.clientX - down) < 3 && u.cursor.left >= 0) {
      var i = u.posToIdx(u.cursor.left);
      open(xs[i], xs[i] + t.step_ns / 1e9);
    }
    down = null;
  });
  window.addEventListener("resize", function () { u.setSize({ width: Math.max(el.clientWidth, 300), height: 220 }); });
}

document.addEventListener("DOMContentLoaded", function () { drawTimelines(document); });
// Pages reached through htmx (boosted links) swap the body in.
document.addEventListener("htmx:load", function (e) { drawTimelines(e.target); });

// Live tail: "Follow live" on the newest page of the log viewer opens the
// session's WebSocket stream (same filters) and puts each new line on
// top, keeping what the reader looks at where it is when scrolled down.
var liveSockets = [];

function setupLive(root) {
  root.querySelectorAll("[data-live]").forEach(function (btn) {
    if (btn.dataset.ready) return;
    btn.dataset.ready = "1";
    var state = btn.parentNode.querySelector(".live-state");
    var ws = null;
    btn.addEventListener("click", function () {
      if (ws) { ws.close(1000, "stopped"); return; }
      var url = new URL(btn.dataset.live, window.location.href);
      url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
      ws = new WebSocket(url.href);
      liveSockets.push(ws);
      btn.textContent = "Stop following";
      state.textContent = "connecting…";
      ws.onopen = function () { state.textContent = "following: new lines appear on top"; };
      ws.onmessage = function (e) {
        var item = JSON.parse(e.data);
        if (item.event) return;
        addLine(item, btn.dataset.logs);
      };
      ws.onclose = function (e) {
        ws = null;
        btn.textContent = "Follow live";
        state.textContent = e.code === 1000 && e.reason === "stopped" ? "" : (e.reason || "stream ended");
      };
    });
  });
}

function cell(tr, text, cls) {
  var td = document.createElement("td");
  if (cls) td.className = cls;
  if (text !== null) td.textContent = text;
  tr.appendChild(td);
  return td;
}

function addLine(item, logs) {
  var tbody = document.querySelector("table.logs tbody");
  if (!tbody) return;
  var empty = document.getElementById("no-lines");
  if (empty) empty.remove();
  var tr = document.createElement("tr");
  tr.id = "l" + item.seq;
  tr.className = "live";
  var a = document.createElement("a");
  a.href = logs + "?before=" + (item.seq + 1) + "#l" + item.seq;
  a.textContent = String(item.seq);
  cell(tr, null, "num").appendChild(a);
  cell(tr, item.timestamp.replace("T", " "), "mono nowrap");
  var lvl = document.createElement("span");
  var level = String(item.level).toLowerCase();
  lvl.className = "lvl " + level;
  lvl.textContent = level.toUpperCase();
  cell(tr, null, null).appendChild(lvl);
  cell(tr, item.module, "mono");
  var msg = cell(tr, item.message, "msg");
  var meta = JSON.stringify(item.metadata || {});
  if (meta !== "{}") {
    var m = document.createElement("div");
    m.className = "meta mono";
    m.textContent = meta;
    msg.appendChild(m);
  }
  if (item.process || item.pid) {
    var p = document.createElement("div");
    p.className = "proc mono";
    p.textContent = (item.process || "") + (item.pid ? "[" + item.pid + "]" : "");
    msg.appendChild(p);
  }
  // Scrolled down: keep the lines being read still on screen.
  var keep = window.scrollY > 0;
  var before = document.documentElement.scrollHeight;
  tbody.insertBefore(tr, tbody.firstChild);
  if (keep) window.scrollBy(0, document.documentElement.scrollHeight - before);
  var total = document.querySelector(".total");
  if (total) total.textContent = String(Number(total.textContent) + 1);
}

document.addEventListener("DOMContentLoaded", function () { setupLive(document); });
document.addEventListener("htmx:load", function (e) { setupLive(e.target); });
// Leaving the page through htmx ends its streams.
document.addEventListener("htmx:beforeSwap", function () {
  liveSockets.forEach(function (s) { s.close(1000, "stopped"); });
  liveSockets = [];
});
