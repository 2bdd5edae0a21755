// Reference data the pickers need (label keys and the values in use, label groups, services,
// IP lists), fetched through the API and cached for a short while; writes invalidate it.

import { listAll, request, enc } from "./api.js";

let cache = null;
let loadedAt = 0;
const TTL_MS = 15000;
let mayEditKeys = false;

export function invalidate() { cache = null; }

/** Whether the signed-in role may change label keys (owner, admin): set by main.js. */
export function setMayEditKeys(may) {
  if (may !== mayEditKeys) invalidate();
  mayEditKeys = Boolean(may);
}

/**
 * Add ``value`` to the allowed values of label key ``key`` (PUT with If-Match; retried once if
 * someone else changed the key meanwhile). The server authorises it (owner, admin).
 */
export async function addAllowedValue(key, value) {
  for (let attempt = 0; ; attempt += 1) {
    const cur = await request("GET", `/label-keys/${enc(key)}`);
    const body = cur.data.body;
    if (!body.values.length || body.values.includes(value)) return body;
    try {
      const res = await request("PUT", `/label-keys/${enc(key)}`, { body: { ...body, values: [...body.values, value].sort() }, etag: cur.etag });
      invalidate();
      return res.data.body;
    } catch (err) {
      if (err.status !== 412 || attempt > 0) throw err;
    }
  }
}

async function load() {
  const [keys, groups, services, ipLists, workloads] = await Promise.all([
    listAll("/label-keys"), listAll("/label-groups"), listAll("/services"), listAll("/ip-lists"), listAll("/workloads"),
  ]);
  const inUse = new Map(); // key -> Map(value -> count)
  for (const w of workloads) {
    for (const [k, v] of Object.entries(w.body.labels || {})) {
      if (!inUse.has(k)) inUse.set(k, new Map());
      const m = inUse.get(k);
      m.set(v, (m.get(v) || 0) + 1);
    }
  }
  const data = {
    keys: keys.map((o) => o.body),
    groups: groups.map((o) => o.body),
    services: services.map((o) => o.body),
    ipLists: ipLists.map((o) => o.body),
    inUse,
    workloadCount: workloads.length,
    addValue: null,
  };
  if (mayEditKeys) {
    data.addValue = async (key, value) => {
      const body = await addAllowedValue(key, value);
      const k = data.keys.find((x) => x.name === key); // this page's copy sees it at once
      if (k) k.values = body.values;
      return body;
    };
  }
  return data;
}

export async function refdata(force = false) {
  if (!cache || force || Date.now() - loadedAt > TTL_MS) {
    loadedAt = Date.now();
    cache = load().catch((err) => { cache = null; throw err; });
  }
  return cache;
}

/** Every known value of ``key``: allowed values plus values in use, with workload counts. */
export function valuesOf(data, key) {
  const k = data.keys.find((x) => x.name === key);
  const counts = data.inUse.get(key) || new Map();
  const values = new Set([...(k ? k.values : []), ...counts.keys()]);
  return [...values].sort().map((v) => ({ value: v, count: counts.get(v) || 0 }));
}

/** Whether ``key`` accepts ``value`` (a key with no allowed values takes any). */
export function accepts(data, key, value) {
  const k = data.keys.find((x) => x.name === key);
  if (!k) return false;
  return !k.values.length || k.values.includes(value);
}

export const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
export const IP_LIKE_RE = /^(\d{1,3}\.){1,3}\d{0,3}(\/\d{1,2})?$|^[0-9a-f]{0,4}:[0-9a-f:]*(\/\d{1,3})?$/i;
