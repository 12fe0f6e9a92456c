// The API reference: every operation of /openapi.json (OpenAPI 3.1) grouped by tag, with its
// parameters, request body, responses and a "try it" form that sends the request with the token.
import { $, api, fill, h, token } from "/console/common.js";

const MAX_SHOWN = 20000; // characters of a reply shown; the rest is cut
const METHODS = ["get", "post", "put", "patch", "delete"];
let doc = null;

const pretty = (value) => JSON.stringify(value, null, 2);

// The descriptions' Markdown, as far as they use it: `code` and **bold**, as elements.
function inline(text) {
  return String(text || "").split(/(`[^`]+`|\*\*[^*]+\*\*)/).filter(Boolean).map((part) =>
    part.startsWith("`") ? h("code", {}, part.slice(1, -1))
      : part.startsWith("**") ? h("strong", {}, part.slice(2, -2)) : part);
}

function refName(ref) {
  return ref.slice(ref.lastIndexOf("/") + 1);
}

function resolve(obj) {
  // a parameter or response given as {"$ref": "#/components/<kind>/<name>"}
  if (!obj || !obj.$ref) return obj;
  return obj.$ref.replace(/^#\//, "").split("/").reduce((o, k) => (o ? o[k] : undefined), doc) || obj;
}

function refsIn(value, found = new Set()) {
  if (Array.isArray(value)) value.forEach((v) => refsIn(v, found));
  else if (value && typeof value === "object") {
    for (const [k, v] of Object.entries(value)) {
      if (k === "$ref" && typeof v === "string" && v.startsWith("#/components/schemas/")) found.add(refName(v));
      else refsIn(v, found);
    }
  }
  return found;
}

function schemaLinks(schema) {
  const names = [...refsIn(schema)];
  return names.length ? h("p", { class: "small" }, "schemas: ", names.flatMap((n, i) => [i ? ", " : "",
    h("a", { href: `#schema-${n}`, onclick: () => openSchema(n) }, n)])) : null;
}

function openSchema(name) {
  const el = $(`schema-${name}`);
  if (el) el.open = true;
}

function schemaSummary(schema) {
  if (!schema) return "";
  if (schema.$ref) return refName(schema.$ref);
  const parts = [];
  if (schema.type) parts.push([].concat(schema.type).join(" | "));
  if (schema.enum) parts.push(`one of ${schema.enum.join(", ")}`);
  if ("const" in schema) parts.push(`= ${JSON.stringify(schema.const)}`);
  if ("minimum" in schema || "maximum" in schema) parts.push(`${schema.minimum ?? "…"}..${schema.maximum ?? "…"}`);
  if ("maxLength" in schema) parts.push(`≤ ${schema.maxLength} chars`);
  if ("default" in schema) parts.push(`default ${JSON.stringify(schema.default)}`);
  if (schema.anyOf) parts.push(schema.anyOf.map(schemaSummary).join(" | "));
  return parts.join(", ");
}

// --- one operation -----------------------------------------------------------------------

function operationBody(method, path, op, websocket) {
  const params = (op.parameters || []).map(resolve);
  const body = op.requestBody;
  const media = body && body.content ? Object.entries(body.content)[0] : null;
  return h("div", { class: "body" },
    op.description ? h("p", {}, inline(op.description)) : null,
    h("p", { class: "small muted" }, op.security && op.security.length ? "needs the token (X-VX11-Token)" : "public",
      ` · operationId ${op.operationId}`),
    params.length ? [h("h4", {}, "Parameters"), h("table", { class: "params" },
      h("thead", {}, h("tr", {}, ["parameter", "schema", "description"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, params.map((p) => h("tr", {},
        h("td", {}, h("code", {}, p.name), " ", h("span", { class: "muted" }, p.in, p.required ? ", required" : "")),
        h("td", {}, schemaSummary(p.schema)), h("td", {}, inline(p.description))))))] : null,
    media ? [h("h4", {}, `Request body (${media[0]}${body.required ? ", required" : ""})`),
      h("pre", {}, pretty(media[1].schema)), schemaLinks(media[1].schema),
      media[1].example !== undefined ? [h("p", { class: "small" }, "example"), h("pre", {}, pretty(media[1].example))] : null] : null,
    h("h4", {}, "Responses"),
    h("dl", { class: "facts" }, Object.entries(op.responses).map(([status, r]) => {
      const resp = resolve(r);
      const types = Object.entries(resp.content || {});
      return [h("dt", {}, h("code", {}, status)), h("dd", {}, inline(resp.description),
        types.map(([type, m]) => h("div", { class: "small" }, h("code", {}, type), " ", schemaSummary(m.schema))))];
    })),
    websocket ? h("p", { class: "muted" }, "A WebSocket: open it with a WebSocket client (the console does), not from this form.")
      : tryIt(method, path, op, params, media));
}

function tryIt(method, path, op, params, media) {
  const inputs = params.filter((p) => p.name !== "token").map((p) => {
    return { p, input: h("input", { name: p.name, value: p.example ?? "", placeholder: schemaSummary(p.schema), "aria-label": `${p.in} parameter ${p.name}` }) };
  });
  const bodyField = media ? h("textarea", { "aria-label": "request body", spellcheck: "false" }) : null;
  if (bodyField) bodyField.value = media[1].example !== undefined ? pretty(media[1].example) : "";
  const status = h("p", { class: "result-status", role: "status" });
  const output = h("pre", { class: "result-body", hidden: true });
  const send = async (event) => {
    event.preventDefault();
    let url = path;
    const query = new URLSearchParams();
    const headers = {};
    for (const { p, input } of inputs) {
      const value = input.value;
      if (p.in === "path") url = url.replace(`{${p.name}}`, encodeURIComponent(value));
      else if (value === "") continue;
      else if (p.in === "query") query.set(p.name, value);
      else if (p.in === "header") headers[p.name] = value;
    }
    if (op.security && op.security.length && token.get()) headers["X-VX11-Token"] = token.get();
    let sentBody;
    if (bodyField && bodyField.value.trim()) { sentBody = bodyField.value; headers["Content-Type"] = media[0]; }
    const started = performance.now();
    status.textContent = "sending…";
    status.className = "result-status";
    try {
      const r = await api(query.size ? `${url}?${query}` : url, { method: method.toUpperCase(), headers, body: sentBody, auth: false });
      const ms = (performance.now() - started).toFixed(0);
      status.textContent = `${r.status} · ${ms} ms · ${r.type || "no body"}`;
      status.className = `result-status ${r.status < 400 ? "ok" : "bad"}`;
      status.dataset.status = r.status;
      const shown = typeof r.data === "string" ? r.data : pretty(r.data);
      output.textContent = shown.length > MAX_SHOWN ? `${shown.slice(0, MAX_SHOWN)}\n… (${shown.length} characters)` : shown;
      output.hidden = !shown;
    } catch (err) {
      status.textContent = `failed: ${err.message}`;
      status.className = "result-status bad";
    }
  };
  return h("form", { class: "try", onsubmit: send },
    h("h4", {}, "Try it"),
    inputs.map(({ p, input }) => h("label", {}, h("span", { class: "small" }, `${p.name} (${p.in}${p.required ? ", required" : ""})`), input)),
    bodyField ? h("label", {}, h("span", { class: "small" }, "body"), bodyField) : null,
    h("div", {}, h("button", { type: "submit" }, `Send ${method.toUpperCase()} ${path}`)),
    status, output);
}

// --- the page ----------------------------------------------------------------------------

function render() {
  const byTag = new Map();
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const method of METHODS) {
      const op = item[method];
      if (!op) continue;
      const tag = (op.tags && op.tags[0]) || "other";
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push({ path, method, op });
    }
  }
  const count = [...byTag.values()].reduce((n, ops) => n + ops.length, 0);
  fill($("doc-info"), h("strong", {}, `${doc.info.title} ${doc.info.version} · OpenAPI ${doc.openapi} · ${count} operations`),
    (doc.info.description || "").split(/\n\n+/).map((para) => h("p", {}, inline(para.replaceAll("\n", " ")))));
  fill($("operations"), [...byTag].map(([tag, ops]) => h("section", { dataset: { tag } },
    h("h2", {}, tag),
    ops.map(({ path, method, op }) => {
      const websocket = Boolean(op.responses["101"]);
      const label = websocket ? "WS" : method.toUpperCase();
      const details = h("details", { class: "op card", dataset: { method: label, path, search: `${path} ${op.summary} ${tag}`.toLowerCase() } },
        h("summary", {}, h("span", { class: `method ${label.toLowerCase()}` }, label), h("span", { class: "path" }, path),
          h("span", { class: "muted" }, op.summary || ""),
          op.security && op.security.length ? h("span", { class: "lock", title: "needs the token" }, "token") : null));
      // the body is built when first opened: forty operations stay cheap to list
      details.addEventListener("toggle", () => {
        if (details.open && details.childElementCount === 1) details.append(operationBody(method, path, op, websocket));
      });
      return details;
    }))));
  fill($("schemas"), Object.entries(doc.components.schemas).map(([name, schema]) => {
    const details = h("details", { class: "op card", id: `schema-${name}` }, h("summary", {}, h("code", {}, name)));
    details.addEventListener("toggle", () => {
      if (details.open && details.childElementCount === 1) details.append(h("div", { class: "body" }, h("pre", {}, pretty(schema)), schemaLinks(schema)));
    });
    return details;
  }));
}

function applyFilter() {
  const words = $("filter").value.toLowerCase().trim();
  for (const el of document.querySelectorAll("#operations details")) el.hidden = Boolean(words) && !el.dataset.search.includes(words);
  for (const section of document.querySelectorAll("#operations section")) {
    section.hidden = ![...section.querySelectorAll("details")].some((d) => !d.hidden);
  }
}

async function main() {
  const field = $("doc-token");
  field.value = token.get();
  field.addEventListener("change", () => (field.value ? token.set(field.value.trim()) : token.clear()));
  $("filter").addEventListener("input", applyFilter);
  const r = await api("/openapi.json", { auth: false });
  if (r.status !== 200 || typeof r.data !== "object") {
    fill($("doc-info"), h("span", { class: "error" }, `GET /openapi.json answered ${r.status}`));
    return;
  }
  doc = r.data;
  render();
  if (location.hash.startsWith("#schema-")) openSchema(location.hash.slice(8));
}

main();
