// The runner's dashboard: polls /api/state about once a second and redraws. No libraries, no CDN.
(function () {
  "use strict";
  var token = new URLSearchParams(location.search).get("token") || "";
  var $ = function (id) { return document.getElementById(id); };
  var POLL_MS = 1000;
  var last = null;

  function api(path) {
    var sep = path.indexOf("?") < 0 ? "?" : "&";
    return fetch(path + sep + "token=" + encodeURIComponent(token), { cache: "no-store" }).then(function (r) {
      if (!r.ok) { return r.text().then(function (t) { throw new Error(r.status + ": " + t); }); }
      return r.json();
    });
  }

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }

  function num(v) { return v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US"); }
  function ms(v) { return v === null || v === undefined ? "–" : (v < 100 ? v.toFixed(2) : Math.round(v).toLocaleString("en-US")); }
  function dur(s) {
    if (s === null || s === undefined) { return "–"; }
    s = Math.max(0, s);
    if (s < 60) { return s.toFixed(1) + " s"; }
    var m = Math.floor(s / 60), h = Math.floor(m / 60);
    return h ? h + " h " + (m % 60) + " m" : m + " m " + Math.floor(s % 60) + " s";
  }
  function bytes(b) {
    if (b === null || b === undefined) { return "–"; }
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
    return b.toFixed(i ? 1 : 0) + " " + units[i];
  }

  function sparkline(values) {
    var w = 120, h = 22, ns = "http://www.w3.org/2000/svg";
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("class", "spark"); svg.setAttribute("width", w); svg.setAttribute("height", h);
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    if (values.length > 1) {
      var top = Math.max.apply(null, values.concat([1e-9]));
      var d = values.map(function (v, i) {
        var x = (i / (values.length - 1)) * (w - 2) + 1, y = h - 1 - (v / top) * (h - 2);
        return (i ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
      }).join(" ");
      var path = document.createElementNS(ns, "path"); path.setAttribute("d", d); svg.appendChild(path);
    }
    var title = document.createElementNS(ns, "title");
    title.textContent = values.length ? "now " + values[values.length - 1] + " jobs/s" : "no data yet";
    svg.appendChild(title);
    return svg;
  }

  function cell(row, value, cls) {
    var td = el("td", cls ? { "class": cls } : {}, value);
    row.appendChild(td);
    return td;
  }

  function drawRun(s) {
    var run = s.run, c = s.counts;
    document.title = run.name + " · runner";
    $("run-name").textContent = run.name;
    $("run-id").textContent = run.run_id;
    $("run-status").textContent = run.over ? run.status + " (exit " + run.exit_code + ")" : run.state;
    $("elapsed").textContent = dur(run.elapsed_s);
    $("eta").textContent = run.total === null ? "no total declared" : (run.eta_s === null ? "estimating" : dur(run.eta_s)) + " (of " + num(run.total) + " jobs)";
    ["produced", "done", "failed", "dead"].forEach(function (k) { $(k).textContent = num(c[k]); });
    $("version").textContent = "runner " + run.version;
    var error = $("error");
    error.hidden = !run.error;
    error.textContent = run.error || "";
  }

  function drawPools(s) {
    var body = $("pools").tBodies[0];
    body.textContent = "";
    Object.keys(s.pools).forEach(function (name) {
      var p = s.pools[name];
      if (p.role !== "consumer") { return; }
      var row = el("tr", { "data-pool": name });
      cell(row, name);
      cell(row, num(p.done), "done");
      cell(row, num(p.failed), "failed" + (p.failed ? " bad" : ""));
      cell(row, num(p.dead), "dead" + (p.dead ? " bad" : ""));
      cell(row, num(p.queued), "queued");
      cell(row, num(p.in_flight), "in_flight");
      cell(row, num(p.retried), "retried");
      var spark = cell(row, "", "rate");
      spark.appendChild(sparkline(p.rates));
      spark.appendChild(document.createTextNode(" " + (p.rates.length ? num(p.rates[p.rates.length - 1]) : "–")));
      cell(row, ms(p.p50_ms), "p50");
      cell(row, ms(p.p95_ms), "p95");
      body.appendChild(row);
    });
  }

  function drawProcesses(s) {
    var hosts = $("hosts");
    hosts.textContent = "";
    Object.keys(s.hosts).forEach(function (h) {
      hosts.appendChild(el("span", { "class": "host " + s.hosts[h] }, h + ": " + s.hosts[h]));
    });
    var body = $("processes").tBodies[0];
    body.textContent = "";
    s.processes.forEach(function (p) {
      var row = el("tr", { "data-worker": p.worker });
      cell(row, p.worker);
      cell(row, p.pool);
      cell(row, p.host);
      cell(row, p.pid === null ? "–" : p.pid);
      cell(row, p.state, "state-" + p.state);
      cell(row, p.job_id === null ? "–" : p.job_id, "job");
      cell(row, p.job_s === null ? "–" : dur(p.job_s));
      cell(row, bytes(p.rss));
      cell(row, num(p.restarts));
      cell(row, num(p.jobs));
      body.appendChild(row);
    });
  }

  function drawFailures(s) {
    var list = $("failures");
    var key = s.failures.length ? s.failures[s.failures.length - 1].time + s.failures.length : "";
    if (list.getAttribute("data-key") === key) { return; }  // unchanged: keep open tracebacks open
    list.setAttribute("data-key", key);
    list.textContent = "";
    $("failures-note").textContent = s.failures.length ? "(newest first, the last " + s.failures.length + ")" : "(none)";
    s.failures.slice().reverse().forEach(function (f) {
      var item = el("li", { "data-job": f.job_id });
      item.appendChild(el("div", { "class": "meta" }, f.time.replace("T", " ").replace("Z", "") + " · pool " + f.pool + " · job " +
        f.job_id + " attempt " + f.attempt + " · " + f.cause + (f.worker ? " · " + f.worker : "")));
      item.appendChild(el("div", { "class": "err" }, f.error));
      if (f.traceback) {
        var details = el("details");
        details.appendChild(el("summary", {}, "traceback"));
        details.appendChild(el("pre", {}, f.traceback));
        item.appendChild(details);
      }
      list.appendChild(item);
    });
  }

  function draw(s) {
    if (!s) { return; }
    last = s;
    drawRun(s);
    drawPools(s);
    drawProcesses(s);
    drawFailures(s);
  }

  function poll() {
    api("/api/state").then(function (s) {
      draw(s);
      $("conn").textContent = s && s.run.over ? "run over" : "live";
      $("conn").className = "conn live";
    }).catch(function (e) {
      $("conn").textContent = last && last.run.over ? "run over (coordinator gone)" : "no answer: " + e.message;
      $("conn").className = "conn lost";
    }).then(function () {
      if (!(last && last.run.over)) { setTimeout(poll, POLL_MS); }
    });
  }

  function showTrace(t) {
    var out = $("trace");
    out.textContent = "";
    if (t.error) { out.appendChild(el("p", { "class": "error" }, t.error)); return; }
    var tries = t.attempts.length;
    out.appendChild(el("p", { id: "trace-head" }, "job " + t.job_id + " (pool " + (t.pool || "?") + ", produced by " + (t.origin || "?") +
      "): " + t.outcome + " after " + tries + " attempt" + (tries === 1 ? "" : "s")));
    var table = el("table", { id: "trace-steps" });
    var head = el("tr");
    ["time (UTC)", "step", "detail"].forEach(function (h) { head.appendChild(el("th", {}, h)); });
    table.appendChild(head);
    t.steps.forEach(function (step) {
      var row = el("tr");
      cell(row, step.timestamp.replace("T", " ").slice(0, 23));
      cell(row, step.what);
      cell(row, step.detail);
      table.appendChild(row);
    });
    out.appendChild(table);
    if (t.dropped_steps) { out.appendChild(el("p", {}, "... and " + t.dropped_steps + " more lines about this job")); }
  }

  $("lookup").addEventListener("submit", function (event) {
    event.preventDefault();
    var job = $("job-input").value.trim();
    $("trace").textContent = "looking…";
    api("/api/trace?job=" + encodeURIComponent(job)).then(showTrace).catch(function (e) {
      $("trace").textContent = "no answer: " + e.message;
    });
  });

  poll();
})();
