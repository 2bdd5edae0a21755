// The console's only door to the controller: the public REST API under /api/v1.
// Session cookie auth (HttpOnly, SameSite=Strict, set by POST /auth/login). Errors come back
// as ApiError with the API's field-level issues, so forms can show each next to its field.

export const BASE = "/api/v1";

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.kind = (body && body.error) || "Error";
    this.issues = (body && Array.isArray(body.issues)) ? body.issues : [];
  }
}

let onUnauthenticated = () => {};
export function setUnauthenticatedHandler(fn) { onUnauthenticated = fn; }

function query(params) {
  if (!params) return "";
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v === undefined || v === null || v === "") continue;
    if (Array.isArray(v)) v.forEach((x) => q.append(k, String(x)));
    else q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

/** request("GET", "/workloads", {params, body, etag, raw}) -> {data, etag, response} */
export async function request(method, path, { params, body, etag, raw = false, quiet401 = false } = {}) {
  const headers = { Accept: raw ? "*/*" : "application/json" };
  const init = { method, headers, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  if (etag) headers["If-Match"] = etag;
  let response;
  try {
    response = await fetch(BASE + path + query(params), init);
  } catch (err) {
    throw new ApiError(0, { error: "NetworkError", message: `the controller is unreachable (${err.message})` });
  }
  if (response.status === 401 && !quiet401) onUnauthenticated();
  if (!response.ok) {
    let payload = null;
    try { payload = await response.json(); } catch (_e) { payload = null; }
    if (payload && payload.detail && !payload.message) {
      payload = { error: "Error", message: typeof payload.detail === "string" ? payload.detail : JSON.stringify(payload.detail) };
    }
    throw new ApiError(response.status, payload);
  }
  let data = null;
  if (response.status !== 204) {
    data = raw ? await response.text() : await response.json();
  }
  return { data, etag: response.headers.get("ETag"), response };
}

export const get = async (path, params) => (await request("GET", path, { params })).data;
export const post = async (path, body) => (await request("POST", path, { body })).data;
export const put = async (path, body, etag) => (await request("PUT", path, { body, etag })).data;
export const del = async (path, etag) => (await request("DELETE", path, { etag })).data;

/** Every item of a cursor-paginated list: ObjectPage / EventPage shapes, or a bare array whose
 * next page a `Link: <...?cursor=C>; rel="next"` header names (pairing profiles). */
export async function listAll(path, params = {}, max = 100000) {
  const out = [];
  let cursor = null;
  do {
    const { data, response } = await request("GET", path, { params: { ...params, limit: 500, cursor } });
    if (Array.isArray(data)) {
      out.push(...data);
      const next = /<[^>]*[?&]cursor=([^&>]+)[^>]*>;\s*rel="next"/.exec(response.headers.get("Link") || "");
      cursor = next ? decodeURIComponent(next[1]) : null;
    } else {
      out.push(...data.items);
      cursor = data.next_cursor;
    }
  } while (cursor && out.length < max);
  return out;
}

// ---- capabilities: which optional APIs (visibility) this controller has ----
let specPromise = null;
export function openapi() {
  if (!specPromise) {
    specPromise = fetch(`${BASE}/openapi.json`, { credentials: "same-origin" })
      .then((r) => (r.ok ? r.json() : { paths: {} }))
      .catch(() => ({ paths: {} }));
  }
  return specPromise;
}

/** The first of ``candidates`` the controller serves for ``method`` (or null). */
export async function findRoute(method, candidates) {
  const spec = await openapi();
  const paths = spec.paths || {};
  for (const c of candidates) {
    const full = BASE + c;
    if (paths[full] && paths[full][method.toLowerCase()]) return c;
  }
  return null;
}

/** The OpenAPI operation for (method, path), to read its parameters. */
export async function operation(method, path) {
  const spec = await openapi();
  const p = (spec.paths || {})[BASE + path];
  return p ? p[method.toLowerCase()] || null : null;
}

export function enc(name) { return encodeURIComponent(name); }
