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

function openSchema(name) {
  const el = $(`schema-${name}`);
  if (el) el.open = true;
}

function componentSchema(ref) {
  return doc.components.schemas[refName(ref)] || {};
}

// A short type name: "string", "integer | null", "array of Event", "SystemAlertPayload".
function typeName(schema) {
  if (!schema) return "any";
  if (schema.$ref) return refName(schema.$ref);
  const variants = schema.anyOf || schema.oneOf;
  if (variants) return variants.map(typeName).join(" | ");
  if ("const" in schema) return JSON.stringify(schema.const);
  if (schema.type === "array") return `array of ${typeName(schema.items)}`;
  if (schema.type) return [].concat(schema.type).join(" | ");
  if (schema.enum) return "enum";
  return schema.properties ? "object" : "any";
}

// The rules a value must keep, in words: "1..5000", "≤ 256 chars", "one of a, b", "default 500".
function constraints(schema) {
  const parts = [];
  if (schema.enum) parts.push(`one of ${schema.enum.map((v) => JSON.stringify(v)).join(", ")}`);
  if ("minimum" in schema || "maximum" in schema) parts.push(`${schema.minimum ?? "…"}..${schema.maximum ?? "…"}`);
  if ("exclusiveMinimum" in schema) parts.push(`> ${schema.exclusiveMinimum}`);
  if ("minLength" in schema && "maxLength" in schema) parts.push(`${schema.minLength}..${schema.maxLength} chars`);
  else if ("maxLength" in schema) parts.push(`≤ ${schema.maxLength} chars`);
  else if ("minLength" in schema) parts.push(`≥ ${schema.minLength} chars`);
  if ("minItems" in schema || "maxItems" in schema) parts.push(`${schema.minItems ?? 0}..${schema.maxItems ?? "…"} items`);
  if (schema.pattern) parts.push(`matches ${schema.pattern}`);
  if (schema.format) parts.push(schema.format);
  if ("default" in schema) parts.push(`default ${JSON.stringify(schema.default)}`);
  return parts.join(", ");
}

// What a nested part of a schema opens to: an object's fields, an array's item, the
// branches of a oneOf/anyOf; null for a plain value (string, number, enum, null).
function inner(schema) {
  if (!schema) return null;
  if (schema.$ref) return componentSchema(schema.$ref);
  const variants = (schema.oneOf || schema.anyOf || []).filter((v) => v.type !== "null");
  if (variants.length === 1) return inner(variants[0]);
  if (variants.length > 1 && variants.some((v) => inner(v))) return schema;
  if (schema.type === "array") return inner(schema.items);
  if (schema.properties || schema.additionalProperties) return schema;
  return null;
}

// An expandable part: its content is built when first opened (schemas nest deeply, and
// a $ref met again inside itself is only built if the reader opens it).
function expandable(label, build, attrs = {}) {
  const details = h("details", { class: "nested", ...attrs }, h("summary", {}, label));
  details.addEventListener("toggle", () => {
    if (details.open && details.childElementCount === 1) details.append(build());
  });
  return details;
}

function fieldRow(name, schema, required) {
  const nested = inner(schema);
  const facts = constraints(schema.$ref ? {} : schema);
  return h("li", { class: "field", dataset: { name } },
    h("code", { class: "name" }, name), " ",
    h("span", { class: "type" }, typeName(schema)),
    required ? h("span", { class: "req" }, "required") : null,
    facts ? h("span", { class: "constraints muted" }, facts) : null,
    schema.description ? h("div", { class: "desc small" }, inline(schema.description)) : null,
    nested ? expandable(`fields of ${typeName(schema)}`, () => schemaView(nested)) : null);
}

// A schema as the fields a reader fills in: never a bare $ref.
function schemaView(schema) {
  if (schema.$ref) return schemaView(componentSchema(schema.$ref));
  const parts = [];
  if (schema.description) parts.push(h("p", { class: "small" }, inline(schema.description)));
  const variants = schema.oneOf || schema.anyOf;
  if (variants) {
    const kind = schema.oneOf ? "exactly one of" : "any of";
    parts.push(h("div", { class: "one-of" }, h("p", { class: "small muted" }, `${kind} ${variants.length}:`),
      variants.map((v) => {
        const target = v.$ref ? componentSchema(v.$ref) : v;
        const tag = target.properties && target.properties.type && "const" in target.properties.type
          ? ` (type ${JSON.stringify(target.properties.type.const)})` : "";
        return inner(v)
          ? expandable(`${typeName(v)}${tag}`, () => schemaView(v), { class: "nested branch", dataset: { branch: typeName(v) } })
          : h("div", { class: "small" }, h("span", { class: "type" }, typeName(v)), " ", constraints(v));
      })));
  }
  if (schema.properties) {
    const required = new Set(schema.required || []);
    parts.push(h("ul", { class: "fields" }, Object.entries(schema.properties).map(([name, prop]) => fieldRow(name, prop, required.has(name)))));
  }
  if (schema.additionalProperties && typeof schema.additionalProperties === "object") {
    parts.push(h("ul", { class: "fields" }, fieldRow("{any key}", schema.additionalProperties, false)));
  }
  if (schema.type === "array") parts.push(h("ul", { class: "fields" }, fieldRow("[items]", schema.items || {}, false)));
  if (!parts.length) parts.push(h("p", { class: "small" }, h("span", { class: "type" }, typeName(schema)), " ", constraints(schema)));
  return h("div", { class: "schema" }, parts);
}

function schemaSummary(schema) {
  if (!schema) return "";
  const facts = constraints(schema);
  return facts ? `${typeName(schema)}, ${facts}` : typeName(schema);
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
      schemaView(media[1].schema),
      media[1].example !== undefined ? [h("p", { class: "small" }, "example"), h("pre", {}, pretty(media[1].example))] : null] : null,
    h("h4", {}, "Responses"),
    h("dl", { class: "facts" }, Object.entries(op.responses).map(([status, r]) => {
      const resp = resolve(r);
      const types = Object.entries(resp.content || {});
      return [h("dt", {}, h("code", {}, status)), h("dd", {}, inline(resp.description),
        types.map(([type, m]) => h("div", { class: "small" }, h("code", {}, type), " ",
          m.schema && inner(m.schema) ? expandable(typeName(m.schema), () => schemaView(m.schema)) : schemaSummary(m.schema))))];
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
      if (details.open && details.childElementCount === 1) details.append(h("div", { class: "body" }, schemaView(schema)));
    });
    return details;
  }));
}

function applyFilter() {
  const words = $("filter").value.toLowerCase().trim();
  for (const el of document.querySelectorAll("#operations details.op")) el.hidden = Boolean(words) && !el.dataset.search.includes(words);
  for (const section of document.querySelectorAll("#operations section")) {
    section.hidden = ![...section.querySelectorAll("details.op")].some((d) => !d.hidden);
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
