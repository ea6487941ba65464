// durably.js: the page side of durably-web (see durably.d.ts for the API).
//
//   <script src="static/durably.js"></script>   defines globalThis.DurablyWeb
//   import DurablyWeb from "./static/durably.mjs"  the same object, as an ES module
//
// DurablyWeb.create() starts worker.js (Pyodide + SQLite) from the folder this
// file was loaded from and talks to it with id-matched messages. The worker
// decides which tab executes runs (see worker.js); every tab gets every event.
// DurablyWeb.connect() is the HTTP client of remote.js, loaded on first use.
// create({offline: true}) registers service_worker.js (the precache) from the same folder.
(function () {
  "use strict";
  if (globalThis.DurablyWeb) return; // loaded twice (script tag + module import)

  const VERSION = "0.1.0";
  // A waiting run (status "waiting": asleep, backing off before a retry, or waiting for a
  // signal) is not finished: run:waiting is not terminal, and subscribe() keeps going.
  const TERMINAL = new Set(["run:complete", "run:fail", "run:cancel", "run:delete"]);
  const STORAGES = ["auto", "opfs", "idb", "memory"];
  const SW_MESSAGE = "durably-web:"; // prefix of service_worker.js's messages
  // The RPC methods of durably_web/rpc.py (tests/test_rpc.py checks the two lists agree).
  const METHODS = [
    "trigger", "triggerAndWait", "batchTrigger", "waitForRun", "getRun", "getRuns", "getSteps",
    "getStepAttempts", "getLogs", "cancel", "sendSignal", "resumeRun", "forkRun", "retrigger",
    "deleteRun", "purgeRuns", "jobs", "integrityCheck", "storageInfo",
    "schedule", "unschedule", "listSchedules", "pauseSchedule", "resumeSchedule",
  ];

  // document.currentScript only exists while a classic script first runs.
  const script = typeof document !== "undefined" ? document.currentScript : null;
  const scriptBase = script && script.src ? new URL("./", script.src).href : null;

  /** An Error shaped like durably.d.ts's DurablyError. */
  function durablyError({ name, message, details }) {
    const error = new Error(message);
    error.name = name || "DurablyError";
    error.details = details ?? null;
    return error;
  }

  function folderUrl(url) {
    const href = new URL(url, document.baseURI).href;
    return href.endsWith("/") ? href : href + "/";
  }

  /** The terminal event of a run that had already ended when subscribe() was called. */
  function terminalEventOf(run) {
    const type = { completed: "run:complete", failed: "run:fail", cancelled: "run:cancel" }[run.status];
    if (!type) return null;
    const data = run.status === "completed" ? { output: run.output } : { error: run.error };
    return { type, run_id: run.id, job_name: run.job_name, timestamp: run.completed_at || run.updated_at, ...data };
  }

  class LocalClient {
    constructor(worker, onStatus) {
      this.kind = "local";
      this.role = "follower";
      this.storage = null;
      this._worker = worker;
      this._onStatus = onStatus;
      this._pending = new Map(); // id -> {resolve, reject}
      this._nextId = 1;
      this._listeners = new Map(); // type or "*" -> Set(listener)
      this._closed = false;
      // Events that arrive before create() resolves (a resumed run starts at once)
      // wait here until the caller had a chance to call on().
      this._early = [];
      worker.onmessage = (event) => this._onMessage(event.data);
      // A worker that fails to load (bad URL, syntax error) never answers: fail everything.
      worker.onerror = (event) => this._failAll(`durably-web worker failed: ${event.message || "load error"}`);
      for (const method of METHODS) this[method] = (...args) => this._call(method, args);
      // Answered partly by the page: the Storage API's persistence lives on the page side.
      this.storageInfo = () => this._storageInfo();
      this.persisted = null; // the answer of navigator.storage.persist() in create(), if asked
      // Chromium fires online/offline at the page only, never in a dedicated worker (whose
      // navigator.onLine does follow them): pass them on, so that runs waiting for the
      // network (wait_reason "offline") continue as soon as it is back.
      this._onNetwork = () => worker.postMessage({ cmd: "network" });
      if (typeof addEventListener === "function") {
        addEventListener("online", this._onNetwork);
        addEventListener("offline", this._onNetwork);
      }
      this._updateReady = null; // the newer build an update:ready event announced
      this._stopOffline = null; // detaches the service worker's message listener (offline: true)
    }

    _stopForwardingNetwork() {
      if (typeof removeEventListener !== "function") return;
      removeEventListener("online", this._onNetwork);
      removeEventListener("offline", this._onNetwork);
    }

    /** Messages of service_worker.js to this page (offline: true). */
    _onServiceWorkerMessage(m) {
      if (!m || typeof m.type !== "string" || !m.type.startsWith(SW_MESSAGE)) return;
      const kind = m.type.slice(SW_MESSAGE.length);
      // "hello": the version this page runs on (null on a first, uncontrolled visit) and the
      // newest complete one; "update-ready": a newer build's cache just became complete.
      const older = kind === "hello" ? m.version && m.version !== m.newest : kind === "update-ready";
      const newest = kind === "hello" ? m.newest : m.version;
      if (!older || this._updateReady === newest) return;
      this._updateReady = newest;
      this._emit({ type: "update:ready", run_id: null, job_name: null, timestamp: new Date().toISOString(), version: newest });
    }

    /** The worker's storageInfo plus {persisted, estimate} from navigator.storage. */
    async _storageInfo() {
      const info = await this._call("storageInfo", []);
      const storage = typeof navigator !== "undefined" ? navigator.storage : null;
      let persisted = this.persisted;
      let estimate = null;
      if (storage && storage.persisted) persisted = await storage.persisted().catch(() => persisted);
      if (storage && storage.estimate) {
        const e = await storage.estimate().catch(() => null);
        if (e) estimate = { usage: e.usage ?? null, quota: e.quota ?? null };
      }
      return { ...info, persisted: !!persisted, estimate };
    }

    /** The database file as a Blob (a consistent snapshot, from whichever tab leads). */
    async exportDatabase() {
      const bytes = await this._request({ cmd: "call", method: "exportDatabase", args: [] });
      return new Blob([bytes], { type: "application/vnd.sqlite3" });
    }

    /** Replace the database by a file exportDatabase() made (Blob, ArrayBuffer or bytes). */
    async importDatabase(data) {
      let bytes = data;
      if (typeof Blob !== "undefined" && data instanceof Blob) bytes = new Uint8Array(await data.arrayBuffer());
      else if (data instanceof ArrayBuffer) bytes = new Uint8Array(data);
      if (!(bytes instanceof Uint8Array)) throw durablyError({ name: "ValidationError", message: "importDatabase() needs a Blob, ArrayBuffer or Uint8Array" });
      return this._request({ cmd: "call", method: "importDatabase", args: [bytes] });
    }

    _request(message) {
      if (this._closed) return Promise.reject(durablyError({ message: "this durably-web client is closed" }));
      const id = this._nextId++;
      return new Promise((resolve, reject) => {
        this._pending.set(id, { resolve, reject });
        this._worker.postMessage({ id, ...message });
      });
    }

    _call(method, args) {
      // Trailing undefined arguments would reach Python as null and change nothing but arity.
      while (args.length && args[args.length - 1] === undefined) args.pop();
      return this._request({ cmd: "call", method, args: JSON.parse(JSON.stringify(args)) });
    }

    _onMessage(m) {
      if (m.id !== undefined) {
        const p = this._pending.get(m.id);
        this._pending.delete(m.id);
        if (!p) return;
        if (m.ok) p.resolve(m.value);
        else p.reject(durablyError(m.error));
      } else if (m.type === "event") {
        this._emit(JSON.parse(m.json));
      } else if (m.type === "role") {
        this.role = m.role;
      } else if (m.type === "status") {
        if (this._onStatus) {
          try {
            this._onStatus({ state: m.state, detail: m.detail });
          } catch (e) {
            console.error("durably-web onStatus listener failed", e);
          }
        }
      } else if (m.type === "fatal") {
        this._emit({ type: "worker:error", run_id: null, job_name: null, timestamp: new Date().toISOString(), error: m.error, source: "runtime" });
      }
    }

    _failAll(message) {
      for (const p of this._pending.values()) p.reject(durablyError({ message }));
      this._pending.clear();
    }

    _emit(event) {
      if (this._early) return void this._early.push(event);
      for (const key of [event.type, "*"]) {
        for (const listener of this._listeners.get(key) || []) {
          try {
            listener(event);
          } catch (e) {
            console.error("durably-web event listener failed", e);
          }
        }
      }
    }

    _flushEarly() {
      const early = this._early || [];
      this._early = null;
      for (const event of early) this._emit(event);
    }

    on(type, listener) {
      if (!this._listeners.has(type)) this._listeners.set(type, new Set());
      this._listeners.get(type).add(listener);
      return () => this._listeners.get(type).delete(listener);
    }

    subscribe(runId, listener) {
      if (listener) return this._subscribe(runId, listener, (e) => console.warn("durably-web subscribe:", e));
      // Async iterator form: a queue between the listener and next().
      const queue = [];
      const waiting = [];
      let done = false;
      let failure = null;
      const finish = () => {
        done = true;
        stop();
        for (const w of waiting.splice(0)) (failure ? w.reject(failure) : w.resolve({ value: undefined, done: true }));
      };
      const stop = this._subscribe(
        runId,
        (event) => {
          if (waiting.length) waiting.shift().resolve({ value: event, done: false });
          else queue.push(event);
          if (TERMINAL.has(event.type)) done = true;
          if (done && !queue.length) finish();
        },
        (error) => {
          failure = error;
          finish();
        },
      );
      return {
        next() {
          if (queue.length) {
            const value = queue.shift();
            if (done && !queue.length) finish();
            return Promise.resolve({ value, done: false });
          }
          if (failure) return Promise.reject(failure);
          if (done) return Promise.resolve({ value: undefined, done: true });
          return new Promise((resolve, reject) => waiting.push({ resolve, reject }));
        },
        return() {
          queue.length = 0;
          finish();
          return Promise.resolve({ value: undefined, done: true });
        },
        [Symbol.asyncIterator]() {
          return this;
        },
      };
    }

    /** Deliver runId's events to listener until its terminal event; returns unsubscribe. */
    _subscribe(runId, listener, onError) {
      let ended = false;
      const deliver = (event) => {
        if (ended || event.run_id !== runId) return;
        if (TERMINAL.has(event.type)) {
          ended = true;
          off();
        }
        listener(event);
      };
      const off = this.on("*", deliver);
      // Listen first, then look: a run that already ended still yields its terminal event.
      this.getRun(runId).then(
        (run) => {
          const event = terminalEventOf(run);
          if (event) deliver(event);
        },
        (error) => {
          if (ended) return;
          ended = true;
          off();
          onError(error);
        },
      );
      return () => {
        ended = true;
        off();
      };
    }

    async close() {
      if (this._closed) return;
      try {
        await this._request({ cmd: "close" });
      } finally {
        this._closed = true;
        this._stopForwardingNetwork();
        if (this._stopOffline) this._stopOffline();
        this._worker.terminate();
        this._failAll("this durably-web client is closed");
      }
    }
  }

  async function create(options = {}) {
    const { jobs, database = "durably.db", storage = "auto", onStatus } = options;
    if (!Array.isArray(jobs) || !jobs.length) throw durablyError({ name: "ValidationError", message: "create() needs jobs: [URLs of Python job modules]" });
    if (!STORAGES.includes(storage)) throw durablyError({ name: "ValidationError", message: `storage must be one of ${STORAGES.join(", ")}` });
    if (typeof database !== "string" || !/^[\w.-]+$/.test(database)) {
      throw durablyError({ name: "ValidationError", message: "database must be a plain file name (letters, digits, '.', '_', '-')" });
    }
    const packages = options.packages ?? [];
    if (!Array.isArray(packages) || !packages.every((p) => typeof p === "string" && /^[A-Za-z0-9._-]+$/.test(p))) {
      throw durablyError({ name: "ValidationError", message: "packages must be a list of package names, e.g. [\"python-dateutil\"]" });
    }
    const base = options.baseUrl ? folderUrl(options.baseUrl) : DurablyWeb._baseUrl;
    if (!base) throw durablyError({ message: "cannot tell where durably.js was loaded from; pass baseUrl" });

    const worker = new Worker(new URL("worker.js", base), { type: "module" });
    const client = new LocalClient(worker, onStatus);
    const config = {
      jobs: jobs.map((url) => new URL(url, document.baseURI).href),
      database,
      storage, // "auto" is resolved by the bridge in the leader's worker
      options: options.options || {},
      packages, // wheels bundled into site/ (packages.json); worker.js refuses any other
    };
    // persist() must be asked from the page (the worker has no user-visible origin UI);
    // on by default with offline: true. Asked in parallel with the start; never fatal.
    const persist = options.persist ?? !!options.offline;
    const persisting =
      persist && typeof navigator !== "undefined" && navigator.storage && navigator.storage.persist
        ? navigator.storage.persist().catch(() => false)
        : Promise.resolve(null);
    // In parallel with the start: the first visit runs from the network; later ones from the cache.
    if (options.offline) client._stopOffline = startOffline(base, client, config.jobs);
    try {
      const started = await client._request({ cmd: "start", config });
      client.persisted = await persisting;
      client.role = started.role;
      client.storage = started.storage;
      // After the caller's `await create()` continuation, which may attach listeners.
      setTimeout(() => client._flushEarly(), 0);
    } catch (e) {
      client._closed = true;
      client._stopForwardingNetwork();
      if (client._stopOffline) client._stopOffline();
      worker.terminate();
      throw e;
    }
    return client;
  }

  // --- offline: true: the service worker -----------------------------------------

  /**
   * Register service_worker.js (scope: the site's folder, or the page's folder when the
   * page lies outside it, which needs the Service-Worker-Allowed header), tell it which
   * files are the page's own, and relay its update messages to the client. Failures are
   * warnings: the app still runs from the network. Returns a function that detaches.
   */
  function startOffline(base, client, jobUrls) {
    const sw = typeof navigator !== "undefined" ? navigator.serviceWorker : null;
    if (!sw) {
      console.warn("durably-web: offline: true needs service workers (a secure context: https or http://localhost)");
      return null;
    }
    const listener = (event) => client._onServiceWorkerMessage(event.data);
    sw.addEventListener("message", listener);
    sw.startMessages();
    const page = location.href.split("#")[0];
    const scope = page.startsWith(base) ? base : new URL("./", page).href;
    let registration = null;
    const recheck = () => registration && registration.update().catch(() => {});
    // The browser looks for a new build on each navigation; a long-lived page also when back online.
    addEventListener("online", recheck);
    sw.register(new URL("service_worker.js", base).href, { scope })
      .then((r) => {
        registration = r;
        return sw.ready;
      })
      .then((ready) => ready.active.postMessage({ type: SW_MESSAGE + "hello", pageFiles: pageFiles(page, jobUrls) }))
      .catch((e) => {
        const hint = scope === base ? "" : ` (the page is outside ${base}: serve service_worker.js with "Service-Worker-Allowed: ${new URL(scope).pathname}")`;
        console.warn(`durably-web: offline: true could not register ${base}service_worker.js${hint}:`, e);
      });
    return () => {
      sw.removeEventListener("message", listener);
      removeEventListener("online", recheck);
    };
  }

  /** The page's own files, cached network-first: the page, its scripts, styles, icons, job modules. */
  function pageFiles(page, jobUrls) {
    const urls = [page, ...jobUrls];
    for (const element of document.querySelectorAll("script[src], link[href]")) {
      const rel = (element.getAttribute("rel") || "").toLowerCase();
      if (element.tagName === "LINK" && !/\b(stylesheet|icon|manifest|modulepreload|apple-touch-icon)\b/.test(rel)) continue;
      urls.push(element.src || element.href);
    }
    return urls.filter((url) => url.startsWith(location.origin + "/"));
  }

  // --- connect(): remote.js, loaded on first use ------------------------------

  let remote = null;

  function loadRemote(base) {
    if (!remote) {
      remote = globalThis.DurablyWebRemote
        ? Promise.resolve(globalThis.DurablyWebRemote)
        : import(new URL("remote.js", base).href).then(() => {
            if (!globalThis.DurablyWebRemote) throw durablyError({ message: "remote.js did not define DurablyWebRemote" });
            return globalThis.DurablyWebRemote;
          });
      remote.catch(() => (remote = null)); // let a later connect() try again
    }
    return remote;
  }

  /** Synchronous per durably.d.ts: methods wait for remote.js, then delegate. */
  function connect(url, options) {
    const base = DurablyWeb._baseUrl;
    const client = loadRemote(base).then((r) => r.connect(url, options));
    const proxy = { kind: "remote" };
    for (const method of METHODS.filter((m) => m !== "integrityCheck" && m !== "storageInfo").concat("close")) {
      proxy[method] = async (...args) => (await client)[method](...args);
    }
    // on/subscribe must return synchronously: hand back an unsubscribe that also works early.
    proxy.on = (type, listener) => {
      let off = null;
      let cancelled = false;
      client.then((c) => {
        if (!cancelled) off = c.on(type, listener);
      });
      return () => {
        cancelled = true;
        if (off) off();
      };
    };
    proxy.subscribe = (runId, listener) => {
      if (listener) {
        let off = null;
        let cancelled = false;
        client.then((c) => {
          if (!cancelled) off = c.subscribe(runId, listener);
        });
        return () => {
          cancelled = true;
          if (off) off();
        };
      }
      const inner = client.then((c) => c.subscribe(runId));
      return {
        next: async () => (await inner).next(),
        return: async () => ((await inner).return ? (await inner).return() : { value: undefined, done: true }),
        [Symbol.asyncIterator]() {
          return this;
        },
      };
    };
    return proxy;
  }

  const DurablyWeb = {
    version: VERSION,
    create,
    connect,
    // Where worker.js and Pyodide live; durably.mjs fills it in from import.meta.url.
    _baseUrl: scriptBase,
  };
  globalThis.DurablyWeb = DurablyWeb;
})();
