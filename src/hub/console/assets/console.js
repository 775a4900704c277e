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
      .then(function (r) { if (!r.ok) throw new Error("timeline: HTTP " + r.status); return r.json(); })
      .then(function (t) { plot(el, t); })
      .catch(function (e) { el.textContent = String(e.message || e); });
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
