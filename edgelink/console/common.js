// Shared by the console and the API reference: the token (kept in sessionStorage, so it
// leaves with the tab), calls to the gateway, and a DOM builder that never parses HTML.
const KEY = "edgelink.token";

export const token = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (value) => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

export class AuthError extends Error {}

// GET (or another method) with the token; JSON bodies are parsed. 401/403 raise AuthError.
export async function api(path, { method = "GET", headers = {}, body, auth = true } = {}) {
  const sent = { ...headers };
  if (auth && token.get()) sent["X-VX11-Token"] = token.get();
  const response = await fetch(path, { method, headers: sent, body, cache: "no-store" });
  const text = await response.text();
  const type = response.headers.get("content-type") || "";
  let data = text;
  if (type.startsWith("application/json") && text) {
    try { data = JSON.parse(text); } catch { /* shown as text */ }
  }
  if (auth && (response.status === 401 || response.status === 403)) {
    throw new AuthError(response.status === 401 ? "The gateway wants a token." : "The gateway refused this token.");
  }
  return { status: response.status, data, text, type };
}

// h("li", {class: "x", dataset: {seq: 1}}, "text", child) -> an element; strings become text nodes.
export function h(tag, attrs = {}, ...children) {
  const svg = ["svg", "polyline", "line", "circle", "title", "g", "text", "rect", "path"].includes(tag);
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export const $ = (id) => document.getElementById(id);

export function fill(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}

export const time = (ms) => new Date(ms).toLocaleTimeString([], { hour12: false });
