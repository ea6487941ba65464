// demo.js: the demo page (index.html). Starts the local runtime, triggers weather
// reports, and shows one run live: progress, steps, log lines. After a reload it finds
// the unfinished run and follows it as it resumes. It also shows whether the browser is
// online: offline, a report's "publish" step (needs_network=True) waits for the network.
//
// Run data is rendered with textContent / text nodes only (a city name is user input).
"use strict";

const JOB = "weather-report";
// Unfinished: a "waiting" run (here: for the network) continues by itself later.
const ACTIVE = ["pending", "leased", "waiting"];
// Steps that finished before this page was loaded were done by an earlier page (before a
// reload): the resumed run replays them from storage instead of running them again.
const PAGE_START = Date.now();

const $ = (id) => document.getElementById(id);

let client = null;
const view = {
  run: null,
  steps: new Map(), // index -> {index, name, status, duration_ms, restored}
  running: null, // index of the step in progress
  logs: [],
  unsubscribe: null,
};

function h(tag, className, ...children) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function fmtMs(ms) {
  if (typeof ms !== "number" || !Number.isFinite(ms)) return "";
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

function errorText(error) {
  const details = Array.isArray(error && error.details) ? error.details : [];
  const fields = details.map((d) => (Array.isArray(d.loc) && d.loc.length ? `${d.loc.join(".")}: ${d.msg}` : d.msg));
  return fields.length ? fields.join("; ") : `${error.name}: ${error.message}`;
}

// --- runtime status ---------------------------------------------------------------------

const STATUS_TEXT = {
  "loading-python": "Loading Python (Pyodide)…",
  "loading-jobs": "Loading the job module…",
  "waiting-for-storage": "Waiting for the previous page to release storage…",
  "opening-database": "Opening the database…",
  follower: "Another tab runs the jobs; connecting to it…",
  leader: "Taking over the database…",
};

function setRuntime(state, text) {
  $("runtime").dataset.state = state;
  $("runtime-text").textContent = text;
}

function onStatus({ state, detail }) {
  if (state === "waiting-for-storage") {
    const attempt = detail && detail.attempt ? ` (attempt ${detail.attempt})` : "";
    setRuntime("waiting", `${STATUS_TEXT[state]}${attempt}`);
  } else if (STATUS_TEXT[state]) {
    setRuntime("loading", STATUS_TEXT[state]);
  }
}

let updateReady = false; // a newer build is cached (offline: true): the next load uses it

function readyText() {
  const where = client.role === "leader" ? "this tab runs the jobs" : "another tab runs the jobs, this one follows";
  const update = updateReady ? " · a new version is ready: reload to use it" : "";
  return `Python ready in ${(performance.now() / 1000).toFixed(1)} s · storage: ${client.storage || "?"} · ${where}${update}`;
}

// --- the watched run ------------------------------------------------------------------------

// --- online / offline -----------------------------------------------------------------------

/** navigator.onLine, kept current by the online/offline events (the runtime's worker hears
 *  them too: runs waiting for the network continue as soon as it is back). */
function showNetwork() {
  const online = navigator.onLine;
  $("network").dataset.online = String(online);
  $("network-text").textContent = online
    ? "Online"
    : "Offline: steps that need the network wait for it (the rest go on)";
}

/** The step names this run will call, known from its input (see demo_jobs.py). */
function plannedSteps(run) {
  const days = run && run.input && Number.isInteger(run.input.days) ? run.input.days : 0;
  return [...Array.from({ length: days }, (_, i) => `fetch-day-${i + 1}`), "summarize", "publish"];
}

function statusText(run) {
  if (run.status === "leased") return "running";
  if (run.status === "waiting" && run.wait_reason === "offline") return "waiting for the network";
  return run.status;
}

async function watch(runId) {
  if (view.unsubscribe) view.unsubscribe();
  Object.assign(view, { run: null, steps: new Map(), running: null, logs: [], unsubscribe: null });
  // Listen first, then read the state: nothing that happens in between is lost.
  view.unsubscribe = client.subscribe(runId, (event) => onRunEvent(runId, event));
  view.run = await client.getRun(runId);
  mergeSteps(await client.getSteps(runId));
  view.logs = await client.getLogs(runId);
  if (!ACTIVE.includes(view.run.status) && view.unsubscribe) {
    view.unsubscribe();
    view.unsubscribe = null;
  }
  $("current").hidden = false;
  render();
}

function mergeSteps(steps) {
  for (const step of steps) {
    const known = view.steps.get(step.index);
    view.steps.set(step.index, {
      index: step.index,
      name: step.name,
      status: step.status,
      duration_ms: step.duration_ms,
      restored: known ? known.restored : Date.parse(step.completed_at) < PAGE_START,
    });
  }
}

let logsTimer = null;
function onRunEvent(runId, event) {
  if (!view.run || view.run.id !== runId) return;
  switch (event.type) {
    case "run:leased":
      view.run = { ...view.run, status: "leased" };
      break;
    case "run:waiting":
      view.run = { ...view.run, status: "waiting", wait_reason: event.reason, wait_step: event.step_name };
      view.running = null;
      break;
    case "run:progress":
      view.run = { ...view.run, progress: event.progress };
      break;
    case "step:start":
      view.running = event.step_index;
      break;
    case "step:complete":
    case "step:fail":
      view.steps.set(event.step_index, {
        index: event.step_index,
        name: event.step_name,
        status: event.type === "step:complete" ? "completed" : "failed",
        duration_ms: event.duration_ms,
        restored: false,
      });
      if (view.running === event.step_index) view.running = null;
      break;
    case "log:write":
      // Reload the log rather than append: the list and the events cannot double up.
      clearTimeout(logsTimer);
      logsTimer = setTimeout(async () => {
        view.logs = await client.getLogs(runId);
        render();
      }, 50);
      break;
    default:
      break;
  }
  if (["run:complete", "run:fail", "run:cancel", "run:delete"].includes(event.type)) {
    view.unsubscribe = null;
    finish(runId);
    return;
  }
  render();
}

async function finish(runId) {
  try {
    view.run = await client.getRun(runId);
    mergeSteps(await client.getSteps(runId));
    view.logs = await client.getLogs(runId);
  } catch (error) {
    if (error.name !== "NotFoundError") throw error;
    view.run = { ...view.run, status: "deleted" };
  }
  view.running = null;
  render();
  loadRecent();
}

function render() {
  const run = view.run;
  if (!run) return;
  const active = ACTIVE.includes(run.status);
  const input = run.input || {};
  $("run-title").textContent = `${input.city ?? "?"}, ${input.days ?? "?"} days`;
  $("run-sub").textContent = `run ${run.id}`;
  const pill = $("run-status");
  pill.textContent = statusText(run);
  pill.dataset.status = run.status;
  $("reload-invite").hidden = !active;

  const restored = [...view.steps.values()].filter((s) => s.restored).length;
  $("resumed").hidden = restored === 0;
  $("resumed").textContent = restored
    ? `Resumed after a reload: ${restored} step${restored === 1 ? " was" : "s were"} restored from storage and not run again.`
    : "";

  const p = run.progress;
  const planned = plannedSteps(run);
  const pct = run.status === "completed" ? 100 : p && p.total ? (100 * p.current) / p.total : 0;
  $("progress-fill").style.width = `${Math.min(100, pct).toFixed(1)}%`;
  $("progress-fill").dataset.status = run.status;
  const offline = run.status === "waiting" && run.wait_reason === "offline";
  $("progress-text").textContent = offline
    ? `offline: step "${run.wait_step}" waits for the network, and continues once it is back`
    : p && p.message ? p.message : active ? "waiting for the worker…" : "";
  $("progress-count").textContent = `${view.steps.size} / ${planned.length || "?"} steps`;

  renderSteps(planned);
  renderLog();
  renderResult(run);
}

function renderSteps(planned) {
  const names = planned.length ? planned : [...view.steps.values()].map((s) => s.name);
  const items = names.map((name, index) => {
    const step = view.steps.get(index);
    if (step) {
      const tag = step.restored ? h("span", "tag tag-replayed", "restored") : h("span", "tag tag-executed", "ran here");
      return h("li", `step step-${step.status}${step.restored ? " step-restored" : ""}`,
        h("span", "step-icon", step.status === "failed" ? "✕" : "✓"),
        h("span", "step-name", step.name),
        tag,
        h("span", "step-time", step.restored ? "" : fmtMs(step.duration_ms)));
    }
    if (view.running === index && ACTIVE.includes(view.run.status)) {
      return h("li", "step step-running", h("span", "step-icon spinner-small", ""), h("span", "step-name", name),
        h("span", "tag tag-running", "running"), h("span", "step-time", ""));
    }
    const run = view.run;
    const offline = run.status === "waiting" && run.wait_reason === "offline" && run.wait_step === name;
    return h("li", `step step-todo${offline ? " step-offline" : ""}`, h("span", "step-icon", "○"),
      h("span", "step-name", name), h("span", offline ? "tag tag-offline" : "tag", offline ? "needs the network" : ""),
      h("span", "step-time", ""));
  });
  $("steps").replaceChildren(...items);
}

function renderLog() {
  const box = $("log");
  const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
  const lines = view.logs.map((log) => h("div", `log-line log-${log.level}`,
    h("span", "log-time", new Date(log.created_at).toLocaleTimeString()),
    h("span", "log-msg", log.message)));
  if (!lines.length) lines.push(h("div", "log-empty", "Log lines appear here as days are fetched."));
  box.replaceChildren(...lines);
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function renderResult(run) {
  const box = $("result");
  box.hidden = !["completed", "failed", "cancelled", "deleted"].includes(run.status);
  box.dataset.status = run.status;
  if (run.status === "completed" && run.output) {
    const o = run.output;
    box.replaceChildren(
      h("div", "result-title", `Report for ${o.city}`),
      h("div", "stats",
        stat(`${o.mean_temperature_c} °C`, "mean temperature"),
        stat(`${o.total_rain_mm} mm`, "total rain"),
        stat(`day ${o.wettest_day}`, "wettest day"),
        stat(`${o.days}`, "days")));
  } else if (run.status === "failed" && run.error) {
    box.replaceChildren(h("div", "result-title", "The run failed"), h("pre", "", `${run.error.type}: ${run.error.message}`));
  } else if (run.status === "cancelled") {
    box.replaceChildren(h("div", "result-title", "The run was cancelled"));
  } else if (run.status === "deleted") {
    box.replaceChildren(h("div", "result-title", "The run was deleted"));
  }
}

function stat(value, label) {
  return h("div", "stat", h("div", "stat-value", value), h("div", "stat-label", label));
}

// --- recent runs ------------------------------------------------------------------------------

let recentTimer = null;
function scheduleRecent() {
  clearTimeout(recentTimer);
  recentTimer = setTimeout(loadRecent, 150);
}

async function loadRecent() {
  const runs = await client.getRuns({ jobName: JOB, limit: 8 });
  $("recent-empty").hidden = runs.length > 0;
  $("recent-body").replaceChildren(...runs.map((run) => {
    const input = run.input || {};
    const o = run.status === "completed" && run.output ? run.output : null;
    const row = h("tr", view.run && view.run.id === run.id ? "selected" : "",
      h("td", "nowrap", run.created_at ? new Date(run.created_at).toLocaleTimeString() : ""),
      h("td", "city", input.city ?? ""),
      h("td", "num", input.days ?? ""),
      h("td", "", h("span", "pill pill-small", statusText(run))),
      h("td", "num", o ? `${o.mean_temperature_c} °C` : "—"),
      h("td", "num", o ? `${o.total_rain_mm} mm` : "—"),
      h("td", "num", o ? `day ${o.wettest_day}` : "—"));
    row.querySelector(".pill").dataset.status = run.status;
    row.tabIndex = 0;
    row.title = "Show this run";
    row.addEventListener("click", () => watch(run.id));
    row.addEventListener("keydown", (e) => { if (e.key === "Enter") watch(run.id); });
    return row;
  }));
}

// --- start ----------------------------------------------------------------------------------------

async function start(event) {
  event.preventDefault();
  $("form-error").hidden = true;
  const input = {
    city: $("city").value.trim(),
    days: Number($("days").value),
    step_delay: Number($("delay").value),
  };
  $("start").disabled = true;
  try {
    const run = await client.trigger(JOB, input);
    await watch(run.id);
    scheduleRecent();
    $("current").scrollIntoView({ behavior: "smooth", block: "nearest" });
  } catch (error) {
    $("form-error").textContent = errorText(error);
    $("form-error").hidden = false;
  } finally {
    $("start").disabled = false;
  }
}

/** Whether the browser promised to keep the data, and how much of the quota it uses. */
async function showStorage() {
  const info = await client.storageInfo();
  const mb = (n) => (n == null ? "?" : `${(n / 1e6).toFixed(1)} MB`);
  const used = info.estimate ? `${mb(info.estimate.usage)} of ${mb(info.estimate.quota)} used` : "no estimate";
  $("storage-text").textContent = `Storage ${info.persisted ? "persistent" : "not persistent (the browser may evict it)"} · ${used} · `;
  $("storage-info").hidden = false;
}

/** Save the database file (a consistent snapshot) before the browser evicts it. */
async function exportCopy() {
  const blob = await client.exportDatabase();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "demo.db";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

async function main() {
  showNetwork();
  addEventListener("online", showNetwork);
  addEventListener("offline", showNetwork);
  try {
    // offline: the service worker precaches the app, so after one visit it opens with no network.
    client = await DurablyWeb.create({ jobs: ["demo_jobs.py"], database: "demo.db", onStatus, offline: true });
  } catch (error) {
    setRuntime("error", `Could not start the runtime: ${error.name}: ${error.message}`);
    return;
  }
  window.demo = { client, view }; // handy in the devtools console (and for the browser tests)
  client.on("update:ready", () => (updateReady = true));
  setRuntime("ready", readyText());
  // A follower becomes the leader when the leader's tab closes: keep the line true.
  setInterval(() => { if ($("runtime").dataset.state === "ready") $("runtime-text").textContent = readyText(); }, 2000);

  client.on("*", (event) => {
    if (event.job_name === JOB && event.type.startsWith("run:") && event.type !== "run:progress") scheduleRecent();
  });
  showStorage();
  $("export").addEventListener("click", exportCopy);
  $("start-form").addEventListener("submit", start);
  $("reload").addEventListener("click", () => location.reload());
  $("start").disabled = false;

  // After a reload: the run the previous page left unfinished resumes at once; follow it.
  const unfinished = await client.getRuns({ status: ACTIVE, jobName: JOB, limit: 1 });
  const latest = unfinished[0] || (await client.getRuns({ jobName: JOB, limit: 1 }))[0];
  if (latest) await watch(latest.id);
  await loadRecent();
  document.body.dataset.ready = "1";
}

main().catch((error) => {
  console.error(error);
  setRuntime("error", `Something went wrong: ${error.message}`);
});
