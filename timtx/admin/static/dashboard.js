// The timtx dashboard: logs in to the admin API, then reads /api/dashboard
// once a second and draws it.  Everything it needs is in this file and
// dashboard.css, served by the node; it talks to nothing else.
"use strict";

(function () {
  const TOKEN_KEY = "timtx-admin-token";
  const $ = (id) => document.getElementById(id);
  let timer = null;

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  async function api(path, options) {
    const headers = { "Content-Type": "application/json" };
    const t = token();
    if (t) headers.Authorization = "Bearer " + t;
    const response = await fetch(path, Object.assign({ headers: headers }, options || {}));
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      const error = new Error((body && body.error && body.error.message) || response.statusText);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  function show(section) {
    $("login").hidden = section !== "login";
    $("dashboard").hidden = section !== "dashboard";
    $("logout").hidden = section !== "dashboard";
  }

  function text(id, value) {
    const element = $(id);
    if (element) element.textContent = value;
  }

  function number(value, digits) {
    if (value === null || value === undefined) return "-";
    if (digits === undefined) digits = value >= 100 ? 0 : 1;
    return Number(value).toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  }

  function seconds(value) {
    if (value === null || value === undefined) return "-";
    if (value < 0.001) return (value * 1e6).toFixed(0) + " \u00b5s";
    if (value < 1) return (value * 1000).toFixed(value < 0.01 ? 2 : 1) + " ms";
    return value.toFixed(2) + " s";
  }

  function duration(value) {
    if (value === null || value === undefined) return "";
    const s = Math.floor(value);
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    return "up " + (d ? d + "d " : "") + (h ? h + "h " : "") + m + "m " + (s % 60) + "s";
  }

  function when(value) {
    if (value === null || value === undefined) return "-";
    return new Date(value * 1000).toLocaleString();
  }

  const SVG = "http://www.w3.org/2000/svg";

  function chart(id, lines) {
    const svg = $(id);
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    let max = 0;
    let longest = 0;
    for (const line of lines) {
      for (const v of line.values) if (v !== null && v > max) max = v;
      longest = Math.max(longest, line.values.length);
    }
    if (max <= 0) max = 1;
    const width = 600;
    const height = 120;
    const step = longest > 1 ? width / (longest - 1) : width;
    for (const line of lines) {
      const points = [];
      line.values.forEach((v, i) => {
        if (v === null) return;
        points.push((i * step).toFixed(1) + "," + (height - 4 - (v / max) * (height - 8)).toFixed(1));
      });
      const path = document.createElementNS(SVG, "polyline");
      path.setAttribute("points", points.join(" "));
      path.setAttribute("class", "line " + line.cls);
      svg.appendChild(path);
    }
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", String(width - 4));
    label.setAttribute("y", "12");
    label.setAttribute("text-anchor", "end");
    label.setAttribute("class", "axis");
    label.textContent = "max " + (lines[0].format ? lines[0].format(max) : number(max));
    svg.appendChild(label);
  }

  function row(cells, cls) {
    const tr = document.createElement("tr");
    for (const cell of cells) {
      const td = document.createElement("td");
      if (cell && cell.badge) {
        const span = document.createElement("span");
        span.className = "badge " + cell.badge;
        span.textContent = cell.badge;
        td.appendChild(span);
      } else {
        td.textContent = cell;
      }
      tr.appendChild(td);
    }
    if (cls) tr.className = cls;
    return tr;
  }

  function fill(id, rows) {
    const body = $(id);
    while (body.firstChild) body.removeChild(body.firstChild);
    for (const r of rows) body.appendChild(r);
  }

  function render(d) {
    text("node-id", d.node.id);
    text("node-version", "v" + d.node.version);
    text("node-uptime", duration(d.node.uptime));
    text("sessions", number(d.gauges.sessions, 0));
    text("connections", number(d.gauges.connections, 0));
    text("users", number(d.gauges.users, 0));
    text("messages-rate", number(d.rates.stored));
    text("messages-total", number(d.totals.stored, 0));
    text("deliveries-rate", number(d.rates.deliveries));
    text("deliveries-total", number(d.totals.deliveries, 0));
    text("acked-total", number(d.totals.acked, 0));
    text("fanout-p50", seconds(d.latency.fanout.p50));
    text("fanout-p90", seconds(d.latency.fanout.p90));
    text("fanout-p99", seconds(d.latency.fanout.p99));
    text("ack-p50", seconds(d.latency.ackDirect.p50));
    text("ack-p99", seconds(d.latency.ackDirect.p99));
    text("store-p50", seconds(d.latency.store.p50));
    text("store-p99", seconds(d.latency.store.p99));
    text("store-backend", d.store.backend);
    text("store-state", d.store.available ? "reachable" : "UNREACHABLE");
    $("store-state").className = d.store.available ? "ok" : "bad";
    text("slow-dropped", number(d.totals.slowReadersDropped, 0));
    text("lag-p99", seconds(d.latency.lag.p99));
    text("vrooms", number(d.gauges.vrooms, 0));
    text("subscribers", number(d.gauges.subscribers, 0));
    text("logins-rate", number(d.rates.logins));
    text("login-failures", number(d.totals.loginFailures, 0));
    text("blocked", number(d.accountsBlocked, 0));
    text("status", "Updated " + new Date().toLocaleTimeString() + " (rates over the last " + number(d.window, 0) + " s)");
    const s = d.series;
    chart("chart-traffic", [
      { values: s.messages, cls: "blue" },
      { values: s.deliveries, cls: "green" },
    ]);
    chart("chart-sessions", [{ values: s.sessions, cls: "blue" }]);
    chart("chart-latency", [
      { values: s.fanoutP99, cls: "blue", format: seconds },
      { values: s.storeP99, cls: "orange" },
      { values: s.lag, cls: "red" },
    ]);
    const c = d.cluster;
    text("cluster-summary", c.clustered ? c.live + " of " + c.size + " members live" : "a single node, no cluster");
    fill(
      "members",
      c.members.map((m) =>
        row([m.id + (m.self ? " (this node)" : ""), { badge: m.state }, m.address || "-", m.incarnation, when(m.since)], m.self ? "self" : "")
      )
    );
    fill(
      "rooms",
      d.vrooms.length
        ? d.vrooms.map((r) => row([r.vnode, r.founder, r.subscribers, number(r.framesPerSecond), r.dropped]))
        : [row(["no virtual rooms", "", "", "", ""], "empty")]
    );
  }

  async function refresh() {
    timer = null;
    try {
      render(await api("/api/dashboard"));
    } catch (e) {
      if (e.status === 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        show("login");
        text("login-error", "Your login ended; log in again.");
        return;
      }
      text("status", "Cannot reach the node: " + e.message);
    }
    timer = setTimeout(refresh, 1000);
  }

  async function start() {
    try {
      const me = await api("/api/me");
      text("whoami", me.name + " (" + me.role + ")");
    } catch (e) {
      sessionStorage.removeItem(TOKEN_KEY);
      show("login");
      return;
    }
    show("dashboard");
    if (timer === null) refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      text("login-error", "");
      try {
        const answer = await api("/api/login", {
          method: "POST",
          body: JSON.stringify({ name: $("name").value, password: $("password").value }),
        });
        sessionStorage.setItem(TOKEN_KEY, answer.token);
        $("password").value = "";
        start();
      } catch (e) {
        text("login-error", e.message);
      }
    });
    $("logout").addEventListener("click", async () => {
      try {
        await api("/api/logout", { method: "POST" });
      } catch (e) {
        // The token is forgotten either way.
      }
      sessionStorage.removeItem(TOKEN_KEY);
      if (timer !== null) clearTimeout(timer);
      timer = null;
      show("login");
    });
    if (token()) start();
    else show("login");
  });
})();
