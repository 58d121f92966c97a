// The live display: follows /v1/stream (WebSocket), reconnects with
// ?since=<last id> so nothing is missed, and polls /v1/stats for queue
// depth and dead letters. No framework, no build step.
"use strict";

const MAX_JOBS = 200;
let lastId = null;
let backoff = 500;
const jobs = new Map();

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

function setConn(on, text) {
  const c = $("conn");
  c.className = "conn " + (on ? "on" : "off");
  c.textContent = text;
}

function upsertJob(ev) {
  let li = jobs.get(ev.job_id);
  if (!li) {
    li = el("li");
    li.dataset.job = ev.job_id;
    li.append(el("span", "kind", ev.kind), el("span", "id", ev.job_id.slice(-12)), el("span", "badge"));
    $("jobs").prepend(li);
    jobs.set(ev.job_id, li);
    while (jobs.size > MAX_JOBS) {
      const [id, old] = jobs.entries().next().value;
      old.remove();
      jobs.delete(id);
    }
  }
  const badge = li.querySelector(".badge");
  badge.className = "badge " + ev.status;
  badge.textContent = ev.status + (ev.attempt > 1 ? " #" + ev.attempt : "");
  li.dataset.status = ev.status;
}

function isAnalysis(result) {
  return result && Array.isArray(result.answers);
}

async function showResult(ev) {
  let questions = [];
  try {
    const r = await StevedoreKey.fetch("/v1/jobs/" + ev.job_id);
    if (r.ok) {
      const job = await r.json();
      questions = (job.payload && job.payload.questions) || [];
    }
  } catch (_) { /* the answers alone still show */ }
  renderResult(ev, questions);
}

// `answers[i].question` and `.choice` are indices into the payload's
// questions and that question's options (see the analyze kind), never text.
function renderResult(ev, questions) {
  const res = ev.result;
  const box = el("div", "result");
  box.dataset.job = ev.job_id;
  box.append(el("div", "meta", `${ev.kind} ${ev.job_id.slice(-12)} · ${res.provider || "?"} / ${res.model || "?"}`));
  // The analyze kind sets `notice` when the answers deserve less trust than
  // bars and percentages suggest (a tiny offline model): say so above them.
  if (typeof res.notice === "string" && res.notice) {
    const note = el("div", "notice", res.notice);
    note.setAttribute("role", "note");
    box.append(note);
  }
  res.answers.forEach((a, i) => {
    const qi = Number.isInteger(a.question) ? a.question : i;
    const q = questions[qi] || {};
    // Without the payload (job purged, fetch failed) the chosen index is all we know.
    const options = Array.isArray(q.options) ? q.options : [`option ${a.choice + 1}`];
    const chosenAt = Array.isArray(q.options) ? a.choice : 0;
    const qd = el("div", "question");
    qd.append(el("div", "text", q.text || `Question ${qi + 1}`));
    const pct = Math.round(Math.min(Math.max(Number(a.confidence) || 0, 0), 1) * 100);
    options.forEach((opt, oi) => {
      const chosen = oi === chosenAt;
      const row = el("div", "option" + (chosen ? " chosen" : ""));
      if (chosen) row.setAttribute("aria-label", `chosen: ${opt}, ${pct}% confidence`);
      const bar = el("div", "bar");
      const fill = el("span");
      bar.append(fill);
      row.append(el("span", "opt", (chosen ? "✓ " : "") + opt), bar, el("span", "pct", chosen ? pct + "%" : ""));
      qd.append(row);
      // Set the width after insertion so the CSS transition animates it.
      if (chosen) requestAnimationFrame(() => requestAnimationFrame(() => { fill.style.width = pct + "%"; }));
    });
    if (a.reason) qd.append(el("div", "reason", a.reason));
    box.append(qd);
  });
  const results = $("results");
  // A replayed job succeeds again: show its latest answers once.
  for (const old of results.querySelectorAll(".result")) if (old.dataset.job === ev.job_id) old.remove();
  const hint = results.querySelector(".hint");
  if (hint) hint.remove();
  results.prepend(box);
  while (results.children.length > 20) results.lastChild.remove();
}

function onEvent(ev) {
  if (typeof ev.id === "number") lastId = ev.id;
  upsertJob(ev);
  if (ev.type === "job.succeeded" && isAnalysis(ev.result)) showResult(ev);
}

async function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  // First load: the recent history; later: resume exactly where we were.
  const since = lastId === null ? "?recent=300" : "?since=" + lastId;
  let path = "/v1/stream" + since;
  try {
    await StevedoreKey.ready();
    path = await StevedoreKey.streamUrl(path);
  } catch (_) { /* reconnect below */ }
  const ws = new WebSocket(`${proto}//${location.host}${path}`);
  ws.onopen = () => { backoff = 500; setConn(true, "live"); };
  ws.onmessage = (m) => {
    try { onEvent(JSON.parse(m.data)); } catch (e) { console.error(e); }
  };
  ws.onclose = () => {
    setConn(false, "reconnecting…");
    setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 10000);
  };
}

async function refreshStats() {
  try {
    const r = await StevedoreKey.fetch("/v1/stats");
    if (!r.ok) return;
    const s = await r.json();
    $("dead").textContent = s.dead_letters;
    const pools = $("pools");
    pools.replaceChildren();
    for (const [pool, st] of Object.entries(s.pools || {})) {
      const d = el("div", "stat");
      d.dataset.pool = pool;
      const waiting = (st.queued || 0) + (st.retrying || 0);
      d.append(el("span", "label", `${pool}: queued · running`),
               el("span", "num", `${waiting} · ${st.running || 0}`));
      pools.append(d);
    }
  } catch (_) { /* next tick */ }
}

connect();
refreshStats();
setInterval(refreshStats, 2000);
