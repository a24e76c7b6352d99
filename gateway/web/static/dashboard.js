// The cluster dashboard: log in with a token (kept in this tab's sessionStorage), then
// refresh the views from the JSON API every two seconds. No framework, no build step.
"use strict";

const REFRESH_MS = 2000;
const $ = (id) => document.getElementById(id);
let me = null;
let range = "hour";
let timer = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

async function api(path, options = {}) {
  const token = sessionStorage.getItem("bitfusion-token");
  const response = await fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
  });
  const text = await response.text();
  const data = text ? JSON.parse(text) : {};
  if (!response.ok) {
    const error = new Error(data.message || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

function age(seconds) {
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function gpuView(server, gpu) {
  const total = gpu.memory_total_mib;
  const bar = el("div", { class: "bar", "data-testid": "gpu-bar" });
  // Every share is a segment; those the token may see carry their id and usage.
  const visible = [...gpu.shares];
  const anonymous = [...gpu.share_sizes_mib];
  for (const s of visible) {
    const i = anonymous.indexOf(s.mib);
    if (i >= 0) anonymous.splice(i, 1);  // the two lists come from two answers; they may differ
  }
  for (const s of visible) {
    // An admin sees everyone's shares: mine in one colour, other users' (named) in another.
    const mine = me && s.owner === me.user;
    const seg = el("span", {
      class: mine ? "seg mine" : "seg seen", "data-testid": "share-seg", "data-share-id": s.share_id,
      "data-owner": s.owner,
      title: `${s.share_id} (${s.owner}): ${s.used_mib} of ${s.mib} MiB used`,
    });
    seg.style.width = `${(100 * s.mib) / total}%`;
    const used = el("span", { class: "used" });
    used.style.width = `${Math.min(100, (100 * s.used_mib) / s.mib)}%`;
    seg.append(used);
    bar.append(seg);
  }
  for (const mib of anonymous) {
    const seg = el("span", { class: "seg", "data-testid": "share-seg", title: `a share of ${mib} MiB` });
    seg.style.width = `${(100 * mib) / total}%`;
    bar.append(seg);
  }
  const util = gpu.utilization_pct === null ? "–" : `${gpu.utilization_pct} %`;
  const used = gpu.memory_used_mib === null ? "–" : gpu.memory_used_mib;
  const row = el(
    "div", { class: "gpu", "data-testid": "gpu", "data-index": gpu.index },
    el("div", {},
      el("strong", { text: `GPU ${gpu.index} · ${gpu.name}` }),
      gpu.simulated ? el("span", { class: "badge", "data-testid": "simulated", text: "SIMULATED" }) : null,
      gpu.draining ? el("span", { class: "badge drain", "data-testid": "draining", text: "DRAINING" }) : null),
    bar,
    el("div", { class: "legend",
      text: `${gpu.share_sizes_mib.length} share(s), ${gpu.memory_granted_mib} of ${total} MiB ` +
            `shared out, ${used} MiB in use, utilisation ${util}` }),
  );
  if (me && me.admin) {
    const button = el("button", { "data-testid": "drain-toggle",
      text: gpu.draining ? "Undrain" : "Drain" });
    button.onclick = () => act(`/api/v1/gpus/${encodeURIComponent(server.address)}/${gpu.index}/drain`,
      { drain: !gpu.draining });
    row.append(button);
  }
  return row;
}

// How the server walls its shares off: quiet when sandboxed, loud when not.
function sandboxBadge(sandbox) {
  if (!sandbox) return null;
  const text = sandbox.sandboxed ? "shares sandboxed" : sandbox.refused ? "SHARES REFUSED" : "UNCONFINED";
  return el("span", {
    class: sandbox.sandboxed ? "sandboxed" : "badge warn",
    "data-testid": "sandbox",
    title: sandbox.line,
    text,
  });
}

function serversView(cluster) {
  const out = [];
  for (const s of cluster.servers) {
    const head = el("div", {},
      el("strong", { text: s.hostname || s.address }), " ",
      el("span", { class: "health", "data-testid": "health",
        text: s.state === "ok"
          ? `${s.address} · up ${age(s.uptime_s ?? 0)} · ` +
            `${s.rtt_ms === null ? "–" : s.rtt_ms.toFixed(1)} ms · ` +
            `version ${s.version} · queue ${s.queued}` +
            (s.idle_timeout_s ? ` · idle timeout ${s.idle_timeout_s} s` : "")
          : `${s.address} · ${s.state}` }),
      s.simulated ? el("span", { class: "badge", text: "SIMULATED POOL" }) : null,
      sandboxBadge(s.sandbox));
    const box = el("div", { class: "server", "data-testid": "server", "data-state": s.state }, head);
    if (s.error) box.append(el("p", { class: "error", text: s.error }));
    for (const g of s.gpus) box.append(gpuView(s, g));
    out.push(box);
  }
  $("servers").replaceChildren(...out);
}

function sharesView(shares) {
  if (!shares.length) {
    $("shares").replaceChildren(el("p", { "data-testid": "no-shares", text: "No active shares you may see." }));
    return;
  }
  const head = el("tr", {}, ...["Server", "Share", "Owner", "Client", "Runs", "GPUs", "Age", "Idle", ""]
    .map((t) => el("th", { text: t })));
  const rows = shares.map((s) => {
    const gpus = s.gpus.map((g) => `GPU ${g.index}: ${g.used_mib}/${g.mib} MiB${g.simulated ? " (sim.)" : ""}`).join(", ");
    const cell = el("td");
    if (me && me.admin) {
      const b = el("button", { "data-testid": "release", text: "Release" });
      b.onclick = () => act(`/api/v1/shares/${encodeURIComponent(s.server)}/${s.share_id}/release`, {});
      cell.append(b);
    }
    return el("tr", { "data-testid": "share-row", "data-share-id": s.share_id },
      el("td", { text: s.hostname || s.server }), el("td", { text: s.share_id }),
      el("td", { text: s.owner }), el("td", { text: s.client_host }), el("td", { text: s.runs }),
      el("td", { text: gpus }), el("td", { text: age(s.age_s) }), el("td", { text: age(s.idle_s) }), cell);
  });
  $("shares").replaceChildren(el("table", {}, head, ...rows));
}

const SVG = "http://www.w3.org/2000/svg";
const COLOURS = ["#5b8def", "#e65100", "#2e7d32", "#6a1b9a"];

function svgEl(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  return node;
}

// A round step for about `n` ticks between 0 and `max` (1, 2 or 5 times a power of ten).
function tickStep(max, n) {
  const raw = max / n, power = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((m) => m * power).find((step) => step >= raw);
}

function clock(t, withSeconds) {
  return new Date(t * 1000).toLocaleTimeString([], withSeconds
    ? { hour: "2-digit", minute: "2-digit", second: "2-digit" } : { hour: "2-digit", minute: "2-digit" });
}

// Per server: GPU memory shared out (dashed) and in use (solid) over time, one colour per
// GPU; axes in MiB and clock time, and a legend that says which line is which.
function historyView(history) {
  const W = 640, H = 180, left = 62, right = 12, top = 12, bottom = 34;
  const charts = [];
  for (const server of history.servers) {
    const samples = server.samples;
    if (!samples.length) {
      charts.push(el("p", { text: `${server.address}: no samples yet.` }));
      continue;
    }
    const svg = svgEl("svg", { class: "chart", width: W, height: H, "data-testid": "chart",
      role: "img", "aria-label": `GPU memory over time on ${server.address}` });
    const t0 = samples[0].t, t1 = Math.max(samples[samples.length - 1].t, t0 + 1);
    const peak = Math.max(1, ...samples.flatMap((s) => s.gpus.map((g) => Math.max(g.granted_mib, g.used_mib || 0))));
    const step = tickStep(peak, 4), top_mib = Math.ceil(peak / step) * step;
    const x = (t) => left + ((W - left - right) * (t - t0)) / (t1 - t0);
    const y = (v) => H - bottom - ((H - top - bottom) * v) / top_mib;
    // The axes: MiB with a grid line per tick, and the time at the ends and in between.
    for (let v = 0; v <= top_mib; v += step) {
      svg.append(svgEl("line", { x1: left, x2: W - right, y1: y(v), y2: y(v), class: "grid" }));
      svg.append(svgEl("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end", class: "tick",
        "data-testid": "y-tick" }, `${v}`));
    }
    svg.append(svgEl("text", { x: 14, y: (top + H - bottom) / 2, class: "axis-title",
      transform: `rotate(-90 14 ${(top + H - bottom) / 2})`, "text-anchor": "middle" }, "MiB"));
    const seconds = t1 - t0 < 600;
    for (const [t, anchor] of [[t0, "start"], [(t0 + t1) / 2, "middle"], [t1, "end"]]) {
      svg.append(svgEl("text", { x: x(t), y: H - bottom + 16, "text-anchor": anchor, class: "tick",
        "data-testid": "x-tick" }, clock(t, seconds)));
    }
    svg.append(svgEl("text", { x: (left + W - right) / 2, y: H - 4, "text-anchor": "middle",
      class: "axis-title" }, "time"));
    svg.append(svgEl("line", { x1: left, x2: left, y1: top, y2: H - bottom, class: "axis" }));
    svg.append(svgEl("line", { x1: left, x2: W - right, y1: H - bottom, y2: H - bottom, class: "axis" }));
    const indices = [...new Set(samples.flatMap((s) => s.gpus.map((g) => g.index)))];
    const legend = el("div", { class: "legend", "data-testid": "chart-legend" });
    indices.forEach((index, i) => {
      const colour = COLOURS[i % COLOURS.length];
      for (const [key, dash] of [["granted_mib", "4 3"], ["used_mib", ""]]) {
        const points = samples.map((s) => {
          const g = s.gpus.find((gg) => gg.index === index);
          return g ? `${x(s.t).toFixed(1)},${y(g[key] || 0).toFixed(1)}` : null;
        }).filter(Boolean).join(" ");
        const attrs = { points, fill: "none", stroke: colour };
        if (dash) attrs["stroke-dasharray"] = dash;
        svg.append(svgEl("polyline", attrs));
        const last = samples[samples.length - 1].gpus.find((gg) => gg.index === index);
        if (last) {  // the newest value as a dot, so a single sample shows too
          svg.append(svgEl("circle", { cx: x(samples[samples.length - 1].t).toFixed(1),
            cy: y(last[key] || 0).toFixed(1), r: 3, fill: colour }));
        }
      }
      legend.append(el("span", { class: "key", "data-testid": "legend-gpu" },
        el("span", { class: "swatch", style: `background:${colour}` }), `GPU ${index}`));
    });
    legend.append(el("span", { class: "key" }, el("span", { class: "dash" }), "shared out (granted)"),
      el("span", { class: "key" }, el("span", { class: "solid" }), "in use"));
    charts.push(el("div", { class: "history-chart" },
      el("h3", { text: `${server.address} · GPU memory, ${range === "day" ? "last 24 h" : "last hour"}` }),
      svg, legend));
  }
  $("history").replaceChildren(...charts);
}

function eventsView(events) {
  $("events").replaceChildren(...events.map((e) => el("li", { "data-testid": "event",
    text: `${new Date(e.ts * 1000).toLocaleTimeString()} ${e.server} ${e.kind}` +
          `${e.user ? ` ${e.user}` : ""}${e.share_id ? ` ${e.share_id}` : ""}: ${e.detail}` })));
}

async function refresh() {
  try {
    const [cluster, shares, events, history] = await Promise.all([
      api("/api/v1/cluster"), api("/api/v1/shares"), api("/api/v1/events"),
      api(`/api/v1/history?range=${range}`),
    ]);
    serversView(cluster); sharesView(shares.shares); eventsView(events.events); historyView(history);
    $("problem").hidden = true;
  } catch (error) {
    if (error.status === 401) return logout(error.message);
    $("problem").textContent = error.message;
    $("problem").hidden = false;
  }
}

async function act(path, body, method = "POST") {
  try {
    const answer = await api(path, { method, body: JSON.stringify(body) });
    $("admin-said").textContent = "Done.";
    await refresh();
    return answer;
  } catch (error) {
    $("admin-said").textContent = error.message;
    return null;
  }
}

function logout(message) {
  sessionStorage.removeItem("bitfusion-token");
  clearInterval(timer);
  me = null;
  $("dashboard").hidden = true; $("logout").hidden = true; $("login").hidden = false;
  $("who").textContent = "";
  $("login-error").textContent = message || "";
  $("login-error").hidden = !message;
}

async function start() {
  try {
    me = await api("/api/v1/me");
  } catch (error) {
    return logout(error.message);
  }
  $("who").textContent = `${me.user}${me.admin ? " (admin)" : ""}`;
  $("login").hidden = true; $("dashboard").hidden = false; $("logout").hidden = false;
  $("admin").hidden = !me.admin;
  await refresh();
  timer = setInterval(refresh, REFRESH_MS);
}

$("login-form").onsubmit = (event) => {
  event.preventDefault();
  sessionStorage.setItem("bitfusion-token", $("token").value.trim());
  start();
};
$("logout").onclick = () => logout("");
document.querySelectorAll("[data-range]").forEach((b) => {
  b.onclick = () => {
    range = b.dataset.range;
    document.querySelectorAll("[data-range]").forEach((o) => o.classList.toggle("on", o === b));
    refresh();
  };
});
$("idle-form").onsubmit = (event) => {
  event.preventDefault();
  act("/api/v1/settings/idle-timeout", { seconds: Number($("idle").value) }, "PUT");
};
$("token-form").onsubmit = async (event) => {
  event.preventDefault();
  const answer = await act("/api/v1/tokens", { user: $("new-user").value, admin: $("new-admin").checked });
  if (answer) {
    $("new-token").textContent = `Token for ${answer.user} (shown once): ${answer.token}`;
    $("new-token").hidden = false;
  }
};
$("revoke-form").onsubmit = (event) => {
  event.preventDefault();
  act("/api/v1/tokens/revoke", { token: $("revoke").value.trim() });
};
if (sessionStorage.getItem("bitfusion-token")) start();
