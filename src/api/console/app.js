// The console's core: API calls, the live event stream, the hash router,
// the confirmation dialog and keyboard shortcuts. Views live in views.js
// and register themselves in VIEWS. No framework, no build step.
"use strict";

const VIEWS = {};
const live = {
  lastId: null,
  backoff: 500,
  // Terminal events of the last minutes, for throughput (kind, type, at ms).
  finished: [],
  listeners: new Set(),
};
let current = null; // { name, arg, params, onEvent?, refresh? }

const $ = (sel, root = document) => root.querySelector(sel);
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

async function api(method, path, body) {
  const opts = { method, headers: {} };
  // The API takes POST and DELETE only as JSON (a cross-site form cannot
  // send that), bodiless ones included.
  if (method !== "GET") opts.headers["content-type"] = "application/json";
  if (body !== undefined) opts.body = JSON.stringify(body);
  // Deployments with API keys: asks for one on the first 401.
  const r = await StevedoreKey.fetch(path, opts);
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!r.ok) {
    const msg = (data && data.error && data.error.message) || `${r.status} ${r.statusText}`;
    throw new Error(msg);
  }
  return data;
}

const fmtTime = (t) => (t ? new Date(t).toLocaleString() : "–");
const shortId = (id) => id.slice(-12);
const badge = (status) => el("span", { class: "badge " + status }, status);
const jobLink = (id, text) => el("a", { href: "#/job/" + id, class: "mono" }, text || shortId(id));
const lastError = (job) => (job.errors && job.errors.length ? job.errors[job.errors.length - 1] : null);

function toast(text) {
  const t = $("#toast");
  t.textContent = text;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.textContent = ""; }, 6000);
}

/// Resolves true only when the operator presses Confirm.
function confirmAction(text, okLabel) {
  const d = $("#confirm");
  $("#confirm-text").textContent = text;
  $("#confirm-ok").textContent = okLabel || "Confirm";
  d.returnValue = "";
  d.showModal();
  return new Promise((resolve) => {
    d.addEventListener("close", () => resolve(d.returnValue === "ok"), { once: true });
  });
}

/// Runs `fn` over `items` with a few requests in flight; returns failures.
async function eachLimited(items, fn, width = 8) {
  const failures = [];
  let next = 0;
  async function lane() {
    while (next < items.length) {
      const item = items[next++];
      try { await fn(item); } catch (e) { failures.push([item, e.message]); }
    }
  }
  await Promise.all(Array.from({ length: Math.min(width, items.length) }, lane));
  return failures;
}

/// Every page of a job listing (`path` takes limit and cursor), up to `cap`.
async function allPages(path, cap, onPage) {
  const jobs = [];
  let cursor = null;
  const sep = path.includes("?") ? "&" : "?";
  while (jobs.length < cap) {
    const page = await api("GET", `${path}${sep}limit=500${cursor ? "&cursor=" + cursor : ""}`);
    jobs.push(...page.jobs);
    if (onPage) onPage(jobs.length);
    if (!page.next_cursor) break;
    cursor = page.next_cursor;
  }
  return jobs;
}

function setConn(on, text) {
  const c = $("#conn");
  c.className = "conn " + (on ? "on" : "off");
  c.textContent = text;
}

function onEvent(ev) {
  if (typeof ev.id === "number") live.lastId = ev.id;
  if (["job.succeeded", "job.dead", "job.cancelled"].includes(ev.type)) {
    live.finished.push({ kind: ev.kind, type: ev.type, at: Date.parse(ev.at) || Date.now() });
    const horizon = Date.now() - 10 * 60 * 1000;
    while (live.finished.length && live.finished[0].at < horizon) live.finished.shift();
  }
  scheduleDeadCount();
  if (current && current.onEvent) current.onEvent(ev);
}

async function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  // First the recent history (throughput needs it), then resume where we were.
  const q = live.lastId === null ? "?recent=1000" : "?since=" + live.lastId;
  let path = "/v1/stream" + q;
  try {
    await StevedoreKey.ready();
    path = await StevedoreKey.streamUrl(path);
  } catch (_) { /* reconnect below */ }
  const ws = new WebSocket(`${proto}//${location.host}${path}`);
  ws.onopen = () => { live.backoff = 500; setConn(true, "live"); };
  ws.onmessage = (m) => {
    try { onEvent(JSON.parse(m.data)); } catch (e) { console.error(e); }
  };
  ws.onclose = () => {
    setConn(false, "reconnecting…");
    setTimeout(connect, live.backoff);
    live.backoff = Math.min(live.backoff * 2, 10000);
  };
}

// The dead-letter badge follows events, at most once a second.
function scheduleDeadCount() {
  if (scheduleDeadCount.timer) return;
  scheduleDeadCount.timer = setTimeout(async () => {
    scheduleDeadCount.timer = null;
    try {
      const s = await api("GET", "/v1/stats");
      $("#dead-count").textContent = s.dead_letters ? String(s.dead_letters) : "";
    } catch (_) { /* next event */ }
  }, 1000);
}

/// Calls `fn` at most once per `ms`, trailing: for views that reload on events.
function debounce(fn, ms) {
  let timer = null;
  return () => {
    if (timer) return;
    timer = setTimeout(() => { timer = null; fn(); }, ms);
  };
}

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?");
  const [name, arg] = path.split("/");
  return { name: name || "pools", arg: arg ? decodeURIComponent(arg) : null, params: new URLSearchParams(query || "") };
}

function setHashParams(name, params) {
  const q = params.toString();
  location.hash = `#/${name}${q ? "?" + q : ""}`;
}

async function route() {
  const { name, arg, params } = parseHash();
  const view = VIEWS[name] || VIEWS.pools;
  const section = name === "job" ? "jobs" : name;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.section === section) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const main = $("#view");
  current = { name, arg, params };
  const mine = current;
  main.replaceChildren(el("p", { class: "note" }, "Loading…"));
  try {
    await view(main, mine);
  } catch (e) {
    if (current === mine) main.replaceChildren(el("p", { class: "panel" }, "Could not load: " + e.message));
  }
}

document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey || $("#confirm").open) return;
  const typing = /^(INPUT|SELECT|TEXTAREA)$/.test(e.target.tagName);
  if (typing) return;
  const sections = { 1: "pools", 2: "jobs", 3: "dead", 4: "webhooks" };
  if (sections[e.key]) {
    location.hash = "#/" + sections[e.key];
  } else if (e.key === "/") {
    const search = $("#view input[type=search]") || $("#view input");
    if (search) { e.preventDefault(); search.focus(); }
  } else if (e.key === "r" && current && current.refresh) {
    current.refresh();
  }
});

window.addEventListener("hashchange", route);
function boot() {
  connect();
  scheduleDeadCount();
  route();
}
