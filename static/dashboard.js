// dashboard.js: the runs dashboard (dashboard.html). It only uses the DurablyClient API
// of durably.d.ts, so the same page works against a CPython server (remote.js) and
// against Pyodide in this browser (durably.js).
//
// Safety rule: every value that comes from a run (ids, inputs, outputs, labels, logs,
// errors) reaches the DOM as text: through h() below, which appends strings as text
// nodes, or through textContent. No innerHTML anywhere.
"use strict";

const ACTIVE = ["pending", "leased", "waiting"];
const STATUSES = ["pending", "leased", "waiting", "completed", "failed", "cancelled"];
const PAGE = 50;
// The live events say what changed; this refresh is the safety net for what they cannot
// say (runs executed by another process, events lost while a stream reconnects).
const SAFETY_REFRESH_MS = 5000;

const $ = (id) => document.getElementById(id);

const state = {
  client: null,
  limit: PAGE,
  runs: [], // the listed runs, newest first
  rows: new Map(), // run id -> <tr>
  selected: null, // run id shown in the detail panel
  // {run, steps: Map(index -> step), attempts: Map(index -> attempts) | null, logs, current,
  //  unsubscribe, gone}
  detail: null,
  armedDelete: null, // {id, until}: the Delete button asked for its confirming click
};

function isDeleteArmed(runId) {
  const armed = state.armedDelete;
  return Boolean(armed && armed.id === runId && Date.now() < armed.until);
}

function showDeleteArmed(button, armed) {
  button.dataset.armed = armed ? "1" : "";
  button.textContent = armed ? "Confirm delete" : "Delete";
}

// --- DOM helpers ----------------------------------------------------------------------------

/** Element builder: strings and numbers become text nodes, never markup. */
function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function statusBadge(status) {
  // The class comes from a fixed list; an unexpected value still shows, as text.
  const known = STATUSES.includes(status) ? status : "unknown";
  const text = status === "leased" ? "running" : status;
  return h("span", { class: `badge badge-${known}` }, h("span", { class: "badge-dot" }), text);
}

function labelChips(labels) {
  const entries = Object.entries(labels || {});
  if (!entries.length) return h("span", { class: "muted" }, "—");
  return h("span", { class: "chips" },
    entries.map(([k, v]) => h("span", { class: "chip", title: `${k}=${v}` }, h("b", null, k), "=", v)));
}

function progressBar(progress, status) {
  const p = progress || {};
  const total = typeof p.total === "number" && p.total > 0 ? p.total : null;
  let pct = total ? Math.min(100, Math.max(0, (p.current / total) * 100)) : null;
  if (status === "completed") pct = 100;
  const bar = h("div", { class: `bar bar-${STATUSES.includes(status) ? status : "unknown"}` },
    h("div", { class: "bar-fill", style: `width:${pct === null ? 0 : pct.toFixed(1)}%` }));
  // A waiting run is not working: no animation for it.
  if (pct === null && (status === "pending" || status === "leased")) bar.classList.add("bar-indeterminate");
  return bar;
}

/** Why a waiting run waits and until when, e.g. "waiting for signal 'approval'",
 *  "retry of 'deliver' at 14:02:05", "sleeping in 'cool-down' until 14:02:05",
 *  "offline: 'upload' waits for the network"; "" otherwise. */
function waitText(run) {
  if (!run || run.status !== "waiting") return "";
  const step = typeof run.wait_step === "string" ? `'${run.wait_step}'` : null;
  const at = run.wake_at ? fmtTime(run.wake_at) : null;
  switch (run.wait_reason) {
    case "signal":
      return `waiting for signal ${step || "?"}${at ? ` · times out at ${at}` : ""}`;
    case "retry":
      return `retry of ${step || "a step"} at ${at || "?"}`;
    case "sleep":
      return `sleeping in ${step || "a step"} until ${at || "?"}`;
    case "child":
      // Continues when the child run ends (its outcome makes this run due at once).
      return `waiting in ${step || "a step"} for child run ${run.wait_child_id ? shortId(run.wait_child_id) : "?"}`;
    case "offline":
      // Continues on the browser's "online" event; the wake time is only the next recheck.
      return `offline: ${step || "a step"} waits for the network${at ? ` · checked again at ${at}` : ""}`;
    default:
      return `waiting${run.wait_reason ? ` (${run.wait_reason})` : ""}${at ? ` until ${at}` : ""}`;
  }
}

/** Flow control: "starts after 14:02:05" for a pending run held back (a debounced job's
 *  run until its burst of triggers settles); "" otherwise. */
function startsAfterText(run) {
  return run && run.status === "pending" && run.not_before ? `starts after ${fmtTime(run.not_before)}` : "";
}

/** A run's priority as a small chip, only when it is not the default 0. */
function priorityChip(run) {
  const priority = run && Number.isInteger(run.priority) ? run.priority : 0;
  if (!priority) return null;
  return h("span", { class: "chip chip-priority", title: "priority: claimed before runs of lower priority" },
    `p${priority > 0 ? "+" : ""}${priority}`);
}

/** Whether the client has a method (the local runtime and the server grow at their own pace). */
function supports(method) {
  return Boolean(state.client) && typeof state.client[method] === "function";
}

function progressText(progress) {
  if (!progress) return "";
  const count = progress.total ? `${progress.current}/${progress.total}` : `${progress.current}`;
  return progress.message ? `${count} · ${progress.message}` : count;
}

function fmtTime(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  const sameDay = date.toDateString() === new Date().toDateString();
  return sameDay ? date.toLocaleTimeString() : date.toLocaleString();
}

function fmtDuration(ms) {
  if (typeof ms !== "number" || !Number.isFinite(ms) || ms < 0) return "—";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  const minutes = Math.floor(ms / 60000);
  return `${minutes} min ${Math.round((ms % 60000) / 1000)} s`;
}

function runDuration(run) {
  if (!run.started_at) return null;
  const end = run.completed_at ? Date.parse(run.completed_at) : ACTIVE.includes(run.status) ? Date.now() : null;
  return end === null ? null : end - Date.parse(run.started_at);
}

function shortId(id) {
  // ULIDs share their time prefix; the tail tells runs apart.
  return String(id).length > 12 ? `…${String(id).slice(-8)}` : String(id);
}

function json(value) {
  if (value === undefined) return "";
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}

let toastTimer = null;
function toast(message, kind = "error") {
  const el = $("toast");
  el.textContent = message;
  el.dataset.kind = kind;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, 6000);
}

function errorText(error) {
  const details = Array.isArray(error && error.details) ? error.details : [];
  const lines = details.map((d) => {
    const where = Array.isArray(d.loc) && d.loc.length ? `${d.loc.join(".")}: ` : "";
    return `${where}${d.msg || JSON.stringify(d)}`;
  });
  const head = error ? `${error.name || "Error"}: ${error.message}` : "Error";
  return [head, ...lines].join("\n");
}

/** "k=v, k2=v2" -> {k: "v", k2: "v2"}; throws on a part without "=". */
function parseLabels(text) {
  const labels = {};
  for (const part of text.split(",").map((s) => s.trim()).filter(Boolean)) {
    const at = part.indexOf("=");
    if (at < 1) throw new Error(`"${part}" is not key=value`);
    labels[part.slice(0, at).trim()] = part.slice(at + 1).trim();
  }
  return labels;
}

function setConnection(stateName, text) {
  $("connection").dataset.state = stateName;
  $("connection-text").textContent = text;
}

// --- runtime --------------------------------------------------------------------------------

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = new URL(src, location.href).href;
    script.onload = resolve;
    script.onerror = () => reject(new Error(`could not load ${src}`));
    document.head.append(script);
  });
}

const LOCAL_STATES = {
  "loading-python": "loading Python…",
  "opening-database": "opening the database…",
  "loading-jobs": "loading the job modules…",
  "waiting-for-storage": "waiting for the previous page to release storage…",
  "follower": "another tab runs the jobs; connecting to it…",
};

function localText(client) {
  return `in this browser · ${client.storage || "storage"} · ${client.role === "leader" ? "runs jobs here" : "another tab runs the jobs"}`;
}

/** Origins besides the page's own that ?local= and ?remote= may name: the page's
 *  <meta name="durably-allowed-origins" content="https://a.example https://b.example">. */
function allowedOrigins() {
  const meta = document.querySelector('meta[name="durably-allowed-origins"]');
  const origins = new Set([location.origin]);
  for (const entry of ((meta && meta.content) || "").split(/[\s,]+/).filter(Boolean)) {
    try {
      origins.add(new URL(entry).origin);
    } catch {
      // not a URL: ignored, it allows nothing
    }
  }
  return origins;
}

/** Resolve a ?local= / ?remote= value against the page URL; refuse other origins.
 *  ?local= runs Python inside this origin (its storage, its other tabs), so a link to
 *  dashboard.html must not be able to name code from anywhere else; data:, blob: and
 *  javascript: URLs have no http(s) origin and are refused too. */
function checkedUrl(value, what) {
  let url;
  try {
    url = new URL(value, location.href);
  } catch {
    throw refusal(`${what} ${JSON.stringify(value)} is not a URL`);
  }
  if (!["http:", "https:"].includes(url.protocol) || !allowedOrigins().has(url.origin)) {
    throw refusal(
      `refused ${what} ${JSON.stringify(value)}: only this page's origin (${location.origin}) ` +
        "or an origin listed in its <meta name=\"durably-allowed-origins\"> is allowed",
    );
  }
  return url.href;
}

function refusal(message) {
  const error = new Error(message);
  error.name = "RefusedURL";
  return error;
}

async function connect() {
  const params = new URLSearchParams(location.search);
  // Checked before anything is loaded or fetched.
  const localJobs = params.getAll("local").map((value) => checkedUrl(value, "?local="));
  const remote = params.get("remote");
  if (remote !== null) checkedUrl(remote, "?remote=");
  if (localJobs.length) {
    setConnection("connecting", "starting the local runtime…");
    await loadScript("durably.js");
    const client = await globalThis.DurablyWeb.create({
      jobs: localJobs,
      database: params.get("db") || "demo.db",
      storage: params.get("storage") || undefined,
      onStatus: (s) => {
        if (LOCAL_STATES[s.state]) setConnection("connecting", LOCAL_STATES[s.state]);
      },
    });
    setConnection("live", localText(client));
    return client;
  }
  // Served by durably_web.asgi at <prefix>/dashboard/: the API is the parent folder.
  const api = remote ? checkedUrl(remote, "?remote=") : new URL("..", location.href).href;
  if (!globalThis.DurablyWebRemote) await loadScript("remote.js");
  const client = globalThis.DurablyWebRemote.connect(api);
  setConnection("live", `server · ${new URL(client.url).host}${new URL(client.url).pathname}`);
  return client;
}

// --- the runs list --------------------------------------------------------------------------

function currentQuery() {
  const query = { limit: state.limit };
  const status = $("filter-status").value;
  if (status) query.status = status.split(",");
  if ($("filter-job").value) query.jobName = $("filter-job").value;
  const labels = parseLabels($("filter-label").value);
  if (Object.keys(labels).length) query.labels = labels;
  const version = $("filter-version").value.trim();
  if (version) query.version = version;
  return query;
}

async function loadRuns() {
  let query;
  try {
    query = currentQuery();
    $("filter-error").hidden = true;
  } catch (error) {
    $("filter-error").textContent = `Labels filter: ${error.message}`;
    $("filter-error").hidden = false;
    return;
  }
  try {
    state.runs = await state.client.getRuns(query);
    if ($("connection").dataset.state === "offline") setConnection("live", state.connectedText);
  } catch (error) {
    setConnection("offline", `offline — ${error.message}`);
    return;
  }
  renderRuns();
}

function renderRow(run) {
  const duration = runDuration(run);
  const row = h("tr", {
    class: run.id === state.selected ? "selected" : null,
    tabindex: "0",
    "data-run-id": run.id,
    onclick: () => selectRun(run.id),
    onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); selectRun(run.id); } },
  },
  h("td", null, statusBadge(run.status)),
  h("td", { class: "job" }, run.job_name, priorityChip(run) ? " " : null, priorityChip(run),
    // A child run says whose: the tree shows in the list as in the detail.
    run.parent_run_id ? h("span", { class: "child-of muted", title: `child run of ${run.parent_run_id}` },
      ` ↳ ${shortId(run.parent_run_id)}`) : null),
  h("td", { class: "mono", title: run.id }, shortId(run.id)),
  h("td", null, labelChips(run.labels)),
  h("td", { class: "col-progress" },
    progressBar(run.progress, run.status),
    run.status === "waiting"
      ? h("span", { class: "progress-text wait-text", title: waitText(run) }, waitText(run))
      : startsAfterText(run)
        ? h("span", { class: "progress-text starts-after", title: run.not_before }, startsAfterText(run))
        : h("span", { class: "progress-text" }, progressText(run.progress))),
  h("td", { class: "nowrap", title: run.created_at || "" }, fmtTime(run.created_at)),
  h("td", { class: "num nowrap" }, duration === null ? "—" : fmtDuration(duration)));
  state.rows.set(run.id, row);
  return row;
}

function renderRuns() {
  state.rows.clear();
  $("runs-body").replaceChildren(...state.runs.map(renderRow));
  $("runs-empty").hidden = state.runs.length > 0;
  $("runs-count").textContent = state.runs.length
    ? `${state.runs.length} run${state.runs.length === 1 ? "" : "s"}, newest first` : "";
  $("more").hidden = state.runs.length < state.limit;
}

// Many events may arrive at once (a batch, fast progress): coalesce them into one reload
// at a time, and one more after it if something changed meanwhile.
let refreshTimer = null;
let refreshing = false;
let refreshAgain = false;
function scheduleRefresh(delay = 150) {
  if (refreshTimer) return;
  refreshTimer = setTimeout(async () => {
    refreshTimer = null;
    if (refreshing) {
      refreshAgain = true;
      return;
    }
    refreshing = true;
    try {
      await loadRuns();
    } finally {
      refreshing = false;
      if (refreshAgain) {
        refreshAgain = false;
        scheduleRefresh();
      }
    }
  }, delay);
}

function onRunEvent(event) {
  // The local runtime's "*" also carries step and log events; the list only shows runs.
  if (!event.type.startsWith("run:")) return;
  // The selected run came back to life elsewhere (resumed by another client, say) while the
  // detail has no stream of its own: load it again, which opens one.
  const d = state.detail;
  if (event.run_id === state.selected && d && !d.unsubscribe && d.run && !ACTIVE.includes(d.run.status) &&
      ["run:resume", "run:leased", "run:waiting"].includes(event.type)) loadDetail(state.selected);
  // A schedule fired: its next tick and last run changed.
  const labels = event.labels || (event.run && event.run.labels) || {};
  if (event.type === "run:trigger" && labels["durably:schedule"] !== undefined) loadSchedules();
  // Progress is frequent: patch the row in place instead of reloading the list.
  if (event.type === "run:progress") {
    const index = state.runs.findIndex((r) => r.id === event.run_id);
    const row = state.rows.get(event.run_id);
    if (index >= 0 && row) {
      const run = { ...(event.run || state.runs[index]), progress: event.progress };
      state.runs[index] = run;
      row.replaceWith(renderRow(run));
      return;
    }
  }
  scheduleRefresh();
}

// --- run detail -----------------------------------------------------------------------------

function closeDetailStream() {
  if (state.detail && state.detail.unsubscribe) state.detail.unsubscribe();
  if (state.detail) state.detail.unsubscribe = null;
}

async function selectRun(id) {
  if (!id) return;
  if (state.selected !== id) closeDetailStream();
  state.selected = id;
  history.replaceState(null, "", `#run=${encodeURIComponent(id)}`);
  for (const [runId, row] of state.rows) row.classList.toggle("selected", runId === id);
  await loadDetail(id);
}

/** The attempts of the run's steps by step index, or null where they cannot be had (a
 *  runtime without getStepAttempts, or an error: they only add detail to the steps). */
async function loadAttempts(id) {
  if (!supports("getStepAttempts")) return null;
  try {
    const byIndex = new Map();
    for (const attempt of await state.client.getStepAttempts(id)) {
      if (!byIndex.has(attempt.index)) byIndex.set(attempt.index, []);
      byIndex.get(attempt.index).push(attempt);
    }
    return byIndex;
  } catch {
    return null;
  }
}

/** The run's child runs (step.start_child), oldest first; [] from a server without them. */
async function loadChildren(id) {
  try {
    return (await state.client.getRuns({ parentRunId: id, limit: 1000 })).reverse();
  } catch (error) {
    if (error.name === "ValidationError" || error.name === "TypeError") return [];
    throw error;
  }
}

async function loadDetail(id) {
  let run, steps, logs, attempts, children;
  try {
    [run, steps, logs, attempts, children] = await Promise.all([
      state.client.getRun(id), state.client.getSteps(id), state.client.getLogs(id), loadAttempts(id),
      loadChildren(id)]);
  } catch (error) {
    if (state.selected !== id) return;
    closeDetailStream();
    state.detail = { run: { id }, gone: error.name === "NotFoundError", error };
    renderDetail();
    return;
  }
  if (state.selected !== id) return; // the user moved on meanwhile
  const previous = state.detail && state.detail.run.id === id ? state.detail : null;
  state.detail = {
    run,
    steps: new Map(steps.map((s) => [s.index, s])),
    attempts,
    logs,
    children,
    current: null,
    unsubscribe: previous ? previous.unsubscribe : null,
  };
  // Live updates while it runs. Logs written between getLogs() and the stream opening
  // may be missed; the reload at the terminal event brings the full list.
  if (ACTIVE.includes(run.status) && !state.detail.unsubscribe) {
    state.detail.unsubscribe = state.client.subscribe(id, (event) => onDetailEvent(id, event));
  }
  renderDetail();
}

function onDetailEvent(id, event) {
  const d = state.detail;
  if (!d || state.selected !== id || d.run.id !== id) return;
  switch (event.type) {
    case "run:snapshot":
      if (event.run) d.run = event.run;
      break;
    case "run:leased":
      d.run = { ...d.run, status: "leased", attempt: event.attempt ?? d.run.attempt,
        wake_at: null, wait_reason: null, wait_step: null, wait_child_id: null };
      break;
    case "run:waiting":
    case "signal:received":
    case "step:retry":
      // The wait's fields, the sleep or signal step it recorded, the attempts: all from the store.
      if (event.type === "run:waiting") {
        d.run = { ...d.run, status: "waiting", wait_reason: event.reason ?? null,
          wait_step: event.step_name ?? null, wake_at: event.due_at ?? null,
          wait_child_id: event.child_run_id ?? null };
      }
      d.current = null;
      scheduleDetailReload(id);
      break;
    case "run:progress":
      d.run = { ...d.run, progress: event.progress };
      break;
    case "step:start":
      d.current = { index: event.step_index, name: event.step_name, since: Date.now() };
      break;
    case "step:complete":
    case "step:fail":
      if (event.will_retry) {
        // An attempt, not the step's record: the step is retried after a wait.
        if (d.attempts) {
          const list = d.attempts.get(event.step_index) || [];
          if (!list.some((a) => a.attempt === event.attempt)) {
            list.push({ index: event.step_index, name: event.step_name, attempt: event.attempt,
              status: "failed", error: event.error || null, duration_ms: null, offline: !!event.offline });
          }
          d.attempts.set(event.step_index, list);
        }
      } else {
        d.steps.set(event.step_index, {
          ...d.steps.get(event.step_index), // keeps what events do not carry (kind)
          index: event.step_index,
          name: event.step_name,
          status: event.type === "step:complete" ? "completed" : "failed",
          output: event.output,
          error: event.error || null,
          duration_ms: event.duration_ms,
        });
      }
      if (d.current && d.current.index === event.step_index) d.current = null;
      break;
    case "log:write":
      d.logs.push({ level: event.level, message: event.message, step_name: event.step_name,
        data: event.data, created_at: event.timestamp });
      break;
    default:
      break;
  }
  if (["run:complete", "run:fail", "run:cancel", "run:delete"].includes(event.type)) {
    d.unsubscribe = null; // the stream has ended by itself
    loadDetail(id); // the final state: output, error with traceback, all logs
    return;
  }
  scheduleDetailRender();
}

// Several events may ask for a reload at once (step:retry, then run:waiting): one reload.
let reloadTimer = null;
function scheduleDetailReload(id) {
  if (reloadTimer) return;
  reloadTimer = setTimeout(() => {
    reloadTimer = null;
    if (state.selected === id) loadDetail(id);
  }, 50);
}

let renderPending = false;
function scheduleDetailRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    renderDetail();
  });
}

function section(title, ...content) {
  return h("section", { class: "detail-section" }, h("h3", null, title), content);
}

function actionButton(label, className, enabled, handler, title) {
  return h("button", { type: "button", class: `btn ${className}`, disabled: !enabled, title,
    onclick: async (e) => {
      const button = e.currentTarget;
      button.disabled = true;
      try {
        await handler(button);
      } catch (error) {
        toast(errorText(error));
      } finally {
        if (button.isConnected) button.disabled = false;
      }
    } }, label);
}

function renderDetail() {
  const panel = $("detail");
  const d = state.detail;
  if (!d) {
    panel.replaceChildren(h("div", { class: "placeholder" }, h("p", null, "Select a run to see its input, steps, logs and output.")));
    return;
  }
  if (d.gone || d.error) {
    panel.replaceChildren(h("div", { class: "placeholder" },
      h("p", null, d.gone ? "This run no longer exists." : errorText(d.error)),
      h("p", { class: "mono muted" }, d.run.id)));
    return;
  }
  const run = d.run;
  const active = ACTIVE.includes(run.status);
  const logBox = panel.querySelector(".logs");
  const stickToBottom = !logBox || logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 4;

  const header = h("div", { class: "detail-header" },
    h("div", { class: "detail-title" },
      h("h2", null, run.job_name),
      statusBadge(run.status),
      h("div", { class: "mono muted run-id", title: "run id" }, run.id)),
    h("div", { class: "detail-actions" },
      actionButton("Cancel", "btn-warn", active, async () => {
        await state.client.cancel(run.id);
        await loadDetail(run.id);
        scheduleRefresh(0);
      }, "Stop the run at its next step"),
      actionButton("Resume", "", ["failed", "cancelled"].includes(run.status) && supports("resumeRun"),
        async () => {
          await state.client.resumeRun(run.id);
          toast("Run resumed", "ok");
          await loadDetail(run.id);
          scheduleRefresh(0);
        }, supports("resumeRun")
          ? "Continue a failed or cancelled run after its last completed step"
          : "This runtime cannot resume runs"),
      actionButton("Retrigger", "", true, async () => {
        const again = await state.client.retrigger(run.id);
        scheduleRefresh(0);
        await selectRun(again.id);
      }, "A new run with the same input and labels"),
      actionButton("Delete", "btn-danger", run.status !== "leased", async (button) => {
        // Two clicks: the first arms the button for a few seconds. The armed state lives in
        // `state`, not in the button, so a live event that redraws the panel keeps it.
        if (!isDeleteArmed(run.id)) {
          const armed = { id: run.id, until: Date.now() + 4000 };
          state.armedDelete = armed;
          showDeleteArmed(button, true);
          setTimeout(() => {
            if (state.armedDelete !== armed) return;
            state.armedDelete = null;
            const current = document.querySelector('#detail button[data-armed="1"]');
            if (current) showDeleteArmed(current, false);
          }, 4000);
          return;
        }
        state.armedDelete = null;
        await state.client.deleteRun(run.id);
        closeDetailStream();
        state.selected = null;
        state.detail = null;
        history.replaceState(null, "", location.pathname + location.search);
        renderDetail();
        scheduleRefresh(0);
      }, run.status === "leased" ? "Cancel it first: a running run cannot be deleted" : "Delete the run, its steps and logs")));

  const deleteButton = header.querySelector(".detail-actions .btn-danger");
  if (deleteButton && isDeleteArmed(run.id)) showDeleteArmed(deleteButton, true);

  const meta = h("dl", { class: "meta" },
    [["Attempt", run.attempt], ["Created", fmtTime(run.created_at)], ["Started", fmtTime(run.started_at)],
      ["Finished", fmtTime(run.completed_at)], ["Duration", fmtDuration(runDuration(run))],
      ["Idempotency key", run.idempotency_key || "—"], ["Concurrency key", run.concurrency_key || "—"],
      // timeout=: past the deadline the run fails with RunTimeoutError, waits included.
      ["Deadline", run.deadline_at ? fmtTime(run.deadline_at) : "—"], ["Version", run.version || "—"],
      ...(run.priority ? [["Priority", String(run.priority), "meta-priority"]] : []),
      ...(startsAfterText(run) ? [["Starts after", fmtTime(run.not_before), "meta-starts-after"]] : [])]
      .map(([k, v, cls]) => h("div", { class: cls || null }, h("dt", null, k), h("dd", null, v ?? "—"))),
    run.trace_parent ? h("div", { class: "meta-wide trace-parent" }, h("dt", null, "Trace parent"),
      h("dd", { class: "mono", title: "W3C traceparent: the span that triggered this run" }, run.trace_parent)) : null,
    run.forked_from ? h("div", { class: "meta-wide forked-from" }, h("dt", null, "Forked from"),
      h("dd", null, h("button", { type: "button", class: "link", title: "Show the run this one was forked from",
        onclick: () => selectRun(run.forked_from) }, run.forked_from))) : null,
    run.parent_run_id ? h("div", { class: "meta-wide parent-run" }, h("dt", null, "Parent run"),
      h("dd", null, h("button", { type: "button", class: "link", title: "Show the run that started this one",
        onclick: () => selectRun(run.parent_run_id) }, run.parent_run_id))) : null,
    h("div", { class: "meta-wide" }, h("dt", null, "Labels"), h("dd", null, labelChips(run.labels))));

  const progress = h("div", { class: "detail-progress" },
    progressBar(run.progress, run.status),
    // A waiting run says why right below; an empty caption would only leave a gap.
    run.status === "waiting" && !run.progress ? null
      : h("div", { class: "progress-caption" }, progressText(run.progress) || (active ? "waiting…" : "")));

  const parts = [header, progress];
  if (run.status === "waiting") {
    parts.push(h("div", { class: "wait-box", role: "status" }, h("span", { class: "wait-icon", "aria-hidden": "true" }),
      h("span", { class: "wait-text" }, waitText(run))));
    if (run.wait_reason === "signal" && typeof run.wait_step === "string") parts.push(signalForm(run));
  }
  if (!parts.includes(signalFormCache && signalFormCache.el)) signalFormCache = null;
  parts.push(meta);
  if (run.error) {
    parts.push(section("Error", h("div", { class: "error-box" },
      h("div", { class: "error-head" }, `${run.error.type}: ${run.error.message}`),
      run.error.traceback ? h("pre", { class: "traceback" }, run.error.traceback) : null)));
  }
  if (run.status === "completed") parts.push(section("Output", h("pre", { class: "json" }, json(run.output))));
  parts.push(section("Input", h("pre", { class: "json" }, json(run.input))));
  parts.push(section(`Steps (${d.steps.size})`, renderSteps(d)));
  if (d.children && d.children.length) parts.push(section(`Child runs (${d.children.length})`, renderChildren(d)));
  parts.push(section(`Logs (${d.logs.length})`, renderLogs(d.logs)));
  // The signal form is kept across renders (what was typed stays); so is its focus.
  const focused = panel.contains(document.activeElement) ? document.activeElement : null;
  panel.replaceChildren(...parts);
  if (focused && focused.isConnected && document.activeElement !== focused) focused.focus();

  const newLogBox = panel.querySelector(".logs");
  if (newLogBox && stickToBottom) newLogBox.scrollTop = newLogBox.scrollHeight;
}

// The form sending the signal a run waits for. One element per run and signal, reused by
// every render of the detail, so that a re-render (a live event) keeps what was typed.
let signalFormCache = null; // {key, el}

function signalForm(run) {
  const key = `${run.id}\u0000${run.wait_step}`;
  if (signalFormCache && signalFormCache.key === key) return signalFormCache.el;
  const name = run.wait_step;
  const payload = h("textarea", { class: "signal-payload", rows: "3", spellcheck: "false",
    "aria-label": "Signal payload (JSON)" }, "null");
  const signalId = h("input", { type: "text", class: "signal-id", placeholder: "optional", spellcheck: "false",
    "aria-label": "Signal id" });
  const message = h("p", { class: "form-error signal-error", role: "alert", hidden: true });
  const result = h("p", { class: "signal-result", role: "status", hidden: true });
  const submit = h("button", { type: "submit", class: "btn btn-primary" }, "Send signal");
  const show = (box, text) => {
    for (const el of [message, result]) el.hidden = el !== box;
    box.textContent = text;
  };
  const form = h("form", { class: "signal-form", autocomplete: "off", onsubmit: async (event) => {
    event.preventDefault();
    let value;
    try {
      // Checked here: nothing is sent unless it is JSON (empty means null).
      value = payload.value.trim() === "" ? null : JSON.parse(payload.value);
    } catch (error) {
      show(message, `Payload is not valid JSON: ${error.message}`);
      return;
    }
    const options = signalId.value.trim() ? { signalId: signalId.value.trim() } : undefined;
    submit.disabled = true;
    try {
      const disposition = await state.client.sendSignal(run.id, name, value, options);
      show(result, `Signal '${name}': ${disposition}`);
      toast(`Signal '${name}' ${disposition}`, "ok");
      if (state.selected === run.id) scheduleDetailReload(run.id);
    } catch (error) {
      show(message, errorText(error));
    } finally {
      submit.disabled = false;
    }
  } },
  h("div", { class: "signal-head" }, "Send signal ", h("span", { class: "mono" }, `'${name}'`)),
  h("label", { class: "field" }, h("span", null, "Payload (JSON)"), payload),
  h("div", { class: "signal-actions" },
    h("label", { class: "field grow" }, h("span", null, "Signal id"), signalId),
    supports("sendSignal") ? submit : h("span", { class: "muted" }, "This runtime cannot send signals")),
  message, result);
  signalFormCache = { key, el: form };
  return form;
}

/** What a sleep or signal step recorded, as a short line: "until 14:02:05", "timed out",
 *  "payload {...}". */
function stepNote(s) {
  if (s.kind === "sleep" && typeof s.output === "number") return `until ${fmtTime(new Date(s.output).toISOString())}`;
  if (s.kind === "signal" && s.output && typeof s.output === "object") {
    if (s.output.timeout) return "timed out";
    const text = json(s.output.payload).replace(/\s+/g, " ");
    return `payload ${text.length > 120 ? `${text.slice(0, 119)}…` : text}`;
  }
  return null;
}

function renderAttempts(attempts) {
  return h("ol", { class: "attempts", "aria-label": "attempts" }, attempts.map((a) =>
    h("li", { class: `attempt attempt-${a.status === "completed" ? "completed" : "failed"}` },
      h("span", { class: "attempt-number" }, `attempt ${a.attempt}`),
      // An offline attempt failed for want of the network: it used up no retry.
      h("span", { class: "attempt-status" }, a.offline ? `${a.status} · offline, not counted` : a.status),
      h("span", { class: "attempt-error" }, a.error ? `${a.error.type}: ${a.error.message}` : ""),
      h("span", { class: "attempt-duration" }, a.duration_ms === null || a.duration_ms === undefined
        ? "" : fmtDuration(a.duration_ms)),
      a.metadata ? h("div", { class: "attempt-metadata" }, fmtMetadata(a.metadata)) : null)));
}

/** What a step attached to an attempt (step.attempt.set_metadata), as one line of text. */
function fmtMetadata(metadata) {
  return Object.entries(metadata).map(([key, value]) => `${key}: ${JSON.stringify(value)}`).join(" · ");
}

function forkButton(run, step) {
  return actionButton("Fork from here", "btn-small step-fork", supports("forkRun"), async () => {
    const forked = await state.client.forkRun(run.id, { fromStep: step.name });
    toast(`Forked from step '${step.name}'`, "ok");
    scheduleRefresh(0);
    await selectRun(forked.id);
  }, supports("forkRun")
    ? `A new run with this run's input, replaying the steps before '${step.name}' and running it and the rest again`
    : "This runtime cannot fork runs");
}

function renderSteps(d) {
  const steps = [...d.steps.values()].sort((a, b) => a.index - b.index);
  const longest = Math.max(1, ...steps.map((s) => s.duration_ms || 0));
  const attemptsOf = (index) => (d.attempts && d.attempts.get(index)) || [];
  // A retried step lists its attempts; a step tried once has nothing to add.
  const retried = (index) => attemptsOf(index).length > 1;
  const rows = steps.map((s) => {
    const kind = ["sleep", "signal"].includes(s.kind) ? s.kind : null;
    const note = stepNote(s);
    // A sleep is recorded (with its due time) when it starts: until then the run sleeps in it.
    const asleep = d.run.status === "waiting" && d.run.wait_reason === "sleep" && d.run.wait_step === s.name;
    const cls = asleep ? "waiting" : s.status === "failed" ? "failed" : "completed";
    return h("li", { class: `step step-${cls}`, "data-step": s.name },
      h("span", { class: "step-index" }, s.index + 1),
      h("span", { class: "step-name", title: s.name }, kind ? h("span", { class: `step-kind step-kind-${kind}` }, kind) : null, s.name),
      h("span", { class: "step-bar" }, h("span", { style: `width:${(((s.duration_ms || 0) / longest) * 100).toFixed(1)}%` })),
      h("span", { class: "step-duration" }, asleep ? "sleeping" : fmtDuration(s.duration_ms)),
      forkButton(d.run, s),
      note ? h("div", { class: "step-note" }, note) : null,
      s.error ? h("div", { class: "step-error" }, `${s.error.type}: ${s.error.message}`) : null,
      // A step tried once shows its attempt's metadata here; a retried one, per attempt below.
      !retried(s.index) && attemptsOf(s.index)[0]?.metadata
        ? h("div", { class: "step-metadata" }, fmtMetadata(attemptsOf(s.index)[0].metadata)) : null,
      retried(s.index) ? renderAttempts(attemptsOf(s.index)) : null);
  });
  // Attempts of a step with no record yet: it failed and waits for its retry, or runs again.
  const pending = d.attempts ? [...d.attempts.keys()].filter((i) => !d.steps.has(i)).sort((a, b) => a - b) : [];
  const running = d.current && !d.steps.has(d.current.index) && ACTIVE.includes(d.run.status) ? d.current : null;
  for (const index of pending) {
    if (running && running.index === index) continue;
    const attempts = attemptsOf(index);
    rows.push(h("li", { class: "step step-retrying", "data-step": attempts[0].name },
      h("span", { class: "step-index" }, index + 1),
      h("span", { class: "step-name", title: attempts[0].name }, attempts[0].name),
      h("span", { class: "step-bar" }),
      h("span", { class: "step-duration" }, d.run.status !== "waiting" ? ""
        : d.run.wait_reason === "offline" ? "offline" : "retrying"),
      h("span"),
      renderAttempts(attempts)));
  }
  if (running) {
    rows.push(h("li", { class: "step step-running", "data-step": running.name },
      h("span", { class: "step-index" }, running.index + 1),
      h("span", { class: "step-name" }, running.name),
      h("span", { class: "step-bar" }, h("span", { class: "indeterminate" })),
      h("span", { class: "step-duration" }, "running"),
      h("span"),
      attemptsOf(running.index).length ? renderAttempts(attemptsOf(running.index)) : null));
  }
  if (!rows.length) return h("p", { class: "muted" }, "No steps recorded yet.");
  return h("ol", { class: "steps" }, rows);
}

/** The run's children under it: status, job and a link to each (the tree, one level at a time). */
function renderChildren(d) {
  return h("ul", { class: "child-runs" }, ...d.children.map((child) => h("li", null,
    statusBadge(child.status), " ", h("span", { class: "job" }, child.job_name), " ",
    h("button", { type: "button", class: "link mono", title: "Show this child run",
      "data-child-id": child.id, onclick: () => selectRun(child.id) }, child.id),
    d.run.wait_child_id === child.id ? h("span", { class: "muted" }, " · waited for") : null)));
}

function renderLogs(logs) {
  if (!logs.length) return h("p", { class: "muted" }, "No log lines.");
  return h("div", { class: "logs", tabindex: "0" }, logs.map((log) => {
    const level = ["debug", "info", "warning", "error"].includes(log.level) ? log.level : "info";
    return h("div", { class: `log log-${level}` },
      h("span", { class: "log-time" }, log.created_at ? new Date(log.created_at).toLocaleTimeString() : ""),
      h("span", { class: "log-level" }, log.level),
      log.step_name ? h("span", { class: "log-step" }, log.step_name) : null,
      h("span", { class: "log-message" }, log.message),
      log.data !== null && log.data !== undefined ? h("span", { class: "log-data" }, JSON.stringify(log.data)) : null);
  }));
}

// --- trigger form ---------------------------------------------------------------------------

function toggleTriggerForm(show) {
  $("trigger-form").hidden = !show;
  $("new-run").setAttribute("aria-expanded", String(show));
  if (show) $("trigger-input").focus();
}

/** What a trigger's disposition means, for the toast after the form's trigger. */
function triggeredText(run) {
  if (run.disposition === "created") return "Run triggered";
  if (run.disposition === "debounced") {
    const after = startsAfterText(run);
    return `Debounced into the pending run (latest input wins${after ? `; ${after}` : ""})`;
  }
  return `Existing run returned (${run.disposition})`;
}

async function submitTrigger(event) {
  event.preventDefault();
  const errorBox = $("trigger-error");
  errorBox.hidden = true;
  let input, labels;
  try {
    input = JSON.parse($("trigger-input").value || "null");
  } catch (error) {
    errorBox.textContent = `Input is not valid JSON: ${error.message}`;
    errorBox.hidden = false;
    return;
  }
  try {
    labels = parseLabels($("trigger-labels").value);
  } catch (error) {
    errorBox.textContent = `Labels: ${error.message}`;
    errorBox.hidden = false;
    return;
  }
  const options = {};
  if (Object.keys(labels).length) options.labels = labels;
  if ($("trigger-key").value.trim()) options.idempotencyKey = $("trigger-key").value.trim();
  if ($("trigger-concurrency-key").value.trim()) options.concurrencyKey = $("trigger-concurrency-key").value.trim();
  // The input's step="1" already stops a fraction at submit; the check is for the rest.
  const priority = $("trigger-priority").valueAsNumber;
  if (!Number.isNaN(priority)) {
    if (!Number.isInteger(priority)) {
      errorBox.textContent = "Priority must be a whole number";
      errorBox.hidden = false;
      return;
    }
    options.priority = priority;
  }
  try {
    const run = await state.client.trigger($("trigger-job").value, input, options);
    toast(triggeredText(run), "ok");
    scheduleRefresh(0);
    await selectRun(run.id);
  } catch (error) {
    errorBox.textContent = errorText(error);
    errorBox.hidden = false;
  }
}

// --- start ----------------------------------------------------------------------------------

/** Why the dashboard could not start, in the detail panel: the message and, for a job
 *  module that does not import, its traceback (as text). */
function showStartError(error) {
  const traceback = error && error.details && error.details.traceback;
  $("detail").replaceChildren(h("div", { class: "error-box start-error", role: "alert" },
    h("div", { class: "error-head" }, `${error.name || "Error"}: ${error.message}`),
    typeof traceback === "string" ? h("pre", { class: "traceback" }, traceback) : null));
  document.body.dataset.startError = error.name || "Error";
}

// --- schedules: a list with pause/resume (shown when the client has schedules) ---------------

function renderSchedule(schedule) {
  const paused = Boolean(schedule.paused);
  const toggle = actionButton(paused ? "Resume" : "Pause", "btn-small", true, async () => {
    if (paused) await state.client.resumeSchedule(schedule.name);
    else await state.client.pauseSchedule(schedule.name);
    await loadSchedules();
  }, paused ? "Create runs again from the next tick after now" : "Stop creating runs until resumed");
  toggle.dataset.schedule = schedule.name;
  const lastRun = schedule.last_run_id
    ? h("button", { type: "button", class: "link", onclick: () => selectRun(schedule.last_run_id) },
      shortId(schedule.last_run_id))
    : h("span", { class: "muted" }, "—");
  const zone = schedule.timezone && schedule.timezone !== "UTC" ? ` (${schedule.timezone})` : "";
  return h("tr", { class: paused ? "paused" : null, "data-schedule": schedule.name },
    h("td", { class: "job" }, schedule.name),
    h("td", null, schedule.job_name),
    h("td", { class: "mono" }, `${schedule.cron}${zone}`),
    h("td", null, paused ? "paused" : fmtTime(schedule.next_tick_at)),
    h("td", null, lastRun),
    h("td", null, toggle));
}

async function loadSchedules() {
  if (!supports("listSchedules")) return;
  let schedules;
  try {
    schedules = await state.client.listSchedules();
  } catch (error) {
    // A server whose auth hooks do not let this caller manage schedules: no section at all.
    $("schedules").hidden = true;
    return;
  }
  $("schedules-body").replaceChildren(...schedules.map(renderSchedule));
  $("schedules").hidden = schedules.length === 0;
}

async function main() {
  try {
    state.client = await connect();
  } catch (error) {
    setConnection("offline", `could not start: ${error.message}`);
    showStartError(error);
    return;
  }
  state.connectedText = $("connection-text").textContent;
  window.durablyDashboard = state; // for debugging from the console (and the browser tests)

  try {
    const jobs = await state.client.jobs();
    for (const select of [$("filter-job"), $("trigger-job")]) {
      select.append(...jobs.map((name) => h("option", { value: name }, name)));
    }
  } catch (error) {
    toast(`Could not list the jobs: ${errorText(error)}`);
  }

  for (const id of ["filter-status", "filter-job"]) $(id).addEventListener("change", () => scheduleRefresh(0));
  let typing = null;
  for (const id of ["filter-label", "filter-version"]) {
    $(id).addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(() => scheduleRefresh(0), 300);
    });
  }
  $("filters").addEventListener("submit", (e) => { e.preventDefault(); scheduleRefresh(0); });
  $("refresh").addEventListener("click", () => scheduleRefresh(0));
  $("more").addEventListener("click", () => { state.limit += PAGE; scheduleRefresh(0); });
  $("new-run").addEventListener("click", () => toggleTriggerForm($("trigger-form").hidden));
  $("trigger-cancel").addEventListener("click", () => toggleTriggerForm(false));
  $("trigger-form").addEventListener("submit", submitTrigger);

  // Chromium keeps a left page's event streams open (back/forward cache), holding server
  // connections: close them when leaving, and start afresh if the page comes back.
  if (state.client.kind === "remote") {
    addEventListener("pagehide", () => state.client.close());
    addEventListener("pageshow", (e) => { if (e.persisted) location.reload(); });
  }

  state.client.on("*", onRunEvent);
  await loadRuns();
  await loadSchedules();
  document.body.dataset.ready = "1";

  const fromHash = new URLSearchParams(location.hash.slice(1)).get("run");
  if (fromHash) selectRun(fromHash);

  setInterval(() => {
    if (document.visibilityState !== "visible") return;
    // A follower tab becomes the leader when the leader's tab closes.
    if (state.client.kind === "local" && $("connection").dataset.state === "live") {
      state.connectedText = localText(state.client);
      setConnection("live", state.connectedText);
    }
    scheduleRefresh(0);
    loadSchedules();
    // Without a live stream (a finished run, or another process running it) the detail
    // still catches up.
    if (state.selected && state.detail && !state.detail.unsubscribe && state.detail.run &&
        ACTIVE.includes(state.detail.run.status)) loadDetail(state.selected);
  }, SAFETY_REFRESH_MS);
  // Durations of running runs tick.
  setInterval(() => {
    if (state.runs.some((r) => ACTIVE.includes(r.status))) {
      for (const run of state.runs) {
        const row = state.rows.get(run.id);
        if (row && ACTIVE.includes(run.status) && row.lastElementChild) {
          const ms = runDuration(run);
          row.lastElementChild.textContent = ms === null ? "—" : fmtDuration(ms);
        }
      }
    }
  }, 1000);
}

main();
