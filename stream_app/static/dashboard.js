/* The worker dashboard (stream_app/dashboard.py): polls dashboard/api/series every second, keeps a
 * rolling window of samples, draws them with uPlot; the user inspector asks dashboard/api/user/<id>.
 * No build step, no framework. window.nx exposes what the page holds (the browser test reads it).
 * Everything that comes from events (user and item ids, categories ...) goes into the page as text,
 * never as HTML. */
(function () {
  "use strict";

  var POLL_MS = 1000;
  var INSPECT_REFRESH_MS = 5000;
  var COLORS = ["#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0e8a9e", "#6e7781",
                "#fb8500", "#3d5a80"];
  var MARK_COLORS = {deploy: "#1f6feb", online: "#1a7f37", reset: "#9a6700", rollback: "#d1242f",
                     rejected: "#cf222e", drift: "#8250df"};

  var state = {samples: [], marks: [], window: 600, interval: 1, trainer: null, inspected: null};
  var nx = window.nx = {polls: 0, errors: [], charts: {}, inspector: null, lastPoll: null, samples: 0};
  var charts = {};

  // --- helpers ------------------------------------------------------------------------------------------
  function el(tag, attrs) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "cls") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) continue;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return node;
  }
  function num(v) { return (v === null || v === undefined || typeof v !== "number" || !isFinite(v)) ? null : v; }
  function keysOf(field) {  // the keys a per-sample map had anywhere in the window, sorted
    var seen = {};
    state.samples.forEach(function (s) { Object.keys(s[field] || {}).forEach(function (k) { seen[k] = 1; }); });
    return Object.keys(seen).sort();
  }
  function onlineKeys(metric) {
    var seen = {};
    state.samples.forEach(function (s) {
      if (s.online) Object.keys(s.online[metric] || {}).forEach(function (k) { seen[k] = 1; });
    });
    return Object.keys(seen).sort();
  }
  var versionColors = {};
  function versionColor(v) {  // one colour per model version, the same in every chart
    if (!(v in versionColors)) versionColors[v] = COLORS[Object.keys(versionColors).length % COLORS.length];
    return versionColors[v];
  }
  function fmtTime(ms) { return new Date(ms).toISOString().replace("T", " ").slice(0, 19) + "Z"; }
  function pct(x) { return (100 * x).toFixed(x >= 0.1 ? 1 : 2) + "%"; }
  function short(v) { return v && v.length > 24 ? v.slice(0, 23) + "…" : (v || "—"); }

  // --- chart definitions: [label, sample -> value, colour?] per series --------------------------------------------
  var DEFS = [
    {id: "throughput", series: function () {
      return [["events in", function (s) { return s.events_per_s; }],
              ["predictions out", function (s) { return s.predictions_per_s; }],
              ["dead letters", function (s) { return s.dlq_per_s; }]];
    }},
    {id: "latency", series: function () {
      return [["p50", function (s) { return s.p50_ms; }], ["p99", function (s) { return s.p99_ms; }]];
    }},
    {id: "batch", series: function () {
      return [["mean", function (s) { return s.batch_mean; }], ["p99", function (s) { return s.batch_p99; }],
              ["queued", function (s) { return s.queue; }]];
    }},
    {id: "dlq", series: function () {
      var out = [["all reasons", function (s) {
        return Object.keys(s.dlq || {}).reduce(function (a, k) { return a + s.dlq[k]; }, 0);
      }]];
      keysOf("dlq").forEach(function (r) { out.push([r, function (s) { return (s.dlq || {})[r] || 0; }]); });
      return out;
    }},
    {id: "lag", series: function () {
      var out = [["total", function (s) { return s.lag_total; }]];
      keysOf("lag").forEach(function (p) { out.push([p, function (s) { return s.lag ? num(s.lag[p]) : null; }]); });
      return out;
    }},
    {id: "versions", marks: true, series: function () {
      return keysOf("versions").map(function (v) {
        return [short(v), function (s) { return s.versions ? num(s.versions[v]) : null; }, versionColor(v)];
      });
    }},
    {id: "ndcg", marks: true, online: true, series: function () {
      return onlineKeys("ndcg10").map(function (v) {
        return [short(v), function (s) { return s.online ? num(s.online.ndcg10[v]) : null; }, versionColor(v)];
      });
    }},
    {id: "logloss", marks: true, online: true, series: function () {
      return onlineKeys("log_loss").map(function (v) {
        return [short(v), function (s) { return s.online ? num(s.online.log_loss[v]) : null; }, versionColor(v)];
      });
    }}
  ];

  function drawMarks(u) {
    var ctx = u.ctx, b = u.bbox, dpr = window.devicePixelRatio || 1, drawn = 0;
    var lo = u.scales.x.min, hi = u.scales.x.max;
    state.marks.forEach(function (m) {
      if (lo === undefined || m.t < lo || m.t > hi) return;
      var x = Math.round(u.valToPos(m.t, "x", true)), color = MARK_COLORS[m.kind] || "#57606a";
      ctx.save();
      ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 1.5 * dpr; ctx.setLineDash([5 * dpr, 3 * dpr]);
      ctx.beginPath(); ctx.moveTo(x, b.top); ctx.lineTo(x, b.top + b.height); ctx.stroke();
      ctx.font = (11 * dpr) + "px sans-serif";
      ctx.fillText(m.kind + " " + short(m.label), x + 4 * dpr, b.top + (12 + 13 * (drawn % 3)) * dpr);
      ctx.restore();
      drawn++;
    });
    if (nx.charts[u.nxId]) nx.charts[u.nxId].marks = drawn;
  }

  function render(def) {
    var card = document.querySelector('[data-chart="' + def.id + '"]');
    var box = card.querySelector(".plot");
    var series = def.series();
    var names = series.map(function (x) { return x[0]; });
    var colors = series.map(function (x, i) { return x[2] || COLORS[i % COLORS.length]; });
    var xs = state.samples.map(function (s) { return s.t; });
    var data = [xs].concat(series.map(function (x) {
      return state.samples.map(function (s) { return num(x[1](s)); });
    }));
    var points = data.slice(1).map(function (ys) { return ys.filter(function (v) { return v !== null; }).length; });
    var lastValues = data.slice(1).map(function (ys) {
      for (var i = ys.length - 1; i >= 0; i--) if (ys[i] !== null) return ys[i];
      return null;
    });
    var maxValues = data.slice(1).map(function (ys) {
      return ys.reduce(function (a, v) { return v === null ? a : (a === null ? v : Math.max(a, v)); }, null);
    });
    nx.charts[def.id] = {series: names, points: points, last: lastValues, max: maxValues, samples: xs.length,
                         marks: nx.charts[def.id] ? nx.charts[def.id].marks : 0};
    if (def.online) {
      var note = card.querySelector(".note");
      var t = state.trainer;
      note.textContent = names.length ? "" : (t && !t.ok
        ? "No online-learning figures: no trainer answers at " + t.url + (t.error ? " (" + t.error + ")" : "") + "."
        : "No online-learning figures yet.");
    }
    var sig = names.join("\u0001") + "\u0002" + colors.join(",");
    var c = charts[def.id];
    if (c && c.sig === sig) {
      c.u.setData(data);
      return;
    }
    if (c) c.u.destroy();
    if (!names.length) { charts[def.id] = null; box.textContent = ""; return; }
    box.textContent = "";
    var opts = {
      width: Math.max(300, box.clientWidth), height: 230,
      scales: {x: {time: true}},
      series: [{}].concat(names.map(function (n, i) {
        return {label: n, stroke: colors[i], width: 1.6, spanGaps: true, points: {show: false}};
      })),
      axes: [{stroke: "#57606a", grid: {stroke: "#eef1f4"}}, {stroke: "#57606a", size: 56, grid: {stroke: "#eef1f4"}}],
      legend: {live: false},
      hooks: def.marks ? {draw: [drawMarks]} : {}
    };
    var u = new uPlot(opts, data, box);
    u.nxId = def.id;
    charts[def.id] = {sig: sig, u: u, box: box};
  }

  window.addEventListener("resize", function () {
    Object.keys(charts).forEach(function (id) {
      var c = charts[id];
      if (c) c.u.setSize({width: Math.max(300, c.box.clientWidth), height: 230});
    });
  });

  // --- polling ---------------------------------------------------------------------------------------------
  function setStatus(cls, text) {
    var s = document.getElementById("status");
    s.className = "pill " + cls;
    s.textContent = text;
  }

  function ingest(body) {
    state.window = body.window || state.window;
    state.interval = body.interval_s || state.interval;
    var last = state.samples.length ? state.samples[state.samples.length - 1].t : -Infinity;
    body.samples.forEach(function (s) { if (s.t > last) state.samples.push(s); });
    var oldest = body.now - state.window * state.interval;
    while (state.samples.length && (state.samples.length > state.window || state.samples[0].t < oldest)) {
      state.samples.shift();
    }
    state.marks = body.marks || [];
    state.trainer = body.trainer;
    nx.samples = state.samples.length;
    var w = body.worker || {};
    document.getElementById("w-app").textContent = w.app_id || "?";
    document.getElementById("w-host").textContent = (w.host || "?") + " pid " + (w.pid || "?");
    document.getElementById("w-served").textContent = w.served || "(no event yet)";
    document.getElementById("w-assigned").textContent = (w.assigned || []).join(" ") || "none";
    var t = body.trainer || {};
    document.getElementById("w-trainer").textContent = t.ok ? "live (" + t.url + ")" : "none at " + t.url;
    renderRecent(body.recent_users || []);
    DEFS.forEach(render);
  }

  function poll() {
    var since = state.samples.length ? state.samples[state.samples.length - 1].t : null;
    fetch("dashboard/api/series" + (since !== null ? "?since=" + since : ""), {cache: "no-store"})
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (body) {
        ingest(body);
        nx.polls++;
        nx.lastPoll = Date.now();
        setStatus("ok", "live · " + state.samples.length + " samples");
      })
      .catch(function (e) {
        nx.errors.push(String(e));
        if (nx.errors.length > 50) nx.errors.shift();
        setStatus("err", "no answer: " + e);
      })
      .then(function () { setTimeout(poll, POLL_MS); });
  }

  // --- the user inspector ---------------------------------------------------------------------------------
  function renderRecent(users) {
    var ul = document.getElementById("recent-users");
    ul.textContent = "";
    if (!users.length) { ul.appendChild(el("li", {cls: "muted", text: "none yet"})); return; }
    users.forEach(function (u) {
      var b = el("button", {type: "button", "data-user": u.user_id, text: u.user_id,
                            title: "last prediction " + fmtTime(u.t * 1000)});
      if (u.user_id === state.inspected) b.className = "current";
      b.addEventListener("click", function () { inspect(u.user_id); });
      ul.appendChild(el("li", {}, b));
    });
  }

  function bar(x) {  // a probability as a bar; any other score (not in [0, 1]) as its number
    if (typeof x !== "number" || !(x >= 0 && x <= 1)) return el("span", {cls: "mono", text: String(x)});
    var b = el("div", {cls: "bar"}, el("span"), el("em", {text: pct(x)}));
    b.firstChild.style.width = (100 * x) + "%";
    return b;
  }

  function renderUser(body, code) {
    var out = document.getElementById("inspector-result");
    out.className = "";
    out.textContent = "";
    var head = el("div", {cls: "user-head"}, el("strong", {text: body.user_id}),
                  el("span", {cls: "muted", text: body.partition === null || body.partition === undefined
                    ? "partition: any held" : "partition " + body.partition}));
    out.appendChild(head);
    if (body.status !== "ok") {
      out.appendChild(el("div", {cls: "message", text: body.message || ("HTTP " + code)}));
      return;
    }
    head.appendChild(el("span", {cls: "muted", text: body.history_len + " events stored"}));
    if (body.in_flight) head.appendChild(el("span", {cls: "muted", text: body.in_flight + " in flight"}));
    var p = body.prediction;
    var tops = {};
    var left = el("div", {cls: "prediction"});
    if (p) {
      (p.top_items || []).forEach(function (t) { tops[t[0]] = 1; });
      left.appendChild(el("h3", {text: "Latest prediction"}));
      left.appendChild(el("p", {cls: "muted", text: "by " + p.model_version + " for the event at " + fmtTime(p.event_ts) +
                                 "; next action expected in " + (p.next_gap_s === null ? "?" : p.next_gap_s.toFixed(1)) + " s"}));
      var at = el("table", {cls: "actions"}, el("tr", {}, el("th", {text: "next action"}), el("th", {text: "probability"})));
      Object.keys(p.action_probs).forEach(function (a) {
        at.appendChild(el("tr", {}, el("td", {text: a}), el("td", {}, bar(p.action_probs[a]))));
      });
      left.appendChild(at);
      var tt = el("table", {cls: "top-items"}, el("tr", {}, el("th", {text: "#"}), el("th", {text: "next item"}),
                                                     el("th", {text: "probability"})));
      (p.top_items || []).forEach(function (t, i) {
        tt.appendChild(el("tr", {}, el("td", {text: String(i + 1)}), el("td", {cls: "mono", text: String(t[0])}),
                              el("td", {}, bar(t[1]))));
      });
      left.appendChild(el("h3", {text: "Top items"}));
      left.appendChild(tt);
    } else {
      left.appendChild(el("p", {cls: "muted", text: "No prediction stored yet."}));
    }
    var right = el("div", {cls: "history"}, el("h3", {text: "Recent events (newest first)"}));
    var ht = el("table", {cls: "history-table"}, el("tr", {}, el("th", {text: "event time"}), el("th", {text: "action"}),
                el("th", {text: "item"}), el("th", {text: "category"}), el("th", {text: "device"}), el("th", {text: "location"})));
    body.history.forEach(function (e) {
      var row = el("tr", {}, el("td", {cls: "mono", text: fmtTime(e.ts)}), el("td", {text: e.action}),
                   el("td", {cls: "mono", text: e.item_id}), el("td", {text: e.category}), el("td", {text: e.device}),
                   el("td", {text: e.location}));
      if (tops[e.item_id]) row.className = "hit";
      ht.appendChild(row);
    });
    right.appendChild(ht);
    out.appendChild(el("div", {cls: "user-body"}, left, right));
  }

  var refreshTimer = null;
  function inspect(user) {
    if (!user) return;
    state.inspected = user;
    document.getElementById("user-id").value = user;
    nx.inspector = {user: user, status: "loading"};
    if (refreshTimer) clearTimeout(refreshTimer);
    return fetch("dashboard/api/user/" + encodeURIComponent(user), {cache: "no-store"})
      .then(function (r) { return r.json().then(function (body) { return [r.status, body]; }); })
      .then(function (res) {
        if (state.inspected !== user) return;
        var code = res[0], body = res[1];
        renderUser(body, code);
        var p = body.prediction;
        nx.inspector = {user: user, http: code, status: body.status, history: (body.history || []).length,
                        top_items: p ? p.top_items.length : 0, model_version: p ? p.model_version : null};
        Array.prototype.forEach.call(document.querySelectorAll("#recent-users button"), function (b) {
          b.className = b.getAttribute("data-user") === user ? "current" : "";
        });
        if (body.status === "ok") refreshTimer = setTimeout(function () { inspect(user); }, INSPECT_REFRESH_MS);
      })
      .catch(function (e) {
        nx.errors.push("inspector: " + e);
        nx.inspector = {user: user, status: "error", error: String(e)};
      });
  }
  nx.inspect = inspect;

  document.getElementById("user-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    inspect(document.getElementById("user-id").value.trim());
  });

  poll();
})();
