// The console's views: pools, jobs and one job's page, dead letters grouped
// by error, webhooks. Each renders into <main> and may set `ctx.onEvent`
// (live updates from the stream) and `ctx.refresh` (the r key).
"use strict";

const ACTIVE = ["queued", "retrying", "running"];
const STATUSES = ["queued", "running", "retrying", "succeeded", "dead", "cancelled"];
// Scans stop here: the console filters text in the browser (the API has no
// text search yet), so bound what one search may read.
const SCAN_CAP = 10000;

function table(headers, rows, empty) {
  if (!rows.length) return el("p", { class: "note" }, empty || "Nothing here.");
  return el("div", { class: "scroll" }, el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { class: h.endsWith("#") ? "num" : null, scope: "col" }, h.replace(/#$/, ""))))),
    el("tbody", {}, rows)));
}
const td = (content, cls) => el("td", { class: cls }, content);
const pct = (xs, p) => {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(p * s.length))];
};
const secs = (x) => (x === null ? "–" : x < 1 ? Math.round(x * 1000) + " ms" : x.toFixed(1) + " s");

// ---- Pools -------------------------------------------------------------
VIEWS.pools = async (main, ctx) => {
  const stats = await api("GET", "/v1/stats");
  // Pausing and worker counts are for admin keys of the default tenant
  // (pools are shared); other keys see the rest of the page.
  let pools = null;
  try { pools = Object.fromEntries((await api("GET", "/v1/pools")).pools.map((p) => [p.name, p])); } catch (_) { pools = null; }
  const kinds = Object.keys(stats.pools);
  // Submit→start over each pool's latest 100 jobs that have started.
  const waits = {};
  await Promise.all(kinds.map(async (k) => {
    const page = await api("GET", `/v1/jobs?kind=${encodeURIComponent(k)}&limit=100`);
    waits[k] = page.jobs.filter((j) => j.started_at)
      .map((j) => (Date.parse(j.started_at) - Date.parse(j.created_at)) / 1000);
  }));
  const now = Date.now();
  const rows = kinds.map((k) => {
    const p = stats.pools[k];
    // Finished jobs per minute, for each of the last five minutes (oldest first).
    const perMin = [4, 3, 2, 1, 0].map((m) => live.finished.filter((f) => f.kind === k &&
      f.at > now - (m + 1) * 60000 && f.at <= now - m * 60000).length);
    const top = Math.max(1, ...perMin);
    const spark = el("span", { class: "spark", "aria-hidden": "true" },
      perMin.map((n) => { const s = el("span"); s.style.height = Math.round((n / top) * 100) + "%"; return s; }));
    const pool = pools && pools[k];
    const state = !pool ? td("–") : td([
      el("span", { class: "badge " + (pool.paused ? "paused" : "live") }, pool.paused ? "paused" : "running"), " ",
      el("button", { class: pool.paused ? "primary" : "danger", onclick: () => pauseOrResume(ctx, main, k, !pool.paused) },
        pool.paused ? "Resume" : "Pause")]);
    return el("tr", { "data-pool": k },
      el("th", { scope: "row" }, el("a", { href: `#/jobs?kind=${encodeURIComponent(k)}` }, k)),
      state,
      ...ACTIVE.map((s) => td(String(p[s] || 0), "num")),
      td(pool ? `${pool.workers} (${pool.concurrency} slots)` : "–", "num"),
      td([spark, " ", String(perMin[4]) + "/min"], "num"),
      td(`${secs(pct(waits[k], 0.5))} / ${secs(pct(waits[k], 0.95))}`, "num"));
  });
  main.replaceChildren(
    el("h2", {}, "Pools"),
    table(["Pool", "State", "Queued#", "Retrying#", "Running#", "Workers#", "Finished, last 5 min#", "Submit→start p50 / p95#"], rows),
    el("p", { class: "note" }, `Dead letters: ${stats.dead_letters}. Totals: `,
      Object.entries(stats.counts || {}).map(([s, n]) => `${s} ${n}`).join(" · ") || "none",
      ". Latency is over each pool's latest 100 started jobs.",
      pools ? " A paused pool accepts jobs and starts none; running ones finish." : " Pausing pools needs an admin key of the default tenant."));
  const reload = debounce(() => { if (current === ctx) VIEWS.pools(main, ctx); }, 2000);
  ctx.onEvent = reload;
  ctx.refresh = () => VIEWS.pools(main, ctx);
};

async function pauseOrResume(ctx, main, pool, pause) {
  const verb = pause ? "Pause" : "Resume";
  const text = pause
    ? `Pause pool ${pool}? Its workers finish what they run and start nothing new; submits are still accepted.`
    : `Resume pool ${pool}? Its waiting jobs start, the most urgent first.`;
  if (!(await confirmAction(text, verb))) return;
  try {
    await api("POST", `/v1/pools/${encodeURIComponent(pool)}/${pause ? "pause" : "resume"}`);
    toast(`${pool} ${pause ? "paused" : "resumed"}.`);
  } catch (e) { toast(e.message); }
  if (current === ctx) VIEWS.pools(main, ctx);
}

// ---- Jobs --------------------------------------------------------------
function matches(job, text) {
  if (!text) return true;
  const hay = JSON.stringify([job.payload, job.errors, job.result]).toLowerCase();
  return hay.includes(text.toLowerCase());
}

function filterForm(ctx, name, fields) {
  const form = el("form", { class: "filters", role: "search" }, fields,
    el("button", { type: "submit", class: "primary" }, "Search"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const params = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) params.set(k, v);
    setHashParams(name, params);
  });
  return form;
}
const input = (name, label, value, attrs) => el("label", {}, label, el("input", { name, value: value || "", ...attrs }));
function select(name, label, options, value) {
  return el("label", {}, label, el("select", { name },
    el("option", { value: "" }, "any"), options.map((o) => el("option", { value: o, selected: o === value }, o))));
}

function jobRow(j) {
  const err = lastError(j);
  return el("tr", { "data-job": j.id },
    td(jobLink(j.id)), td(j.kind), td(badge(j.status)), td(String(j.attempt), "num"),
    td(fmtTime(j.created_at), "hide-narrow"), td(err ? err.message : "", "msg"));
}

VIEWS.jobs = async (main, ctx) => {
  const p = ctx.params;
  if (p.get("id")) { location.hash = "#/job/" + p.get("id").trim(); return; }
  const stats = await api("GET", "/v1/stats");
  const form = filterForm(ctx, "jobs", [
    input("id", "Job id", "", { placeholder: "uuid", size: 20 }),
    select("kind", "Kind", Object.keys(stats.pools), p.get("kind")),
    select("status", "Status", STATUSES, p.get("status")),
    input("q", "Text in payload, result or errors", p.get("q"), { type: "search", size: 24 }),
  ]);
  const status = el("p", { class: "note", role: "status" }, "Searching…");
  const body = el("div");
  main.replaceChildren(el("h2", {}, "Jobs"), form, status, body);
  const base = new URLSearchParams();
  for (const k of ["kind", "status"]) if (p.get(k)) base.set(k, p.get(k));
  const text = p.get("q");
  let jobs;
  if (text) {
    const all = await allPages("/v1/jobs" + (base.size ? "?" + base : ""), SCAN_CAP, (n) => { status.textContent = `Scanned ${n} jobs…`; });
    jobs = all.filter((j) => matches(j, text));
    status.textContent = `${jobs.length} of ${all.length} scanned jobs contain “${text}”` + (all.length >= SCAN_CAP ? ` (scan stops at ${SCAN_CAP})` : "");
  } else {
    base.set("limit", "200");
    jobs = (await api("GET", "/v1/jobs?" + base)).jobs;
    status.textContent = `Latest ${jobs.length} jobs`;
  }
  const rows = jobs.slice(0, 1000).map(jobRow);
  body.replaceChildren(table(["Job", "Kind", "Status", "Attempt#", "Created", "Last error"], rows, "No job matches."));
  const byId = new Map(rows.map((r) => [r.dataset.job, r]));
  ctx.onEvent = (ev) => {
    const row = byId.get(ev.job_id);
    if (row) row.children[2].replaceChildren(badge(ev.status));
  };
  ctx.refresh = route;
};

VIEWS.job = async (main, ctx) => {
  const id = ctx.arg;
  const [job, ev] = await Promise.all([api("GET", "/v1/jobs/" + id), api("GET", `/v1/jobs/${id}/events`)]);
  const actions = el("div", { class: "actions" });
  if (ACTIVE.includes(job.status)) {
    actions.append(el("button", { class: "danger", onclick: async () => {
      if (!(await confirmAction(`Cancel ${job.kind} job ${id}?`, "Cancel job"))) return;
      try { await api("POST", `/v1/jobs/${id}/cancel`); toast("Cancel requested."); } catch (e) { toast(e.message); }
      route();
    } }, "Cancel"));
  }
  if (job.status === "dead") {
    actions.append(el("button", { class: "primary", onclick: async () => {
      if (!(await confirmAction(`Replay dead ${job.kind} job ${id} with a fresh budget of attempts?`, "Replay"))) return;
      try { await api("POST", `/v1/dead-letters/${id}/replay`); toast("Queued again."); } catch (e) { toast(e.message); }
      route();
    } }, "Replay"));
  }
  const errors = (job.errors || []).map((e) => el("tr", {},
    td(String(e.attempt), "num"), td(e.class), td(e.message, "msg"), td(fmtTime(e.at)), td(fmtTime(e.retry_at))));
  let prev = null;
  const events = ev.events.map((e) => {
    const t = Date.parse(e.at);
    const gap = prev === null ? "" : ` (+${secs((t - prev) / 1000)})`;
    prev = t;
    return el("li", {}, el("strong", {}, e.type), ` attempt ${e.attempt} · ${fmtTime(e.at)}${gap}`);
  });
  main.replaceChildren(
    el("h2", {}, `${job.kind} job `, el("span", { class: "mono" }, id), " ", badge(job.status)),
    el("div", { class: "panel" }, el("dl", { class: "facts" },
      el("dt", {}, "Attempts"), el("dd", {}, `${job.attempt} of ${job.attempt_limit}`),
      el("dt", {}, "Created"), el("dd", {}, fmtTime(job.created_at)),
      el("dt", {}, "Started"), el("dd", {}, fmtTime(job.started_at)),
      el("dt", {}, "Finished"), el("dd", {}, fmtTime(job.finished_at)),
      job.next_run_at && [el("dt", {}, "Next run"), el("dd", {}, fmtTime(job.next_run_at))],
      el("dt", {}, "Parent"), el("dd", {}, job.parent_id ? jobLink(job.parent_id, job.parent_id) : "–"),
      el("dt", {}, "Children"), el("dd", {}, job.children.length
        ? job.children.map((c) => el("span", {}, jobLink(c.id), ` ${c.kind} `, badge(c.status), " ")) : "–")),
    el("p", {}, actions)),
    el("div", { class: "grid2" },
      el("section", {}, el("h2", {}, "Payload"), el("pre", {}, JSON.stringify(job.payload, null, 2))),
      el("section", {}, el("h2", {}, "Result"), el("pre", {}, job.result ? JSON.stringify(job.result, null, 2) : "–"))),
    el("h2", {}, "Attempts that failed"),
    table(["Attempt#", "Class", "Error", "At", "Retry at"], errors, "No failed attempt."),
    el("h2", {}, "Events"), el("ol", { class: "events" }, events));
  const reload = debounce(() => { if (current === ctx) VIEWS.job(main, ctx).catch(() => {}); }, 300);
  ctx.onEvent = (e) => { if (e.job_id === id || e.parent_id === id) reload(); };
  ctx.refresh = route;
};

// ---- Dead letters --------------------------------------------------------
function groupByError(jobs) {
  const groups = new Map();
  for (const j of jobs) {
    const err = lastError(j);
    const msg = err ? err.message : "(no error recorded)";
    let g = groups.get(msg);
    if (!g) { g = { msg, jobs: [], kinds: new Set(), first: Infinity, last: -Infinity }; groups.set(msg, g); }
    const at = Date.parse((err && err.at) || j.finished_at || j.updated_at);
    g.jobs.push(j);
    g.kinds.add(j.kind);
    g.first = Math.min(g.first, at);
    g.last = Math.max(g.last, at);
  }
  return [...groups.values()].sort((a, b) => b.jobs.length - a.jobs.length || b.last - a.last);
}

async function bulk(ctx, verb, jobs, what) {
  const n = jobs.length;
  const ok = await confirmAction(
    verb === "replay" ? `Replay ${n} dead job${n === 1 ? "" : "s"} (${what})?` : `Purge ${n} dead job${n === 1 ? "" : "s"} for good (${what})?`,
    verb === "replay" ? `Replay ${n}` : `Purge ${n}`);
  if (!ok) return;
  const failures = await eachLimited(jobs, (j) => verb === "replay"
    ? api("POST", `/v1/dead-letters/${j.id}/replay`) : api("DELETE", `/v1/dead-letters/${j.id}`));
  toast(`${verb === "replay" ? "Replayed" : "Purged"} ${n - failures.length} of ${n}` +
    (failures.length ? `; first failure: ${failures[0][1]}` : "."));
  // A purge emits no event: refresh the header's count here.
  scheduleDeadCount();
  if (current === ctx) route();
}

VIEWS.dead = async (main, ctx) => {
  const p = ctx.params;
  const stats = await api("GET", "/v1/stats");
  const form = filterForm(ctx, "dead", [
    select("kind", "Kind", Object.keys(stats.pools), p.get("kind")),
    input("q", "Text in error or payload", p.get("q"), { type: "search", size: 28 }),
  ]);
  const status = el("p", { class: "note", role: "status" }, "Loading dead letters…");
  const body = el("div");
  main.replaceChildren(el("h2", {}, "Dead letters"), form, status, body);
  const kind = p.get("kind");
  const all = await allPages("/v1/dead-letters" + (kind ? "?kind=" + encodeURIComponent(kind) : ""), SCAN_CAP);
  const text = p.get("q");
  const jobs = all.filter((j) => matches(j, text));
  const groups = groupByError(jobs);
  status.textContent = `${jobs.length} dead job${jobs.length === 1 ? "" : "s"}` + (text ? ` contain “${text}” (of ${all.length})` : "") +
    ` in ${groups.length} group${groups.length === 1 ? "" : "s"}` + (all.length >= SCAN_CAP ? ` (first ${SCAN_CAP} read)` : "");
  const rows = groups.map((g) => {
    const list = el("td", { colspan: 6 }, g.jobs.slice(0, 200).map((j) => el("span", {}, jobLink(j.id), " ")),
      g.jobs.length > 200 ? `… and ${g.jobs.length - 200} more` : "");
    const details = el("tr", { hidden: true, class: "members" }, list);
    const toggle = el("button", { "aria-expanded": "false", onclick: () => {
      details.hidden = !details.hidden;
      toggle.setAttribute("aria-expanded", String(!details.hidden));
    } }, "Jobs");
    const row = el("tr", { class: "group" },
      td(g.msg, "msg"), td([...g.kinds].join(", ")), td(String(g.jobs.length), "num"),
      td(fmtTime(g.first), "hide-narrow"), td(fmtTime(g.last)),
      td(el("div", { class: "actions" }, toggle,
        el("button", { class: "primary", onclick: () => bulk(ctx, "replay", g.jobs, g.msg) }, "Replay group"),
        el("button", { class: "danger", onclick: () => bulk(ctx, "purge", g.jobs, g.msg) }, "Purge group"))));
    return [row, details];
  });
  body.replaceChildren(
    table(["Error", "Kind", "Count#", "First", "Last", "Actions"], rows.flat(), text ? "No dead job matches." : "No dead letters."),
    groups.length > 1 ? el("p", { class: "actions" },
      el("button", { class: "primary", onclick: () => bulk(ctx, "replay", jobs, "all shown") }, `Replay all ${jobs.length} shown`),
      el("button", { class: "danger", onclick: () => bulk(ctx, "purge", jobs, "all shown") }, `Purge all ${jobs.length} shown`)) : "");
  const reload = debounce(() => { if (current === ctx && !$("#confirm").open) route(); }, 2000);
  ctx.onEvent = (ev) => { if (ev.type === "job.dead") reload(); };
  ctx.refresh = route;
};

// ---- Webhooks -------------------------------------------------------------
VIEWS.webhooks = async (main, ctx) => {
  const [hooks, recent, failed] = await Promise.all([
    api("GET", "/v1/webhooks"),
    api("GET", "/v1/webhook-deliveries?limit=500"),
    api("GET", "/v1/webhook-deliveries?status=failed&limit=500"),
  ]);
  const rate = (url) => {
    const done = recent.deliveries.filter((d) => d.url === url && ["delivered", "failed"].includes(d.status));
    const ok = done.filter((d) => d.status === "delivered").length;
    return done.length ? `${Math.round((100 * ok) / done.length)}% of ${done.length}` : "–";
  };
  const hookRows = hooks.webhooks.map((w) => el("tr", {},
    td(w.url, "msg mono"), td(w.events.join(", ")), td(w.kinds ? w.kinds.join(", ") : "all"),
    td(w.disabled_at ? badge("disabled") : badge("active")), td(rate(w.url), "num")));
  const failedRows = failed.deliveries.map((d) => el("tr", {},
    td(d.event_type), td(jobLink(d.job_id)), td(d.url, "msg mono hide-narrow"), td(String(d.attempts), "num"),
    td(d.last_error || (d.last_status ? "HTTP " + d.last_status : ""), "msg"), td(fmtTime(d.finished_at), "hide-narrow"),
    td(el("button", { onclick: async (e) => {
      e.target.disabled = true;
      try { await api("POST", `/v1/webhook-deliveries/${d.id}/retry`); toast("Delivery queued again."); } catch (err) { toast(err.message); }
      route();
    } }, "Retry"))));
  main.replaceChildren(
    el("h2", {}, "Webhook endpoints"),
    table(["URL", "Events", "Kinds", "State", "Delivered (latest 500)#"], hookRows, "No endpoint registered."),
    el("h2", {}, "Failed deliveries"),
    table(["Event", "Job", "URL", "Attempts#", "Last error", "Gave up", ""], failedRows, "No failed delivery."));
  ctx.refresh = route;
};

boot();
