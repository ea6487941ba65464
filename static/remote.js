// remote.js: the DurablyClient API (durably.d.ts) over the HTTP API of
// durably_web.asgi, for DurablyWeb.connect(url). durably.js loads this file on
// demand; it is a classic script (no exports) so it also works from a <script>
// tag or `import "./remote.js"`, and it touches no DOM, so a worker can use it.
//
//   const client = DurablyWebRemote.connect("/api/durably", {headers: {...}})
//
// Calls are fetch(); events come from the server's two SSE routes:
//   GET runs/{id}/events  one run: run:snapshot, its recorded steps
//                         (replayed: true) and progress, then live events,
//                         ending after the terminal event  -> subscribe()
//   GET events            run-level events of every run,
//                         each with the run's current state in `run` -> on()
//
// Differences from the local runtime, all imposed by the HTTP API:
// * on() only ever sees run-level events (run:*); step:*, log:write and
//   worker:error are per run: use subscribe(runId).
// * subscribe() also yields the server's "run:snapshot" event first.
// * getRuns() and the `run` of on() events are summaries (no input, output or traceback;
//   input_bytes/output_bytes instead), and run-list events carry no input/output:
//   getRun(id) has the whole run.
// * A stream whose client falls too far behind ends with "stream:reset" (the server holds
//   only so many events per client); this client reconnects at once. subscribe() then gets
//   a fresh run:snapshot (recorded steps are passed once); on() listeners may have missed
//   events in between, so a list view should reload (the dashboard also reloads periodically).
// * batchTrigger() is one POST trigger/batch: atomic, as locally (all runs or none).
// * sendSignal(runId, name) posts to runs/{id}/signals/{name}: the name is one path segment,
//   so the names "." and ".." (which URLs resolve away) cannot be sent over HTTP and are
//   refused here with a ValidationError.
// * purgeRuns() is POST purge; a server with auth hooks allows it only to callers
//   its can_purge hook accepts (otherwise: DurablyError, status 403).
// * schedule(), unschedule(), listSchedules(), pauseSchedule() and resumeSchedule() use the
//   schedules routes; a server with auth hooks allows them only to callers its
//   can_manage_schedules hook accepts (otherwise: DurablyError, status 403).
// * Errors carry the HTTP `status`; 401/403 (auth hooks) become DurablyError.
(function (global) {
  "use strict";

  const EVENT_TYPES = [
    "run:trigger", "run:coalesced", "run:leased", "run:complete", "run:fail",
    "run:cancel", "run:delete", "run:progress", "run:waiting", "run:resume", "step:start",
    "step:complete", "step:fail", "step:retry", "signal:received", "log:write", "worker:error",
  ];
  const TERMINAL = new Set(["run:complete", "run:fail", "run:cancel", "run:delete"]);
  // What GET /events carries (asgi.RUN_LEVEL_EVENT_TYPES).
  const RUN_LEVEL = new Set(EVENT_TYPES.filter((t) => t.startsWith("run:")));
  // Error names the client may reject with (durably.d.ts DurablyError["name"]).
  const KNOWN_ERRORS = new Set([
    "DurablyError", "ValidationError", "NotFoundError", "ConflictError", "CancelledError",
    "LeaseLostError", "StepError", "StorageError", "WaitTimeoutError", "SchemaVersionError",
  ]);
  // The server's own kinds (BadRequest, PayloadTooLarge, HTTPError, Forbidden…) by status.
  const BY_STATUS = { 400: "ValidationError", 404: "NotFoundError", 409: "ConflictError",
    413: "ValidationError", 422: "ValidationError", 503: "StorageError" };
  // waitForRun() learns about the end from the shared event stream; this poll
  // covers what that stream cannot see: runs finished by another process (the
  // server's events are in-process) and events lost while it reconnects.
  const WAIT_POLL_MS = 2000;

  function durablyError(name, message, details = null, extra = {}) {
    const error = new Error(message);
    error.name = name;
    error.details = details;
    return Object.assign(error, extra);
  }

  function checkOptions(what, options, allowed) {
    if (options === undefined || options === null) return {};
    if (typeof options !== "object" || Array.isArray(options)) {
      throw durablyError("ValidationError", `${what} must be an object`);
    }
    const unknown = Object.keys(options).filter((k) => !allowed.includes(k));
    if (unknown.length) {
      throw durablyError("ValidationError",
        `unknown option(s) ${unknown.join(", ")}; allowed: ${allowed.join(", ")}`);
    }
    return options;
  }

  function checkRunId(runId) {
    if (typeof runId !== "string" || runId === "") {
      throw durablyError("ValidationError", "runId must be a non-empty string");
    }
    return encodeURIComponent(runId);
  }

  // A schedule name as one path segment ("/" travels as %2F; the server takes the rest of the path).
  function checkScheduleName(name) {
    if (typeof name !== "string" || name === "") {
      throw durablyError("ValidationError", "name must be a non-empty string");
    }
    return encodeURIComponent(name);
  }

  // A signal name as one path segment of runs/{id}/signals/{name}.
  function checkSignalName(name) {
    if (typeof name !== "string" || name === "") {
      throw durablyError("ValidationError", "name must be a non-empty string");
    }
    // URLs drop "." and ".." segments (also as %2E), so the request would reach another route.
    if (name === "." || name === "..") {
      throw durablyError("ValidationError", `a signal named ${JSON.stringify(name)} cannot be sent over HTTP`);
    }
    return encodeURIComponent(name);
  }

  function checkTimeout(timeout) {
    if (timeout !== undefined && timeout !== null && (typeof timeout !== "number" || !(timeout >= 0))) {
      throw durablyError("ValidationError", "timeout must be a non-negative number of milliseconds");
    }
    return timeout ?? null;
  }

  // A run as trigger(), retrigger() and forkRun() resolve it: the run, with how it came about.
  function triggered(body) {
    return { ...body.run, disposition: body.disposition };
  }

  // {input, idempotency_key?, ...}: one trigger's input and options as the server names them.
  function triggerFields(input, options) {
    const o = checkOptions("options", options, [
      "idempotencyKey", "concurrencyKey", "coalesce", "labels", "priority", "timeout",
    ]);
    const body = { input: input === undefined ? null : input };
    // Only the options given: the server rejects nothing it does not need to see.
    if (o.idempotencyKey !== undefined) body.idempotency_key = o.idempotencyKey;
    if (o.concurrencyKey !== undefined) body.concurrency_key = o.concurrencyKey;
    if (o.coalesce !== undefined) body.coalesce = o.coalesce;
    if (o.labels !== undefined) body.labels = o.labels;
    if (o.priority !== undefined) body.priority = o.priority;
    // The run's deadline: milliseconds here, as every JS duration; seconds on the wire.
    if (o.timeout !== undefined && o.timeout !== null) {
      if (typeof o.timeout !== "number" || !(o.timeout > 0)) {
        throw durablyError("ValidationError", "timeout must be a positive number of milliseconds");
      }
      body.timeout = o.timeout / 1000;
    }
    return body;
  }

  function triggerBody(job, input, options) {
    return { job, ...triggerFields(input, options) };
  }

  // An EventSource listening to every named event type; `onEvent(data)` gets the parsed JSON.
  function openStream(url, types, onEvent, onError, onOpen) {
    const source = new EventSource(url);
    const handler = (message) => {
      let data;
      try {
        data = JSON.parse(message.data);
      } catch {
        return; // not ours (a proxy's injected line); never break the stream for it
      }
      onEvent(data);
    };
    for (const type of types) source.addEventListener(type, handler);
    source.onerror = () => onError(source);
    if (onOpen) source.onopen = onOpen;
    return source;
  }

  function callSafely(listener, event) {
    try {
      listener(event);
    } catch (error) {
      // A listener's bug must not stop delivery to the others (as in the Python EventBus).
      console.error("durably-web: event listener failed", error);
    }
  }

  // Push-to-pull adapter: events are pushed in, for-await pulls them out.
  function eventQueue(onReturn) {
    const buffered = [];
    let waiting = null; // {resolve, reject} of a pending next()
    let ended = false;
    let failure = null;
    const iterator = {
      push(event) {
        if (ended) return;
        if (waiting) {
          waiting.resolve({ value: event, done: false });
          waiting = null;
        } else buffered.push(event);
      },
      end(error = null) {
        if (ended) return;
        ended = true;
        failure = error;
        if (waiting) {
          if (error) waiting.reject(error);
          else waiting.resolve({ value: undefined, done: true });
          waiting = null;
        }
      },
      next() {
        if (buffered.length) return Promise.resolve({ value: buffered.shift(), done: false });
        if (ended) {
          const error = failure;
          failure = null; // reject once, then behave as finished
          return error ? Promise.reject(error) : Promise.resolve({ value: undefined, done: true });
        }
        return new Promise((resolve, reject) => { waiting = { resolve, reject }; });
      },
      return() {
        buffered.length = 0;
        iterator.end();
        onReturn();
        return Promise.resolve({ value: undefined, done: true });
      },
      [Symbol.asyncIterator]() { return iterator; },
    };
    return iterator;
  }

  class RemoteClient {
    constructor(url, options = {}) {
      const o = checkOptions("connect options", options, ["headers"]);
      const here = global.location ? global.location.href : undefined;
      const base = new URL(url, here);
      if (!base.pathname.endsWith("/")) base.pathname += "/";
      this.url = base.href;
      this._headers = { ...(o.headers || {}) };
      this._listeners = new Map(); // type or "*" -> Set of callbacks
      this._waiters = new Set(); // {runId, check} of pending waitForRun calls
      this._runStreams = new Set(); // close() functions of subscribe() streams
      this._events = null; // the shared GET events stream, while someone listens
      this._warned = new Set();
      this._closed = false;
    }

    get kind() { return "remote"; }

    // --- HTTP ---------------------------------------------------------------------------
    async _request(method, path, { query = null, body } = {}) {
      if (this._closed) throw durablyError("DurablyError", "the client is closed");
      const url = new URL(path, this.url);
      if (query) url.search = query.toString();
      const init = { method, headers: { Accept: "application/json", ...this._headers } };
      // The server refuses a POST without this type, body or not (a cross-site form cannot send it).
      if (body !== undefined || method === "POST") init.headers["Content-Type"] = "application/json";
      if (body !== undefined) init.body = JSON.stringify(body);
      let response;
      try {
        response = await fetch(url, init);
      } catch (error) {
        throw durablyError("DurablyError", `cannot reach ${url.origin}: ${error.message}`, null,
          { status: 0, cause: error });
      }
      const text = await response.text();
      let data = null;
      try {
        data = text ? JSON.parse(text) : null;
      } catch {
        data = null; // e.g. a proxy's HTML error page; handled below
      }
      if (response.ok && (data !== null || !text)) return data;
      if (response.ok) {
        throw durablyError("DurablyError", `${method} ${url.pathname}: the answer is not JSON`, null,
          { status: response.status });
      }
      const kind = data && typeof data.error === "string" ? data.error : null;
      const name = KNOWN_ERRORS.has(kind) ? kind : BY_STATUS[response.status] || "DurablyError";
      const message = data && typeof data.message === "string"
        ? data.message : `${method} ${url.pathname}: HTTP ${response.status} ${response.statusText}`;
      const details = data && Array.isArray(data.details) ? data.details : null;
      throw durablyError(name, message, details, { status: response.status, kind: kind || undefined });
    }

    // --- calls ---------------------------------------------------------------------------
    async trigger(job, input, options) {
      return triggered(await this._request("POST", "trigger", { body: triggerBody(job, input, options) }));
    }

    async triggerAndWait(job, input, options) {
      // timeout: how long this call waits; runTimeout: the run's own deadline (trigger's timeout).
      const { timeout, runTimeout, ...rest } = options || {};
      checkTimeout(timeout);
      const run = await this.trigger(job, input, runTimeout === undefined ? rest : { ...rest, timeout: runTimeout });
      return this.waitForRun(run.id, { timeout });
    }

    async batchTrigger(job, items) {
      if (!Array.isArray(items)) throw durablyError("ValidationError", "items must be an array");
      // Same rule as the local runtime (rpc.py): {input, options?} and nothing else is an item
      // with options; any other value is an input.
      const prepared = items.map((item, position) => {
        const isItem = item !== null && typeof item === "object" && !Array.isArray(item) &&
          "input" in item && Object.keys(item).every((k) => k === "input" || k === "options");
        try {
          return isItem ? triggerFields(item.input, item.options) : triggerFields(item);
        } catch (error) {
          error.message = `batch item ${position}: ${error.message}`;
          throw error;
        }
      });
      // One request, one transaction on the server: every run is created or none is.
      const body = await this._request("POST", "trigger/batch", { body: { job, items: prepared } });
      return body.runs;
    }

    async waitForRun(runId, options) {
      checkRunId(runId);
      const timeout = checkTimeout(checkOptions("options", options, ["timeout"]).timeout);
      return new Promise((resolve, reject) => {
        let timer = null;
        let poller = null;
        let checking = false;
        const waiter = { runId };
        const finish = (error, run) => {
          if (!this._waiters.delete(waiter)) return;
          clearTimeout(timer);
          clearInterval(poller);
          this._releaseEvents();
          error ? reject(error) : resolve(run);
        };
        // One getRun decides: terminal -> done; 404 and other errors -> rejected.
        waiter.check = async () => {
          if (checking) return;
          checking = true;
          try {
            const run = await this.getRun(runId);
            if (!["pending", "leased", "waiting"].includes(run.status)) finish(null, run);
          } catch (error) {
            finish(error);
          } finally {
            checking = false;
          }
        };
        waiter.fail = finish;
        this._waiters.add(waiter);
        this._retainEvents(); // the check runs again each time the stream (re)opens
        if (timeout !== null) {
          timer = setTimeout(() => finish(durablyError("WaitTimeoutError",
            `run ${runId} did not finish within ${timeout} ms`)), timeout);
        }
        poller = setInterval(waiter.check, WAIT_POLL_MS);
        waiter.check();
      });
    }

    getRun(runId) {
      return this._request("GET", `runs/${checkRunId(runId)}`);
    }

    async getRuns(query) {
      const q = checkOptions("query", query, [
        "status", "jobName", "labels", "limit", "offset", "parentRunId", "version",
      ]);
      const params = new URLSearchParams();
      for (const status of [].concat(q.status ?? [])) params.append("status", status);
      for (const job of [].concat(q.jobName ?? [])) params.append("job", job);
      for (const version of [].concat(q.version ?? [])) params.append("version", version);
      for (const [key, value] of Object.entries(q.labels || {})) params.append(`label.${key}`, value);
      if (q.limit !== undefined) params.set("limit", q.limit);
      if (q.offset !== undefined) params.set("offset", q.offset);
      if (q.parentRunId !== undefined) params.set("parent_run_id", checkRunId(q.parentRunId));
      return (await this._request("GET", "runs", { query: params })).runs;
    }

    async getSteps(runId) {
      return (await this._request("GET", `runs/${checkRunId(runId)}/steps`)).steps;
    }

    async getLogs(runId) {
      return (await this._request("GET", `runs/${checkRunId(runId)}/logs`)).logs;
    }

    cancel(runId) {
      return this._request("POST", `runs/${checkRunId(runId)}/cancel`);
    }

    async retrigger(runId) {
      return triggered(await this._request("POST", `runs/${checkRunId(runId)}/retrigger`));
    }

    async sendSignal(runId, name, payload, options) {
      const path = `runs/${checkRunId(runId)}/signals/${checkSignalName(name)}`;
      const o = checkOptions("options", options, ["signalId"]);
      const body = { payload: payload === undefined ? null : payload };
      // Only when given: the server checks it (a non-empty string).
      if (o.signalId !== undefined && o.signalId !== null) body.signal_id = o.signalId;
      return (await this._request("POST", path, { body })).disposition;
    }

    resumeRun(runId) {
      return this._request("POST", `runs/${checkRunId(runId)}/resume`);
    }

    async forkRun(runId, options) {
      const path = `runs/${checkRunId(runId)}/fork`;
      const o = checkOptions("options", options, ["fromStep"]);
      if (typeof o.fromStep !== "string" || o.fromStep === "") {
        throw durablyError("ValidationError", "fromStep must be a non-empty string (a recorded step's name)");
      }
      return triggered(await this._request("POST", path, { body: { from_step: o.fromStep } }));
    }

    async getStepAttempts(runId) {
      return (await this._request("GET", `runs/${checkRunId(runId)}/attempts`)).attempts;
    }

    async deleteRun(runId) {
      await this._request("DELETE", `runs/${checkRunId(runId)}`);
    }

    async purgeRuns(options) {
      const o = checkOptions("options", options, ["olderThan", "limit"]);
      if (typeof o.olderThan !== "number" || !Number.isFinite(o.olderThan) || o.olderThan < 0) {
        throw durablyError("ValidationError", "olderThan must be a non-negative number of milliseconds");
      }
      const limit = o.limit ?? null;
      if (limit !== null && !(Number.isSafeInteger(limit) && limit >= 0)) {
        throw durablyError("ValidationError", "limit must be a non-negative integer");
      }
      // The server counts in seconds, the client API in milliseconds.
      const body = await this._request("POST", "purge", { body: { older_than: o.olderThan / 1000, limit } });
      return body.purged;
    }

    async jobs() {
      return (await this._request("GET", "jobs")).jobs.map((job) => job.name);
    }

    // --- schedules ------------------------------------------------------------------------
    schedule(job, cron, options) {
      const o = checkOptions("options", options, ["input", "name", "timezone", "catchUp"]);
      const body = { job, cron, input: o.input === undefined ? null : o.input };
      if (o.name !== undefined && o.name !== null) body.name = o.name;
      if (o.timezone !== undefined && o.timezone !== null) body.timezone = o.timezone;
      if (o.catchUp !== undefined && o.catchUp !== null) body.catch_up = o.catchUp;
      return this._request("POST", "schedules", { body });
    }

    async unschedule(name) {
      await this._request("DELETE", `schedules/${checkScheduleName(name)}`);
    }

    async listSchedules() {
      return (await this._request("GET", "schedules")).schedules;
    }

    pauseSchedule(name) {
      return this._request("POST", `schedules/${checkScheduleName(name)}/pause`);
    }

    resumeSchedule(name) {
      return this._request("POST", `schedules/${checkScheduleName(name)}/resume`);
    }

    // --- run-level events: one shared GET events stream -------------------------------------
    on(type, listener) {
      if (type !== "*" && !EVENT_TYPES.includes(type)) {
        throw durablyError("ValidationError", `unknown event type ${JSON.stringify(type)}; ` +
          `expected one of ${EVENT_TYPES.join(", ")} or "*"`);
      }
      if (typeof listener !== "function") throw durablyError("ValidationError", "listener must be a function");
      if (type !== "*" && !RUN_LEVEL.has(type) && !this._warned.has(type)) {
        this._warned.add(type);
        console.warn(`durably-web remote: "${type}" events are only delivered by subscribe(runId); ` +
          "the server's run-list stream carries run:* events");
      }
      if (!this._listeners.has(type)) this._listeners.set(type, new Set());
      const listeners = this._listeners.get(type);
      listeners.add(listener);
      this._retainEvents();
      let active = true;
      return () => {
        if (!active) return;
        active = false;
        listeners.delete(listener);
        this._releaseEvents();
      };
    }

    // The stream is open while an on() listener or a waitForRun() needs it: browsers allow
    // only ~6 connections per host over HTTP/1.1, so an idle stream would cost one for nothing.
    _needsEvents() {
      let listeners = 0;
      for (const set of this._listeners.values()) listeners += set.size;
      return listeners + this._waiters.size > 0;
    }

    _retainEvents() {
      if (this._events || this._closed || !this._needsEvents()) return;
      this._events = openStream(new URL("events", this.url), [...RUN_LEVEL, "stream:reset"], (event) => {
        if (event.type === "stream:reset") {
          // We fell behind and the server ended the stream: reconnect now (onopen re-checks waiters).
          if (this._events) this._events.close();
          this._events = null;
          this._retainEvents();
          return;
        }
        for (const waiter of this._waiters) {
          if (waiter.runId === event.run_id && TERMINAL.has(event.type)) waiter.check();
        }
        for (const key of [event.type, "*"]) {
          for (const listener of [...(this._listeners.get(key) || [])]) callSafely(listener, event);
        }
      }, () => {
        // EventSource reconnects by itself; onopen then re-checks the waiters.
      }, () => {
        for (const waiter of this._waiters) waiter.check();
      });
    }

    _releaseEvents() {
      if (this._events && !this._needsEvents()) {
        this._events.close();
        this._events = null;
      }
    }

    // --- one run's events ---------------------------------------------------------------------
    subscribe(runId, listener) {
      const path = `runs/${checkRunId(runId)}/events`;
      if (listener !== undefined && typeof listener !== "function") {
        throw durablyError("ValidationError", "listener must be a function");
      }
      const seenSteps = new Set();
      let source = null;
      let done = false;
      const close = () => {
        if (done) return;
        done = true;
        if (source) source.close();
        this._runStreams.delete(close);
        queue.end();
      };
      const queue = eventQueue(close);
      const deliver = listener ? (event) => callSafely(listener, event) : (event) => queue.push(event);

      let streamed = false;
      const open = () => openStream(new URL(path, this.url),
        ["run:snapshot", "stream:reset", ...EVENT_TYPES], onEvent, onError);
      const onEvent = (event) => {
        if (done) return;
        if (event.type === "stream:reset") {
          // The server gave up on a client this far behind: start again from its current state.
          source.close();
          source = open();
          return;
        }
        streamed = true;
        // After a reconnect the server replays the recorded steps again: pass each step once.
        // A retried step fails once per attempt (live events carry `attempt`; replays do not).
        if (event.type === "step:complete" || event.type === "step:fail") {
          const key = `${event.type}:${event.step_index}:${event.attempt ?? ""}`;
          if (seenSteps.has(key)) return;
          seenSteps.add(key);
        }
        deliver(event);
        if (TERMINAL.has(event.type)) close();
      };
      // A non-200 answer (404, 401, 403) closes an EventSource for good without saying why:
      // ask the run route for the reason.
      const onError = (es) => {
        if (done || es.readyState !== EventSource.CLOSED) return; // CONNECTING: it retries
        // A run we already streamed and that is now gone was deleted (as the server says while
        // connected); a run never seen is unknown, as in the local runtime: NotFoundError.
        this.getRun(runId).then(
          () => fail(durablyError("DurablyError", `the event stream of run ${runId} was refused`)),
          (error) => (error.name === "NotFoundError" && streamed
            ? onEvent({ type: "run:delete", run_id: runId, job_name: null, timestamp: new Date().toISOString() })
            : fail(error)));
      };
      const fail = (error) => {
        if (done) return;
        if (listener) console.error(`durably-web: subscribe(${runId}) ended`, error);
        done = true;
        this._runStreams.delete(close);
        queue.end(error);
      };
      if (this._closed) {
        fail(durablyError("DurablyError", "the client is closed"));
      } else {
        source = open();
        this._runStreams.add(close);
      }
      return listener ? close : queue;
    }

    async close() {
      this._closed = true;
      if (this._events) this._events.close();
      this._events = null;
      this._listeners.clear();
      for (const close of [...this._runStreams]) close();
      for (const waiter of [...this._waiters]) waiter.fail(durablyError("DurablyError", "the client was closed"));
    }
  }

  global.DurablyWebRemote = {
    connect(url, options) {
      return new RemoteClient(url, options);
    },
  };
})(globalThis);
