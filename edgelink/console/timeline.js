// The timeline (API.md §10): recent events on a time axis, one lane per source, each placed by
// its own `timestamp` (the payload's) with the gateway's receive time beside it, so a module
// whose clock is off shows as a constant offset; "align clocks" removes each source's median
// offset. Events sharing a correlation_id, or named in a system.correlation.updated's
// related_events, are joined. Reads bounded sources only: GET /debug/events/timeline (the last
// hour at start, a correlation id's events when one is typed), then the live stream the
// console already follows.
import { $, api, fill, h, time } from "/console/common.js";

const MAX_EVENTS = 300; // kept; the oldest fall off
const WIDTH = 1000, LABEL = 150, LANE = 30, AXIS = 22, PAD = 12;
const NATURES = ["system.alert", "system.correlation.updated", "forensic.snapshot.created",
  "madre.decision.explained", "switch.tension.updated", "shub.action.narrated"];

const events = new Map(); // event_id -> item, in arrival order
let frozenEnd = null; // the axis end while not following
let timer = null;
let drawQueued = false;

// Own time: the payload's `timestamp` (every canonical type has one), else the receive time.
function item(f) {
  const own = f.payload && typeof f.payload.timestamp === "number" ? f.payload.timestamp : f.timestamp;
  const ids = [f.payload && f.payload.correlation_id, f.metadata && f.metadata.correlation_id]
    .filter((c) => typeof c === "string" && c);
  const related = f.type === "system.correlation.updated" && f.payload && Array.isArray(f.payload.related_events)
    ? f.payload.related_events.filter((r) => typeof r === "string") : [];
  return { id: f.event_id, type: f.type, source: f.source, own, received: f.timestamp, skew: own - f.timestamp,
           correlations: [...new Set(ids)], related };
}

export function add(f) {
  if (!f || typeof f.event_id !== "string" || events.has(f.event_id) || typeof f.timestamp !== "number") return;
  const it = item(f);
  events.set(it.id, it);
  while (events.size > MAX_EVENTS) events.delete(events.keys().next().value);
  for (const [select, value] of [["tl-type", it.type], ["tl-source", it.source]]) {
    if (![...$(select).options].some((o) => o.value === value)) $(select).append(h("option", { value }, value));
  }
  queue();
}

// Stored events (oldest first, bounded in count and bytes by the gateway) before the stream
// brings more: the last hour, or one correlation id's.
export async function load(correlationId = "") {
  const q = new URLSearchParams({ limit: String(MAX_EVENTS) });
  if (correlationId) q.set("correlation_id", correlationId);
  else q.set("since", String(Math.max(Date.now() - 3600e3, 0)));
  const r = await api(`/debug/events/timeline?${q}`);
  if (r.status !== 200) return;
  r.data.events.forEach(add);
}

let lookup = null; // a correlation id typed in the filter is looked up in the ledger once typing pauses

export function start() {
  clearInterval(timer);
  timer = setInterval(() => { if ($("tl-follow").checked) queue(); }, 1000);
  queue();
}

export function stop() {
  clearInterval(timer);
  timer = null;
}

function queue() {
  if (drawQueued) return;
  drawQueued = true;
  requestAnimationFrame(() => { drawQueued = false; draw(); });
}

const median = (values) => {
  const s = values.slice().sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

export function skewText(ms) {
  const sign = ms > 0 ? "+" : ms < 0 ? "−" : "±";
  const abs = Math.abs(ms);
  return `${sign}${abs < 1000 ? `${Math.round(abs)} ms` : `${(abs / 1000).toFixed(1)} s`}`;
}

function wanted(it) {
  const type = $("tl-type").value, source = $("tl-source").value, cid = $("tl-cid").value.trim();
  return (!type || it.type === type) && (!source || it.source === source)
    && (!cid || it.correlations.some((c) => c.includes(cid)));
}

function draw() {
  const all = [...events.values()];
  // each source's clock offset against the gateway's: the median over its events
  const skews = new Map();
  for (const source of new Set(all.map((e) => e.source))) {
    skews.set(source, median(all.filter((e) => e.source === source).map((e) => e.skew)));
  }
  const align = $("tl-align").checked;
  const placed = (it) => it.own - (align ? skews.get(it.source) : 0);
  const shown = all.filter(wanted);
  const span = Number($("tl-zoom").value) * 1000;
  const follow = $("tl-follow").checked;
  // the axis ends now, or at the newest event placed ahead of now by a fast clock (up to half
  // a span: one clock set a day ahead must not push every other event off the axis)
  const now = Date.now();
  const newest = Math.max(now, ...shown.map((e) => e.received), Math.min(Math.max(now, ...shown.map(placed)), now + span / 2));
  if (follow || frozenEnd === null) frozenEnd = newest + span * 0.03;
  const end = frozenEnd, begin = end - span;
  const x = (t) => LABEL + ((t - begin) / span) * (WIDTH - LABEL - PAD);
  const inView = shown.filter((e) => Math.max(placed(e), e.received) >= begin && Math.min(placed(e), e.received) <= end);
  const lanes = [...new Set(inView.map((e) => e.source))].sort();
  const laneY = new Map(lanes.map((s, i) => [s, AXIS + LANE * i + LANE / 2]));
  const height = AXIS + LANE * Math.max(lanes.length, 1) + 6;
  const svg = $("timeline");
  svg.setAttribute("viewBox", `0 0 ${WIDTH} ${height}`);

  const ticks = [];
  const step = niceStep(span / 6);
  for (let t = Math.ceil(begin / step) * step; t <= end; t += step) {
    ticks.push(h("g", { class: "tl-tick" }, h("line", { x1: x(t), x2: x(t), y1: AXIS - 6, y2: height }),
      h("text", { x: x(t), y: AXIS - 9, "text-anchor": "middle" }, time(t))));
  }
  const laneRows = lanes.map((s) => h("g", { class: "tl-lane", dataset: { source: s, skew: String(Math.round(skews.get(s))) } },
    h("line", { x1: LABEL, x2: WIDTH - PAD, y1: laneY.get(s), y2: laneY.get(s) }),
    h("text", { x: 4, y: laneY.get(s) - 2 }, s.length > 18 ? `${s.slice(0, 17)}…` : s),
    h("text", { x: 4, y: laneY.get(s) + 10, class: "tl-skewtext" }, `clock ${skewText(skews.get(s))}`)));

  const where = new Map(inView.map((e) => [e.id, [x(placed(e)), laneY.get(e.source)]]));
  const joins = [];
  const byCorrelation = new Map();
  for (const e of inView) for (const c of e.correlations) (byCorrelation.get(c) || byCorrelation.set(c, []).get(c)).push(e);
  for (const [cid, group] of byCorrelation) {
    group.sort((a, b) => placed(a) - placed(b));
    for (let i = 1; i < group.length; i += 1) joins.push(join(where, group[i - 1].id, group[i].id, "tl-join", `correlation ${cid}`, cid));
  }
  for (const e of inView) {
    for (const r of e.related) if (where.has(r) && r !== e.id) joins.push(join(where, e.id, r, "tl-join tl-related", "related_events", ""));
  }
  const dots = inView.map((e) => {
    const [px, py] = where.get(e.id);
    const rx = x(e.received);
    const nature = NATURES.indexOf(e.type);
    return h("g", { class: "tl-event", tabindex: 0, dataset: { eventId: e.id, source: e.source, type: e.type,
                                                              own: e.own, received: e.received, placed: placed(e) } },
      h("title", {}, `${e.type} from ${e.source}: its time ${time(e.own)}, received ${time(e.received)} `
        + `(${skewText(e.skew)})${e.correlations.length ? `, correlation ${e.correlations.join(", ")}` : ""}`),
      h("line", { x1: rx, x2: px, y1: py, y2: py, class: "tl-skew" }),
      h("rect", { x: rx - 1, y: py - 7, width: 2, height: 14, class: "tl-recv" }),
      h("circle", { cx: px, cy: py, r: 5, class: `tl-own n${nature < 0 ? 0 : nature % 6}` }));
  });
  fill(svg, h("title", {}, `Timeline: ${inView.length} events from ${lanes.length} sources`), ticks, laneRows, joins, dots,
    inView.length ? null : h("text", { x: (LABEL + WIDTH) / 2, y: AXIS + LANE / 2 + 4, "text-anchor": "middle", class: "muted-fill" },
      all.length ? "no events in this span or filter" : "waiting for events…"));
  $("tl-note").textContent = `${inView.length} of ${all.length} events, ${joins.length} joins`;
}

function join(where, a, b, cls, label, cid) {
  const [x1, y1] = where.get(a), [x2, y2] = where.get(b);
  const mid = Math.min(y1, y2) - (y1 === y2 ? 10 : 0);
  return h("path", { d: `M${x1.toFixed(1)},${y1} Q${((x1 + x2) / 2).toFixed(1)},${mid} ${x2.toFixed(1)},${y2}`,
                     class: cls, fill: "none", dataset: { a, b, correlation: cid } }, h("title", {}, label));
}

function niceStep(raw) {
  for (const s of [1e3, 2e3, 5e3, 1e4, 15e3, 3e4, 6e4, 12e4, 3e5, 6e5, 9e5, 18e5, 36e5]) if (s >= raw) return s;
  return 72e5;
}

export function wire() {
  for (const id of ["tl-type", "tl-source", "tl-zoom", "tl-align", "tl-follow"]) $(id).addEventListener("change", queue);
  $("tl-cid").addEventListener("input", () => {
    queue();
    clearTimeout(lookup);
    const cid = $("tl-cid").value.trim();
    if (/^[!-~]{1,128}$/.test(cid)) lookup = setTimeout(() => load(cid).catch(() => null), 400);
  });
}
