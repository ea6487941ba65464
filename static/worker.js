// worker.js: the durably-web runtime worker (a module Web Worker, one per tab).
//
// Started by durably.js. Everything (Pyodide, sqlite-wasm, the wheels) comes
// from this file's own folder: no CDN.
//
// Leadership. Several tabs may open the same database, but SQLite in OPFS can
// have only one owner, and a run must execute in one place. So every worker
// asks for the Web Lock "durably-web:<database>" and holds it for the rest of
// its life: the holder (the leader) opens the database and runs Durably; the
// others (followers) forward their page's calls to it over a BroadcastChannel.
// Every call executes in the leader's Durably, so a sendSignal from a follower tab
// wakes the waiting run at once, exactly as one sent in the leader tab does.
// Because the lock is requested *inside* the worker, the browser releases it
// exactly when the worker dies (tab closed or reloaded), which proves the old
// owner is gone: the next leader starts Durably with soleWorker and resumes
// the runs the old one had leased without waiting for their leases to expire.
// Followers load Pyodide and import the job modules while they wait, so a
// takeover only has to open the database.
//
// Page -> worker:  {id, cmd: "start", config} | {id, cmd: "call", method, args} | {id, cmd: "close"}
//                  {cmd: "network"}                 the page saw online/offline (no reply)
// Worker -> page:  {id, ok: true, value} | {id, ok: false, error: {name, message, details}}
//                  {type: "event", json}            a Durably event (JSON text)
//                  {type: "status", state, detail}  loading / storage / leadership progress
//                  {type: "role", role}             "leader" | "follower"
//                  {type: "fatal", error}           the runtime could not start
// Tab <-> tab (BroadcastChannel "durably-web:<database>"):
//                  {kind: "who"}                           a new follower asks for the leader
//                  {kind: "hello", leader}                 the (new) leader is ready
//                  {kind: "call", to, from, callId, method, args}
//                  {kind: "ack", to, callId}               the leader got the call (sent before acting on it)
//                  {kind: "reply", to, callId, result}
//                  {kind: "event", json}

import { loadPyodide, version as pyodideVersion } from "./pyodide.mjs";
import { loadSqlite3, openSqliteBridge, validateDatabaseImage } from "./sqlite_bridge.js";

const JOBS_DIR = "/home/pyodide/durably_jobs";
// How long a forwarded call waits for a leader to acknowledge it (e.g. during a handover).
const LEADER_WAIT_MS = 30000;
// Calls a leader acknowledged but never answered (it died) are sent again to the
// next leader only when that is harmless; the others fail as "outcome unknown".
// Unacknowledged calls never reached a leader and are always sent again.
// (triggerAndWait is split into trigger + waitForRun when forwarded, see forward()).
const RESENDABLE = new Set([
  "getRun", "getRuns", "getSteps", "getStepAttempts", "getLogs", "jobs", "waitForRun", "integrityCheck", "storageInfo",
  "exportDatabase",
]);

/** Whether sending the call again to the next leader cannot do anything twice. A signal
 * with a signalId can be: the engine delivers one id once, so a resent signal that had
 * taken effect answers "duplicate" (and one that had not is delivered or stored now). */
function resendable({ method, args }) {
  if (RESENDABLE.has(method)) return true;
  const options = method === "sendSignal" ? args[3] : null;
  return !!options && typeof options === "object" && typeof options.signalId === "string";
}

const me = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
let config = null;
let pyodide = null;
let browser = null; // the durably_web.browser module (PyProxy)
let runtime = null; // BrowserRuntime, only in the leader
let runtimeCall = null; // runtime.call, looked up once (each lookup makes a new PyProxy)
let role = null;
let channel = null;
let leaderId = null; // followers: the leader that said hello last
let nextCallId = 1;
const forwarded = new Map(); // callId -> {method, args, acked, resolve, timer}
let releaseLock = null; // resolves the promise the lock callback returns
let lockAbort = null; // aborts a follower's pending lock request on close
let closing = false;
let openedStorage = null; // what "auto" resolved to in the leader (the bridge decides)
let ready = null; // {resolve, reject, settled}: "start" answers once calls can be served

// When each start phase ended (ms on the page's clock too: timeOrigin + now), sent with
// the "ready" status so a page or benchmark can tell where the start time went.
const phases = { workerLoaded: performance.timeOrigin + performance.now() };
const phase = (name) => (phases[name] = performance.timeOrigin + performance.now());

const post = (message) => self.postMessage(message);
const status = (state, detail) => post({ type: "status", state, detail });

function errorResult(name, message, details = null) {
  return { ok: false, error: { name, message, details } };
}

/** An error Python already described as {name, message, details}: passed on as it is. */
class ReportedError extends Error {
  constructor(error) {
    super(error.message);
    this.error = error;
  }
}

/** Python exceptions reach JS as PythonError: `type` is the class name, the message a traceback. */
function toErrorResult(e) {
  if (e instanceof ReportedError) return { ok: false, error: e.error };
  if (e && e.type && e.constructor && e.constructor.name === "PythonError") {
    // The message is a traceback; keep its "Type: message" part (which may span lines).
    const text = String(e.message).trim();
    const at = text.lastIndexOf(`\n${e.type}: `);
    const last = at >= 0 ? text.slice(at + 1) : text.split("\n").pop() || e.type;
    // e.g. WasmSqliteError -> StorageError, the family name the JS API promises.
    const name = browser ? browser.public_error_name(e.type) : e.type;
    return errorResult(name, last.replace(/^[\w.]+: /, ""));
  }
  const storage = e && /sqlite|opfs|indexeddb|quota/i.test(String(e.message));
  return errorResult(storage ? "StorageError" : "DurablyError", String((e && e.message) || e));
}

let bridge = null; // the leader's open database (sqlite_bridge.js), for exportDatabase

// The bridge reports waits for the previous page's OPFS handles through onWait.
let pendingImport = null; // importDatabase(): an oo1.DB to copy in before Python sees the database

globalThis.openSqliteBridge = async (options = {}) => {
  const opened = await openSqliteBridge({
    ...options,
    onWait(info) {
      status("waiting-for-storage", info);
      if (options.onWait) options.onWait(info);
    },
  });
  phase("databaseOpened");
  if (pendingImport) {
    try {
      await opened.importImage(pendingImport); // all or nothing (SQLite's backup API)
    } catch (e) {
      opened.close();
      throw e;
    }
  }
  return (bridge = opened);
};

// ------------------------------------------------------------------ start --

async function start(cfg) {
  config = cfg;
  status("loading-python");
  const base = new URL("./", import.meta.url).href;
  // Neither needs Python: fetch the job files and compile sqlite3.wasm while Pyodide loads.
  const sources = downloadJobModules(cfg.jobs);
  sources.catch(() => {}); // awaited below; this only keeps an early failure from being "unhandled"
  loadSqlite3().then(() => phase("sqliteLoaded"), () => {}); // a failure resurfaces when the database opens
  const packages = bundledPackages(cfg.packages || [], base);
  packages.catch(() => {}); // awaited below, like sources
  pyodide = await bootPython(base);
  phase("pyodideLoaded");
  const wanted = await packages;
  await pyodide.loadPackage(["durably-web", ...(wanted.length ? ["micropip"] : [])], { messageCallback: () => {} });
  phase("wheelsLoaded");
  if (wanted.length) {
    // micropip takes a name that site/pyodide-lock.json lists (every name bundledPackages let
    // through, and their depends) from site/ itself: no index is asked, so it works offline.
    const micropip = pyodide.pyimport("micropip");
    const names = pyodide.toPy(wanted);
    try {
      await micropip.install(names);
    } finally {
      names.destroy();
      micropip.destroy();
    }
  }

  status("loading-jobs");
  const fetched = await sources;
  const paths = writeJobModules(fetched);
  browser = pyodide.pyimport("durably_web.browser");
  phase("durablyImported");
  // A module that does not import comes back as {name, message, details: {module, line, traceback}}.
  const urls = Object.fromEntries(paths.map((path, i) => [path, fetched[i].url]));
  const loaded = JSON.parse(browser.preload(JSON.stringify(paths), JSON.stringify(urls)));
  if (!loaded.ok) throw new ReportedError(loaded.error);
  phase("jobsImported");
  const jobs = loaded.value;
  config.paths = paths;

  const served = new Promise((resolve, reject) => (ready = { resolve, reject, settled: false }));
  if (cfg.storage === "memory") {
    // Nothing to share with other tabs: each tab has its own database.
    await lead();
  } else {
    channel = new BroadcastChannel(`durably-web:${cfg.database}`);
    channel.onmessage = (event) => onChannelMessage(event.data);
    contendForLeadership().catch(failed);
  }
  await served;
  return { role, storage: openedStorage, jobs };
}

// Pyodide's memory snapshot of a freshly booted interpreter: no packages loaded, no JS object
// held by Python (the one state Pyodide 314 snapshots reliably; packages, binary ones like
// pydantic-core above all, load after it as before). Restoring it skips Python's own start-up,
// most of loadPyodide's time. Made on the first visit (about 0.2 s more), kept in Cache Storage
// under Pyodide's version; anything failing boots Python the usual way.
const SNAPSHOT_CACHE = "durably-web-python-snapshot";

async function bootPython(base) {
  const options = { indexURL: base, stdout: (s) => console.log("[py]", s), stderr: (s) => console.warn("[py]", s) };
  const key = new URL(`pyodide-${pyodideVersion}.snapshot`, base).href;
  // No Cache Storage (some private modes): boot without a snapshot.
  const cache = typeof caches === "undefined" ? null : await caches.open(SNAPSHOT_CACHE).catch(() => null);
  if (!cache) return loadPyodide(options);
  const stored = await cache.match(key).catch(() => null);
  let snapshot = stored ? await stored.arrayBuffer().catch(() => null) : null;
  if (!snapshot) {
    // An interpreter that made a snapshot is not fit for use afterwards (its JS calls fail):
    // it only makes the snapshot, and this start restores it like every later one.
    try {
      snapshot = (await loadPyodide({ ...options, _makeSnapshot: true })).makeMemorySnapshot();
      cache
        .put(key, new Response(snapshot))
        .then(async () => {
          // Another Pyodide's snapshot (the site upgraded it) is never restored again.
          for (const old of await cache.keys()) if (old.url !== key) await cache.delete(old);
        })
        .catch((e) => console.warn("durably-web: Python snapshot not stored", e));
      phases.snapshot = "made";
    } catch (e) {
      console.warn("durably-web: no Python snapshot", e);
      return loadPyodide(options);
    }
  }
  try {
    const restored = await loadPyodide({ ...options, _loadSnapshot: snapshot });
    // Every restore starts from the snapshot's random state: draw a fresh seed (os.urandom).
    restored.runPython("import random; random.seed()");
    phases.snapshot ??= "restored";
    return restored;
  } catch (e) {
    console.warn("durably-web: the Python snapshot did not restore; booting without it", e);
    await cache.delete(key).catch(() => {});
    phases.snapshot = "failed";
    return loadPyodide(options);
  }
}

function nowReady() {
  if (ready.settled) return;
  ready.settled = true;
  phase("ready");
  status("ready", { role, phases });
  ready.resolve();
}

/** Failing to lead: reject "start", or tell the page if it is already running. */
function failed(e) {
  const result = toErrorResult(e);
  if (!ready.settled) {
    ready.settled = true;
    ready.reject(e);
  } else post({ type: "fatal", error: result.error });
  // Let another tab try; this one cannot serve.
  if (releaseLock) releaseLock();
}

/** The names in create({packages}), checked against site/packages.json (build.py writes it).
 *
 * Only wheels build.py bundled can load: the worker never asks a package index or a
 * CDN, so it works offline. micropip installs them (and their depends) from the wheels
 * pyodide-lock.json lists, in site/. */
async function bundledPackages(names, base) {
  if (!names.length) return [];
  const response = await fetch(new URL("packages.json", base));
  if (!response.ok) throw new Error(`cannot load packages.json: HTTP ${response.status}`);
  const bundled = (await response.json()).packages || {};
  const canonical = names.map((n) => String(n).toLowerCase().replace(/[-_.]+/g, "-"));
  const missing = canonical.filter((n) => !Object.hasOwn(bundled, n));
  if (missing.length) {
    throw new ReportedError({
      name: "ValidationError",
      message:
        `package ${missing.map((n) => `"${n}"`).join(", ")} is not bundled with this site ` +
        `(bundled: ${Object.keys(bundled).join(", ") || "none"}); to add it, list its pure-Python wheel ` +
        `with version and sha256 in browser-wheels.json's "packages" group and run python build.py`,
      details: { packages: missing, bundled: Object.keys(bundled) },
    });
  }
  return canonical;
}

/** Fetch the job modules' source text, in parallel. */
function downloadJobModules(urls) {
  return Promise.all(
    urls.map(async (url) => {
      const response = await fetch(url);
      if (!response.ok) throw new Error(`cannot load job module ${url}: HTTP ${response.status}`);
      // The page vetted the URL it asked for, not where a redirect leads: an open redirect
      // on a trusted origin must not hand the worker another origin's code.
      const asked = new URL(url, self.location.href).origin;
      if (response.url && new URL(response.url).origin !== asked) {
        throw new Error(`job module ${url} was redirected to another origin (${new URL(response.url).origin}); refused`);
      }
      return { url, text: await response.text() };
    }),
  );
}

/** Write the job modules into Pyodide's file system; the file name becomes the module name. */
function writeJobModules(sources) {
  pyodide.FS.mkdirTree(JOBS_DIR);
  const paths = [];
  for (const { url, text } of sources) {
    const name = new URL(url).pathname.split("/").pop() || "jobs.py";
    const path = `${JOBS_DIR}/${name.endsWith(".py") ? name : name + ".py"}`;
    if (paths.includes(path)) throw new Error(`two job modules are named ${name}`);
    pyodide.FS.writeFile(path, text);
    paths.push(path);
  }
  return paths;
}

// ------------------------------------------------------------- leadership --

/** Resolves once this worker leads; until then it serves as a follower. */
async function contendForLeadership() {
  const lockName = `durably-web:${config.database}`;
  const held = new Promise((resolve) => (releaseLock = resolve));
  const request = (options) =>
    new Promise((granted, refused) => {
      navigator.locks
        .request(lockName, options, (lock) => {
          granted(lock);
          return lock ? held : undefined; // keep the lock until close() or death
        })
        .catch(refused);
    });
  // Try without queueing first, so a lone tab never shows up as a follower.
  if (!(await request({ ifAvailable: true }))) {
    becomeFollower();
    lockAbort = new AbortController();
    try {
      await request({ signal: lockAbort.signal });
    } catch (e) {
      if (closing) return;
      throw e;
    }
    if (closing) return releaseLock();
  }
  await lead();
}

function becomeFollower() {
  role = "follower";
  post({ type: "role", role });
  status("follower");
  channel.postMessage({ kind: "who" });
}

async function lead() {
  phase("leading");
  const takeover = role === "follower";
  role = "leader";
  post({ type: "role", role });
  status("opening-database");
  runtime = await browser.open_and_start(JSON.stringify(config.paths), JSON.stringify(databaseConfig()), onPythonEvent);
  phase("runtimeStarted");
  runtimeCall = runtime.call;
  openedStorage = (await callLocal("storageInfo", [])).value.storage;
  status("leader", { takeover, storage: openedStorage });
  if (channel) channel.postMessage({ kind: "hello", leader: me, storage: openedStorage });
  nowReady();
  // Calls this tab forwarded to the old leader now run here.
  for (const [callId, call] of forwarded) {
    forwarded.delete(callId);
    clearTimeout(call.timer);
    if (call.acked && !resendable(call)) call.resolve(lostCall(call.method));
    else call.resolve(callLocal(call.method, call.args));
  }
}

function databaseConfig() {
  const storage = config.storage;
  return {
    storage,
    filename: storage === "memory" ? ":memory:" : `/${config.database}`,
    // Applies to OPFS only ("auto" may resolve to it): WAL needs exclusive locking
    // under opfs-sahpool (the bridge sets it), is ~4x cheaper per commit than the
    // rollback journal and kept every commit across mid-commit stops.
    journalMode: storage === "memory" ? null : "wal",
    synchronous: "full",
    soleWorker: true, // we hold the lock: runs leased by a dead previous owner resume now
    options: config.options || {},
  };
}

function onPythonEvent(json) {
  post({ type: "event", json });
  if (channel) channel.postMessage({ kind: "event", json });
}

// -------------------------------------------------------------- the calls --

let importing = null; // importDatabase() in progress: other calls wait for it

async function callLocal(method, args) {
  if (method === "importDatabase") return importDatabase(args[0]);
  while (importing) await importing;
  if (method === "exportDatabase") return exportDatabase();
  try {
    return JSON.parse(await runtimeCall(method, JSON.stringify(args)));
  } catch (e) {
    return toErrorResult(e);
  }
}

/** exportDatabase(): the leader's database file as bytes (the page makes the Blob).
 * Engine transactions may span an await, so wait (yielding to the event loop) until
 * none is open: the image then holds committed state only, consistent as a whole. */
async function exportDatabase() {
  try {
    if (!bridge) throw new Error("exportDatabase() needs an open database");
    const deadline = Date.now() + 10000;
    while (bridge.inTransaction()) {
      if (Date.now() > deadline) return errorResult("ConflictError", "exportDatabase(): a transaction stayed open for 10 s");
      await new Promise((resolve) => setTimeout(resolve, 1));
    }
    return { ok: true, value: bridge.exportImage() };
  } catch (e) {
    return toErrorResult(e);
  }
}

/** importDatabase(bytes): validate, stop the runtime (handlers stop, leases released,
 * database closed), reopen it with the bytes copied in (SQLite's backup API: all or
 * nothing) and start again, so runs in the imported file resume. On any failure the
 * runtime restarts on the database as it was. The current content is replaced. */
async function importDatabase(bytes) {
  while (importing) await importing;
  let candidate;
  try {
    const checked = await validateDatabaseImage(bytes);
    candidate = checked.db;
    // The open database is migrated to this code's schema: a newer file would not start.
    const ours = bridge ? bridge._db.selectValue("SELECT MAX(version) FROM durably_migrations") : null;
    if (ours != null && checked.schemaVersion > ours) {
      candidate.close();
      throw new Error(`the file has schema version ${checked.schemaVersion}, newer than this durably-web's ${ours}`);
    }
  } catch (e) {
    return errorResult("ValidationError", `importDatabase(): ${e.message}; nothing was changed`);
  }
  let done;
  importing = new Promise((resolve) => (done = resolve));
  try {
    if (!runtime) return errorResult("ConflictError", "importDatabase(): this tab's runtime is not running");
    const r = runtime;
    await r.stop();
    runtimeCall.destroy();
    r.destroy();
    runtime = runtimeCall = null;
    let failure = null;
    pendingImport = candidate;
    try {
      runtime = await browser.open_and_start(JSON.stringify(config.paths), JSON.stringify(databaseConfig()), onPythonEvent);
    } catch (e) {
      failure = e;
    } finally {
      pendingImport = null;
    }
    if (failure) {
      runtime = await browser.open_and_start(JSON.stringify(config.paths), JSON.stringify(databaseConfig()), onPythonEvent);
    }
    runtimeCall = runtime.call;
    if (failure) {
      return errorResult("ConflictError", `importDatabase() failed, the database is unchanged: ${failure.message || failure}`);
    }
    return { ok: true, value: null };
  } catch (e) {
    return toErrorResult(e);
  } finally {
    candidate.close();
    importing = null;
    done();
  }
}

function lostCall(method) {
  return errorResult(
    "DurablyError",
    `the leader tab closed while handling ${method}(); it may or may not have taken effect`,
  );
}

function dispatch(method, args) {
  return runtime ? callLocal(method, args) : forward(method, args);
}

/** A follower's call: send it to the leader, or queue it until one says hello. */
async function forward(method, args) {
  if (method === "triggerAndWait") {
    // Split, so a handover during the (long) wait can be resent safely.
    const [job, input, options = {}] = args;
    // runTimeout (the run's deadline) is trigger's timeout; timeout is how long this call waits.
    const { timeout, runTimeout, ...rest } = options || {};
    const triggerOptions = runTimeout === undefined ? rest : { ...rest, timeout: runTimeout };
    const triggered = await dispatch("trigger", [job, input, triggerOptions]);
    if (!triggered.ok) return triggered;
    return dispatch("waitForRun", [triggered.value.id, timeout == null ? {} : { timeout }]);
  }
  return new Promise((resolve) => {
    const callId = nextCallId++;
    const call = { method, args, acked: false, resolve, timer: null };
    forwarded.set(callId, call);
    // While this worker is taking over (role leader, no runtime yet) lead() drains the queue.
    if (leaderId && role === "follower") send(callId, call);
    else waitForAck(callId, call);
  });
}

function send(callId, call) {
  call.acked = false;
  waitForAck(callId, call);
  channel.postMessage({ kind: "call", to: leaderId, from: me, callId, method: call.method, args: call.args });
}

function waitForAck(callId, call) {
  clearTimeout(call.timer);
  call.timer = setTimeout(() => {
    forwarded.delete(callId);
    call.resolve(
      errorResult(
        "DurablyError",
        `no leader tab for database "${config.database}" answered within ${LEADER_WAIT_MS / 1000} s`,
      ),
    );
  }, LEADER_WAIT_MS);
}

function onChannelMessage(m) {
  if (m.kind === "event") {
    if (role === "follower") post({ type: "event", json: m.json });
  } else if (m.kind === "who") {
    if (runtime) channel.postMessage({ kind: "hello", leader: me, storage: openedStorage });
  } else if (m.kind === "hello") {
    if (role !== "follower" || m.leader === leaderId) return;
    leaderId = m.leader;
    openedStorage = m.storage;
    nowReady();
    for (const [callId, call] of forwarded) {
      if (call.acked && !resendable(call)) {
        clearTimeout(call.timer);
        forwarded.delete(callId);
        call.resolve(lostCall(call.method));
      } else send(callId, call);
    }
  } else if (m.kind === "call") {
    if (m.to !== me || !runtime) return; // addressed to an older leader: the caller resends
    channel.postMessage({ kind: "ack", to: m.from, callId: m.callId });
    callLocal(m.method, m.args).then((result) =>
      channel.postMessage({ kind: "reply", to: m.from, callId: m.callId, result }),
    );
  } else if (m.kind === "ack") {
    const call = m.to === me && forwarded.get(m.callId);
    if (!call) return;
    call.acked = true;
    clearTimeout(call.timer); // a leader has it: wait as long as the call takes
  } else if (m.kind === "reply") {
    const call = m.to === me && forwarded.get(m.callId);
    if (!call) return;
    forwarded.delete(m.callId);
    call.resolve(m.result);
  }
}

async function close() {
  closing = true;
  if (lockAbort) lockAbort.abort();
  if (runtime) {
    const r = runtime;
    runtime = null; // stop answering other tabs; they resend reads to the next leader
    await r.stop(); // handlers stop at their next step and release their leases
    runtimeCall.destroy();
    r.destroy();
  }
  if (releaseLock) releaseLock();
  if (channel) channel.close();
}

// ---------------------------------------------------------------- network --

/** The browser went online or offline: the leader's runtime makes the runs waiting for the
 * network due (BrowserNetworkStatus in durably_web/browser.py; it reads navigator.onLine,
 * which follows the browser's state in a worker too). Chromium fires these events only at
 * the page, which forwards them ({cmd: "network"}); other browsers also fire them here. */
function networkChanged() {
  if (!runtime) return; // a follower: the leader's own page tells its worker
  const changed = runtime.network_changed; // a new PyProxy per lookup: destroyed after the call
  try {
    changed(navigator.onLine);
  } finally {
    changed.destroy();
  }
}
self.addEventListener("online", networkChanged);
self.addEventListener("offline", networkChanged);

// --------------------------------------------------------------- messages --

let started = null;

self.onmessage = async (event) => {
  const { id, cmd } = event.data;
  if (cmd === "start") {
    phase("startReceived");
    started = start(event.data.config);
    try {
      post({ id, ok: true, value: await started });
    } catch (e) {
      post({ id, ...toErrorResult(e) });
    }
  } else if (cmd === "call") {
    const { method, args } = event.data;
    try {
      await started;
    } catch (e) {
      return post({ id, ...errorResult("DurablyError", "the durably-web runtime failed to start") });
    }
    post({ id, ...(await dispatch(method, args)) });
  } else if (cmd === "network") {
    networkChanged();
  } else if (cmd === "close") {
    try {
      await close();
      post({ id, ok: true, value: null });
    } catch (e) {
      post({ id, ...toErrorResult(e) });
    }
  }
};
