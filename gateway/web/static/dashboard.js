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

function historyView(history) {
  const W = 640, H = 140, pad = 30;
  const charts = [];
  for (const server of history.servers) {
    const samples = server.samples;
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("class", "chart");
    svg.setAttribute("width", W); svg.setAttribute("height", H);
    svg.setAttribute("data-testid", "chart");
    if (samples.length) {
      const t0 = samples[0].t, t1 = Math.max(samples[samples.length - 1].t, t0 + 1);
      const max = Math.max(1, ...samples.flatMap((s) => s.gpus.map((g) => Math.max(g.granted_mib, g.used_mib || 0))));
      const x = (t) => pad + ((W - 2 * pad) * (t - t0)) / (t1 - t0);
      const y = (v) => H - pad + 10 - ((H - 2 * pad) * v) / max;
      const colours = ["#5b8def", "#e65100", "#2e7d32", "#6a1b9a"];
      const indices = [...new Set(samples.flatMap((s) => s.gpus.map((g) => g.index)))];
      indices.forEach((index, i) => {
        for (const [key, dash] of [["granted_mib", "4 3"], ["used_mib", ""]]) {
          const points = samples.map((s) => {
            const g = s.gpus.find((gg) => gg.index === index);
            return g ? `${x(s.t).toFixed(1)},${y(g[key] || 0).toFixed(1)}` : null;
          }).filter(Boolean).join(" ");
          const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
          line.setAttribute("points", points);
          line.setAttribute("fill", "none");
          line.setAttribute("stroke", colours[i % colours.length]);
          if (dash) line.setAttribute("stroke-dasharray", dash);
          svg.append(line);
          const last = samples[samples.length - 1].gpus.find((gg) => gg.index === index);
          if (last) {  // the newest value as a dot, so a single sample shows too
            const dot = document.createElementNS("http://www.w3.org/2000/svg", "circle");
            dot.setAttribute("cx", x(samples[samples.length - 1].t).toFixed(1));
            dot.setAttribute("cy", y(last[key] || 0).toFixed(1));
            dot.setAttribute("r", "3");
            dot.setAttribute("fill", colours[i % colours.length]);
            svg.append(dot);
          }
        }
      });
      const label = document.createElementNS("http://www.w3.org/2000/svg", "text");
      label.setAttribute("x", 4); label.setAttribute("y", 14);
      label.textContent = `${server.address}: MiB shared out (dashed) and in use, per GPU; max ${max} MiB`;
      label.setAttribute("font-size", "11");
      svg.append(label);
    }
    charts.push(el("div", {}, samples.length ? null : el("p", { text: `${server.address}: no samples yet.` }), svg));
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
