// The operator console: module health, the live event stream over /ws, events per type,
// the correlation graph, sessions and the forwarder. Plain DOM, no framework.
import { $, AuthError, api, fill, h, time, token } from "/console/common.js";
import * as timeline from "/console/timeline.js";

const REFRESH_MS = 5000;
const HISTORY_POINTS = 60; // per sparkline
const MAX_EVENTS = 500; // kept in the page; older ones fall off
const MAX_SEEN = 2000; // seqs remembered for dedupe within an epoch
const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 15000];

let refreshTimer = null;
let forwardRoute = true; // false once GET /vx11/forward/status answered 404: this gateway has no forwarder

// --- sign in ---------------------------------------------------------------------------

async function tokenWorks() {
  await api("/vx11/circuit-breaker/status"); // cheap, protected: raises AuthError on a bad token
}

function showLogin(message) {
  stopAll();
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  const value = $("token").value.trim();
  if (!value) return;
  token.set(value);
  try {
    await tokenWorks();
  } catch (err) {
    token.clear();
    showLogin(err instanceof AuthError ? `${err.message} Check it and try again.` : `Could not check the token: ${err.message}`);
    return;
  }
  $("token").value = "";
  start();
}

function start() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = false;
  stream.open();
  refresh();
  timeline.start();
  timeline.load().catch((err) => (err instanceof AuthError ? lost(err) : null));
}

function stopAll() {
  clearTimeout(refreshTimer);
  refreshTimer = null;
  stream.stop();
  timeline.stop();
}

function lost(err) {
  token.clear();
  showLogin(`${err.message} Enter it again.`);
}

// --- periodic panels -------------------------------------------------------------------

async function refresh() {
  clearTimeout(refreshTimer);
  const results = await Promise.allSettled([modules(), types(), graph(), sessions(), forwarder()]);
  const denied = results.find((r) => r.status === "rejected" && r.reason instanceof AuthError);
  if (denied) return lost(denied.reason);
  if (!$("main").hidden) refreshTimer = setTimeout(refresh, REFRESH_MS);
}

function note(id, result) {
  $(id).textContent = result.status === 200 ? `updated ${time(Date.now())}` : `error ${result.status}`;
}

async function modules() {
  const [status, breakers] = await Promise.all([api("/vx11/status"), api("/vx11/circuit-breaker/status")]);
  note("modules-note", status);
  if (status.status !== 200) return;
  const names = Object.keys(status.data.modules);
  await Promise.all(names.map((name) => (status.data.modules[name].status === "disabled" ? null : trend(name))));
  const states = breakers.status === 200 ? breakers.data.breakers : {};
  fill($("modules"), names.map((name) => moduleCard(name, status.data.modules[name], states[name], trends.get(name) || [])));
}

// Per module, its last HISTORY_POINTS recorded probes; each refresh asks only for newer ones.
const trends = new Map();

async function trend(name) {
  const known = trends.get(name) || [];
  const since = known.length ? known[known.length - 1].checked_at + 1 : 0;
  const r = await api(`/vx11/health/history?module=${encodeURIComponent(name)}&since=${since}&limit=${HISTORY_POINTS}`);
  if (r.status === 200) trends.set(name, known.concat(r.data.points).slice(-HISTORY_POINTS));
}

function moduleCard(name, health, breaker, points) {
  const disabled = health.status === "disabled";
  const latency = health.latency_ms === null || health.latency_ms === undefined ? "—" : `${health.latency_ms.toFixed(1)} ms`;
  const degrading = health.trend === "degrading";
  return h("article", { class: `card module ${disabled ? "disabled" : health.status === "ok" ? "ok" : "bad"}${degrading ? " degrading" : ""}`,
                        dataset: { module: name, trend: health.trend || "" }, tabindex: 0,
                        "aria-label": `${name}: ${health.status}${degrading ? ", degrading" : ""}` },
    h("h3", {}, name),
    h("p", { class: "status" }, h("span", { class: "dot", "aria-hidden": "true" }), disabled ? "disabled" : health.status,
      health.http_code ? ` (${health.http_code})` : ""),
    disabled ? h("p", { class: "muted" }, "not probed, not called") : [
      h("p", {}, "breaker ", h("strong", { class: `breaker ${breaker ? breaker.state : ""}` }, breaker ? breaker.state.replace("_", "-") : "—")),
      h("p", {}, "latency ", h("strong", {}, latency)),
      trendLine(health),
      sparkline(points),
    ],
    health.error && !disabled ? h("p", { class: "error small" }, health.error) : null);
}

// API.md §11: the module's trend against its own baseline, and how far off it is.
function trendLine(health) {
  if (!health.trend) return null;
  const score = typeof health.anomaly_score === "number" ? health.anomaly_score : 0;
  return h("p", { class: `trend ${health.trend}`, title: "anomaly score: how far recent latency and errors are from "
                    + "the module's baseline, in standard deviations (0 = as usual)" },
    "trend ", h("strong", {}, health.trend), health.trend === "unknown" ? "" : ` (score ${score.toFixed(1)})`);
}

function sparkline(points) {
  const values = points.map((p) => (p.latency_ms === null ? null : p.latency_ms));
  const known = values.filter((v) => v !== null);
  if (known.length < 2) return h("p", { class: "muted small" }, points.length ? "trend: too few rounds yet" : "trend: no recorded rounds");
  const width = 120, height = 28, max = Math.max(...known, 1);
  const step = width / (values.length - 1);
  const coords = values.map((v, i) => (v === null ? null : `${(i * step).toFixed(1)},${(height - 2 - (v / max) * (height - 4)).toFixed(1)}`))
    .filter(Boolean).join(" ");
  const failed = points.filter((p) => p.status !== "ok").length;
  return h("svg", { class: "spark", viewBox: `0 0 ${width} ${height}`, role: "img",
                    "aria-label": `latency over the last ${points.length} rounds, up to ${max.toFixed(1)} ms; ${failed} failed` },
    h("title", {}, `last ${points.length} probe rounds, max ${max.toFixed(1)} ms, ${failed} not ok`),
    h("polyline", { points: coords, fill: "none", class: "spark-line" }));
}

async function types() {
  const r = await api("/debug/events/cardinality");
  note("types-note", r);
  if (r.status !== 200) return;
  const rows = Object.entries(r.data.events).sort((a, b) => b[1].count - a[1].count);
  fill($("types"),
    h("caption", { class: "muted" }, `last ${r.data.window_seconds} s, ${r.data.total_events} events`),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "type"), h("th", { scope: "col" }, "count"), h("th", { scope: "col" }, "per min"))),
    h("tbody", {}, rows.length ? rows.map(([type, c]) => h("tr", {}, h("td", {}, type), h("td", { class: "num" }, c.count),
      h("td", { class: "num" }, c.rate_per_min))) : h("tr", {}, h("td", { colspan: 3, class: "muted" }, "no events in the window"))));
}

const NATURE_CLASS = {}; // nature -> a palette class, stable across refreshes

async function graph() {
  const r = await api("/debug/events/correlations");
  note("graph-note", r);
  if (r.status !== 200) return;
  const { nodes, edges } = r.data.graph;
  const svg = $("graph");
  const cx = 160, cy = 110, radius = 90;
  const where = new Map(nodes.map((n, i) => {
    const angle = (2 * Math.PI * i) / Math.max(nodes.length, 1) - Math.PI / 2;
    return [n.id, [cx + radius * Math.cos(angle), cy + radius * Math.sin(angle)]];
  }));
  const natures = [...new Set(nodes.map((n) => n.nature))];
  natures.forEach((n) => { if (!(n in NATURE_CLASS)) NATURE_CLASS[n] = `n${Object.keys(NATURE_CLASS).length % 6}`; });
  const lines = edges.filter((e) => where.has(e.source) && where.has(e.target)).map((e) => {
    const [x1, y1] = where.get(e.source), [x2, y2] = where.get(e.target);
    return h("line", { x1, y1, x2, y2, class: "edge", "stroke-width": (0.5 + 2.5 * e.strength).toFixed(2) },
      h("title", {}, `strength ${e.strength}`));
  });
  const dots = nodes.map((n) => {
    const [x, y] = where.get(n.id);
    return h("circle", { cx: x.toFixed(1), cy: y.toFixed(1), r: 6, class: `node ${NATURE_CLASS[n.nature]}` },
      h("title", {}, `${n.type} (${n.nature}${n.severity ? `, ${n.severity}` : ""}) at ${time(n.timestamp)}`));
  });
  fill(svg, h("title", { id: "graph-title" }, `Correlation graph: ${nodes.length} events, ${edges.length} links`),
    nodes.length ? [lines, dots] : h("text", { x: cx, y: cy, "text-anchor": "middle", class: "muted-fill" }, "no recent canonical events"));
  fill($("graph-legend"), natures.map((n) => h("span", { class: "key" }, h("span", { class: `swatch ${NATURE_CLASS[n]}` }), n)),
    ` ${nodes.length} events, ${edges.length} links`);
}

async function sessions() {
  const r = await api("/vx11/context-7/sessions");
  note("sessions-note", r);
  if (r.status !== 200) return;
  fill($("sessions"),
    h("caption", { class: "muted" }, `${r.data.total} live`),
    h("thead", {}, h("tr", {}, ["session", "messages", "created", "expires"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, r.data.sessions.length ? r.data.sessions.slice(0, 50).map((s) => h("tr", {},
      h("td", { title: s.session_id }, h("code", {}, s.session_id.slice(0, 8))), h("td", { class: "num" }, s.message_count),
      h("td", {}, time(s.created_at)), h("td", {}, time(s.expires_at))))
      : h("tr", {}, h("td", { colspan: 4, class: "muted" }, "no live sessions"))));
}

async function forwarder() {
  if (!forwardRoute) return;
  const r = await api("/vx11/forward/status");
  if (r.status === 404) forwardRoute = false;
  const on = r.status === 200 && r.data && r.data.enabled === true;
  $("forward-section").hidden = !on;
  if (!on) return;
  fill($("forward"), Object.entries(r.data).filter(([, v]) => v === null || typeof v !== "object")
    .map(([k, v]) => [h("dt", {}, k.replaceAll("_", " ")), h("dd", {}, v === null ? "—" : String(v))]));
}

// --- the event stream ------------------------------------------------------------------

const stream = {
  ws: null, epoch: null, lastSeq: null, seen: new Set(), events: [], types: new Set(),
  attempt: 0, timer: null, paused: false, held: 0, wanted: false,

  open() {
    this.wanted = true;
    clearTimeout(this.timer);
    const q = new URLSearchParams({ token: token.get(), client_id: `console-${Math.random().toString(36).slice(2, 8)}` });
    if (this.lastSeq !== null) { q.set("since_seq", this.lastSeq); q.set("epoch", this.epoch); }
    const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws?${q}`);
    this.ws = ws;
    link("connecting", "wait");
    ws.onmessage = (m) => this.frame(ws, m.data);
    ws.onclose = (e) => this.closed(ws, e);
  },

  stop() {
    this.wanted = false;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000);
    this.ws = null;
    link("not signed in", ""); // closed on purpose (sign-in page): the gateway is not offline
  },

  frame(ws, raw) {
    if (ws !== this.ws || ws.readyState !== WebSocket.OPEN) return; // a socket being dropped
    let f;
    try { f = JSON.parse(raw); } catch { return; }
    if (f.channel === "control" && f.type === "connected") {
      this.attempt = 0;
      if (this.epoch !== null && f.epoch !== this.epoch) {
        // a new ledger: its seqs start again, so the old position means nothing there
        this.epoch = f.epoch;
        this.lastSeq = 0;
        this.seen.clear();
        $("stream-note").textContent = "the ledger was replaced (new epoch): reading it from the start";
        ws.close(1000);
        return;
      }
      this.epoch = f.epoch;
      if (this.lastSeq === null) this.lastSeq = f.last_seq;
      $("truncated").hidden = !f.truncated;
      link("live", "ok");
      $("stream-note").textContent = f.replayed ? `resumed: ${f.replayed} missed events replayed` : "";
      return;
    }
    if (f.channel !== "event" || typeof f.seq !== "number" || this.seen.has(f.seq)) return;
    this.seen.add(f.seq);
    if (this.seen.size > MAX_SEEN) this.seen.delete(this.seen.values().next().value);
    this.lastSeq = Math.max(this.lastSeq || 0, f.seq);
    f.epoch = this.epoch;
    timeline.add(f);
    this.events.unshift(f);
    if (this.events.length > MAX_EVENTS) this.events.length = MAX_EVENTS;
    if (!this.types.has(f.type)) {
      this.types.add(f.type);
      $("type-filter").append(h("option", { value: f.type }, f.type));
    }
    if (this.paused) {
      this.held += 1;
      $("stream-note").textContent = `${this.held} new while paused`;
    } else if (matches(f)) {
      const list = $("events");
      list.prepend(eventItem(f));
      while (list.childElementCount > MAX_EVENTS) list.lastElementChild.remove();
    }
  },

  closed(ws, e) {
    if (ws !== this.ws) return;
    const delay = this.attempt === 0 && e.code === 1000 ? 0
      : BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)] * (0.75 + Math.random() / 2);
    this.attempt += 1;
    link(`reconnecting in ${Math.ceil(delay / 1000)} s`, "bad");
    this.timer = setTimeout(() => this.open(), delay);
  },
};

function link(text, state) {
  const el = $("link");
  el.textContent = `stream: ${text}`;
  el.className = `pill ${state}`;
  el.dataset.attempts = stream.attempt; // failed connects in a row (tests wait on it)
}

function matches(f) {
  const wanted = $("type-filter").value;
  return !wanted || f.type === wanted;
}

function eventItem(f) {
  const payload = JSON.stringify(f.payload);
  return h("li", { dataset: { seq: f.seq, type: f.type, epoch: f.epoch } },
    h("span", { class: "seq" }, `#${f.seq}`), " ", h("time", { datetime: new Date(f.timestamp).toISOString() }, time(f.timestamp)), " ",
    h("strong", {}, f.type), " ", h("span", { class: "muted" }, f.source), " ",
    h("code", { class: "payload" }, payload.length > 300 ? `${payload.slice(0, 300)}…` : payload));
}

function rerender() {
  fill($("events"), stream.events.filter(matches).map(eventItem));
}

// --- wiring ----------------------------------------------------------------------------

async function main() {
  $("login").addEventListener("submit", signIn);
  $("logout").addEventListener("click", () => { token.clear(); showLogin("Token forgotten."); });
  $("type-filter").addEventListener("change", rerender);
  timeline.wire();
  $("pause").addEventListener("click", () => {
    stream.paused = !stream.paused;
    $("pause").setAttribute("aria-pressed", String(stream.paused));
    $("pause").textContent = stream.paused ? "Resume" : "Pause";
    if (!stream.paused) {
      stream.held = 0;
      $("stream-note").textContent = "";
      rerender();
    }
  });
  if (!token.get()) return showLogin();
  try {
    await tokenWorks();
  } catch (err) {
    return err instanceof AuthError ? lost(err) : showLogin(`The gateway did not answer: ${err.message}`);
  }
  start();
}

main();
