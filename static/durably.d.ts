// Type declarations for durably-web's JavaScript API (static/durably.js, static/durably.mjs).
//
// One API, two runtimes: DurablyWeb.create() runs the Python jobs in this
// browser (Pyodide in a Web Worker, SQLite in OPFS / IndexedDB / memory);
// DurablyWeb.connect() talks to a CPython server (durably_web.asgi). Data
// objects keep the Python field names (snake_case), exactly as the HTTP API
// returns them. Times are ISO 8601 strings; durations in options are
// milliseconds.

export type RunStatus = "pending" | "leased" | "waiting" | "completed" | "failed" | "cancelled";
export type Disposition = "created" | "idempotent" | "coalesced" | "debounced";
/**
 * Why a run is "waiting": backing off before a step's retry, in step.sleep/sleep_until, in
 * wait_for_signal, or "offline": the browser is offline and a step needs the network
 * (step.run(..., needs_network=True), or a step that failed with a network error while
 * offline, which used up no retry). An offline run continues when the browser is back
 * online; its wake_at is only when it is checked again at the latest (offlineRecheckInterval).
 * "child": in step.wait_for_child, until the child run wait_child_id ends.
 */
export type WaitReason = "retry" | "sleep" | "signal" | "offline" | "child";
/**
 * What sendSignal() did: "delivered" (the run was waiting for it and continues now),
 * "stored" (kept until the run reaches that wait_for_signal) or "duplicate" (this
 * signalId was sent to the run before: nothing changed).
 */
export type SignalDisposition = "delivered" | "stored" | "duplicate";

export interface ErrorInfo {
  type: string;
  message: string;
  traceback: string;
}

export interface Progress {
  current: number;
  total: number | null;
  message: string | null;
}

export interface Run {
  id: string;
  job_name: string;
  status: RunStatus;
  input: unknown;
  output: unknown;
  error: ErrorInfo | null;
  labels: Record<string, string>;
  progress: Progress | null;
  attempt: number;
  idempotency_key: string | null;
  concurrency_key: string | null;
  created_at: string | null;
  started_at: string | null;
  completed_at: string | null;
  updated_at: string | null;
  /** Set only on the value trigger() (and forkRun(): "created") returns. */
  disposition: Disposition | null;
  /** While status is "waiting": when it continues (null for a signal wait without timeout). */
  wake_at: string | null;
  /** While status is "waiting": why. */
  wait_reason: WaitReason | null;
  /** While status is "waiting": the step (retry), sleep or signal wait it waits at. */
  wait_step: string | null;
  /** forkRun(): the id of the run this one was forked from. */
  forked_from: string | null;
  /** trigger({priority}): claimed before runs of lower priority, then oldest first. */
  priority: number;
  /** While status is "pending": the earliest start (a debounced job's run), else null. */
  not_before: string | null;
  /** A child run (step.start_child): the id of the run that started it. */
  parent_run_id: string | null;
  /** While waiting with wait_reason "child": the child run it waits for. */
  wait_child_id: string | null;
  /** When the run fails with a RunTimeoutError if it has not ended (the job's or trigger's timeout). */
  deadline_at: string | null;
  /** The job version that started the run (define_job(version=), else a hash of the handler's code). */
  version: string | null;
  /** Tracing: the W3C traceparent the trigger carried (the parent of the run's spans), else null. */
  trace_parent: string | null;
}

/**
 * A run as a remote client's getRuns() and its run-list events (`event.run`) give it: the
 * server sends summaries, without input, output or traceback, so that a list of large runs
 * stays small. getRun(id) returns the whole Run. (The local runtime's getRuns() returns
 * whole runs, which are also RunSummary-compatible apart from the two sizes.)
 */
export interface RunSummary {
  id: string;
  job_name: string;
  status: RunStatus;
  /** Type and message only. */
  error: { type: string; message: string } | null;
  labels: Record<string, string>;
  progress: Progress | null;
  attempt: number;
  idempotency_key: string | null;
  concurrency_key: string | null;
  created_at: string | null;
  started_at: string | null;
  completed_at: string | null;
  updated_at: string | null;
  /** As on Run (the server's summaries carry them too). */
  wake_at: string | null;
  wait_reason: WaitReason | null;
  wait_step: string | null;
  forked_from: string | null;
  priority: number;
  parent_run_id: string | null;
  wait_child_id: string | null;
  deadline_at: string | null;
  version: string | null;
  /** Size of the stored input JSON in bytes (UTF-8); remote only. */
  input_bytes?: number;
  /** Size of the stored output JSON in bytes, null until there is one; remote only. */
  output_bytes?: number | null;
}

export interface Step {
  run_id: string;
  index: number;
  name: string;
  /**
   * "run" (step.run), "sleep" (step.sleep / sleep_until; output: its due time in ms since
   * the epoch), "signal" (wait_for_signal; output: {payload} or {timeout: true}), "child"
   * (start_child; output: the child's handle {run_id, job_name}) or "child_wait"
   * (wait_for_child; output: {output}, the child's output).
   */
  kind: "run" | "sleep" | "signal" | "child" | "child_wait";
  status: "completed" | "failed";
  output: unknown;
  error: ErrorInfo | null;
  started_at: string;
  completed_at: string;
  duration_ms: number;
}

/**
 * One attempt of one step.run step (getStepAttempts()): every retried failure, and the
 * attempt that ended the step (completed, or failed for good). `attempt` counts from 1.
 */
export interface StepAttempt {
  run_id: string;
  index: number;
  name: string;
  attempt: number;
  status: "completed" | "failed";
  error: ErrorInfo | null;
  started_at: string;
  completed_at: string;
  duration_ms: number;
  /** The attempt failed with a network error while the browser was offline: it used up no retry. */
  offline: boolean;
  /**
   * The JSON object the step attached to this attempt (Python: `step.attempt.set_metadata({...})`,
   * e.g. an LLM call's model and token counts), or null. Kept when step outputs are dropped.
   */
  metadata: Record<string, unknown> | null;
}

export interface LogEntry {
  run_id: string;
  step_name: string | null;
  level: "debug" | "info" | "warning" | "error";
  message: string;
  data: unknown;
  created_at: string;
}

export type EventType =
  | "run:trigger" | "run:coalesced" | "run:leased" | "run:complete" | "run:fail"
  | "run:cancel" | "run:delete" | "run:progress" | "run:waiting" | "run:resume"
  | "step:start" | "step:complete" | "step:fail" | "step:retry" | "signal:received"
  | "log:write" | "worker:error";

/**
 * An event: the common fields plus the type's own data (e.g. `progress`, `step_name`, `output`, `error`).
 * Durable waiting adds: run:waiting {reason: WaitReason, step_name, due_at: string | null};
 * run:resume {attempt, previous_status}; step:start {attempt}; step:fail of a retried
 * failure {attempt, will_retry: true}, also `offline: true` when it failed for want of the network; step:retry {step_name, step_index, attempt,
 * next_attempt, delay (seconds), error}; signal:received {name, signal_id, disposition}.
 * Child runs add: run:waiting {child_run_id} for a wait_for_child; run:trigger {parent_run_id}
 * for a run started by step.start_child (from the worker that started it).
 * run:waiting is not terminal: subscribe() goes on until the run ends.
 */
export interface DurablyEvent {
  type: EventType;
  run_id: string | null;
  job_name: string | null;
  timestamp: string;
  [key: string]: unknown;
}

/** The page-only event of create({offline: true}): `version` is the newer build's. */
export interface UpdateReadyEvent {
  type: "update:ready";
  run_id: null;
  job_name: null;
  timestamp: string;
  version: string;
}

/** Rejections are Errors whose `name` is the Python error class name. */
export interface DurablyError extends Error {
  name:
    | "DurablyError" | "ValidationError" | "NotFoundError" | "ConflictError" | "CancelledError"
    | "LeaseLostError" | "StepError" | "StorageError" | "WaitTimeoutError" | "SchemaVersionError"
    | "RunTimeoutError" | "VersionMismatchError";
  /** pydantic's error details for ValidationError, otherwise null. */
  details: unknown[] | null;
}

export interface TriggerOptions {
  idempotencyKey?: string;
  concurrencyKey?: string;
  coalesce?: "skip";
  labels?: Record<string, string>;
  /** An integer (default 0): runs of higher priority are claimed first, then the oldest. */
  priority?: number;
  /**
   * Milliseconds: the run's deadline, counted from now, waits included (overrides the job's
   * timeout). Past it the run fails with a RunTimeoutError (see Run.deadline_at).
   */
  timeout?: number;
}

export interface TriggerAndWaitOptions extends Omit<TriggerOptions, "timeout"> {
  /** Milliseconds this call waits; rejects with a WaitTimeoutError when exceeded (the run goes on). */
  timeout?: number;
  /** Milliseconds: the run's own deadline (trigger()'s timeout option). */
  runTimeout?: number;
}

export interface WaitOptions {
  /** Milliseconds; rejects with a WaitTimeoutError when exceeded. */
  timeout?: number;
}

export interface RunQuery {
  status?: RunStatus | RunStatus[];
  jobName?: string | string[];
  labels?: Record<string, string>;
  limit?: number;
  offset?: number;
  /** Only the child runs this run started (step.start_child). */
  parentRunId?: string;
  /** The job version(s) that started the runs (with the unfinished statuses: what is in flight). */
  version?: string | string[];
}

/**
 * A cron schedule (see Durably.schedule): each tick of `cron`, read in `timezone`, creates
 * one run of `job_name` with `input`, exactly once across all workers; the runs carry the
 * labels "durably:schedule" (the name) and "durably:tick" (the tick, ISO UTC).
 */
export interface Schedule {
  name: string;
  job_name: string;
  cron: string;
  timezone: string;
  input: unknown;
  /** Ticks missed while no worker ran: one run ("latest") or one each ("all", at most 100). */
  catch_up: "latest" | "all";
  paused: boolean;
  next_tick_at: string;
  last_tick_at: string | null;
  last_run_id: string | null;
  created_at: string;
  updated_at: string;
}

export interface ScheduleOptions {
  input?: unknown;
  /** Default: the job's name. */
  name?: string;
  /** An IANA zone such as "Europe/Oslo" (default "UTC"); in the browser worker, other zones
   *  need the zone data: create({packages: ["tzdata"]}). */
  timezone?: string;
  catchUp?: "latest" | "all";
}

export interface DurablyClient {
  trigger(job: string, input?: unknown, options?: TriggerOptions): Promise<Run>;
  triggerAndWait(job: string, input?: unknown, options?: TriggerAndWaitOptions): Promise<Run>;
  batchTrigger(job: string, items: Array<unknown | { input: unknown; options?: TriggerOptions }>): Promise<Run[]>;
  waitForRun(runId: string, options?: WaitOptions): Promise<Run>;
  getRun(runId: string): Promise<Run>;
  /** Newest first. Remote clients get summaries (no input/output): getRun(id) for the whole run. */
  getRuns(query?: RunQuery): Promise<Run[] | RunSummary[]>;
  getSteps(runId: string): Promise<Step[]>;
  /** Every attempt of every step.run step, by step position then attempt number. */
  getStepAttempts(runId: string): Promise<StepAttempt[]>;
  getLogs(runId: string): Promise<LogEntry[]>;
  /** Cancels the run and its child runs that have not ended (and theirs). */
  cancel(runId: string): Promise<Run>;
  /**
   * Send the signal `name` with `payload` (JSON) to a run's wait_for_signal(name). A run that
   * is waiting for it continues at once. `signalId` makes it idempotent: the same id sent to
   * the same run again answers "duplicate". Rejects with NotFoundError (unknown run),
   * ConflictError (the run has finished) or ValidationError (a payload that fails the
   * signal's declared type).
   */
  sendSignal(runId: string, name: string, payload?: unknown, options?: { signalId?: string }): Promise<SignalDisposition>;
  /**
   * Continue a failed or cancelled run after its last completed step: it goes back to
   * "pending" (the step that failed runs again with a fresh retry budget). ConflictError
   * for any other status.
   */
  resumeRun(runId: string): Promise<Run>;
  /**
   * A new run of the same job, input and labels holding copies of the source's completed
   * steps recorded before `fromStep`: those replay, `fromStep` and everything after it run
   * again. Resolves to the new run (disposition "created", forked_from the source's id);
   * NotFoundError when `fromStep` names no recorded step.
   */
  forkRun(runId: string, options: { fromStep: string }): Promise<Run>;
  retrigger(runId: string): Promise<Run>;
  /** Rejects with ConflictError while the run is leased or one of its child runs is active. */
  deleteRun(runId: string): Promise<void>;
  /** Deletes finished runs that ended more than `olderThan` ms ago; resolves to how many. */
  purgeRuns(options: { olderThan: number; limit?: number }): Promise<number>;
  /** Names of the registered jobs. */
  jobs(): Promise<string[]>;
  /**
   * Create or replace a schedule: each tick of `cron` creates a run of `job`. Replacing keeps
   * whether it is paused, and its next tick unless cron or timezone changed. ValidationError
   * for an invalid cron expression, unknown time zone or input the job refuses.
   */
  schedule(job: string, cron: string, options?: ScheduleOptions): Promise<Schedule>;
  /** Delete a schedule (its runs stay); NotFoundError. */
  unschedule(name: string): Promise<void>;
  /** Every schedule, by name. */
  listSchedules(): Promise<Schedule[]>;
  pauseSchedule(name: string): Promise<Schedule>;
  /** Runs again from the next tick after now (ticks missed while paused are skipped). */
  resumeSchedule(name: string): Promise<Schedule>;
  /** Listen to one event type, or "*" for all; returns the unsubscribe function. */
  on(type: EventType | "*", listener: (event: DurablyEvent) => void): () => void;
  /** With offline: true, a newer build is cached and the next load will use it (page-only event). */
  on(type: "update:ready", listener: (event: UpdateReadyEvent) => void): () => void;
  /** One run's events, ending after its terminal event (run:complete/fail/cancel/delete). */
  subscribe(runId: string): AsyncIterableIterator<DurablyEvent>;
  subscribe(runId: string, listener: (event: DurablyEvent) => void): () => void;
  /** Stop the worker (local) or the event streams (remote). */
  close(): Promise<void>;
  /** "local" (Pyodide in this browser) or "remote" (HTTP). */
  readonly kind: "local" | "remote";
}

export type Storage = "auto" | "opfs" | "idb" | "memory";

export interface StatusUpdate {
  /**
   * In order: "loading-python", "loading-jobs", then either "opening-database"
   * ("waiting-for-storage" while the previous page still holds the files),
   * "leader" (detail.takeover: true when this tab took over from a closed one)
   * or "follower"; then "ready". A follower later reports "opening-database",
   * "leader" when it takes over. The "ready" detail is {role, phases}: when each start phase
   * ended (ms, performance.timeOrigin + now) and phases.snapshot ("made" | "restored" |
   * "failed", absent without Cache Storage), for benchmarks.
   */
  state: string;
  detail?: unknown;
}

export interface CreateOptions {
  /** URLs (relative to the page) of Python job modules; the same files run under CPython. */
  jobs: string[];
  /** Database name (one per origin + name). Default "durably.db". */
  database?: string;
  /** Default "auto": OPFS when sync access handles exist in workers, else IndexedDB. */
  storage?: Storage;
  /** Durably options in milliseconds / counts. */
  options?: {
    pollingInterval?: number;
    leaseDuration?: number;
    leaseRenewInterval?: number;
    maxConcurrentRuns?: number;
    retainRuns?: number;
    preserveSteps?: boolean;
    shutdownTimeout?: number;
    /** How often a run waiting for the network is checked again if no "online" event came. Default 30000. */
    offlineRecheckInterval?: number;
  };
  /** Folder holding worker.js, Pyodide and the wheels. Default: the folder of durably.js. */
  baseUrl?: string;
  /** Loading / leadership / storage-wait progress, e.g. to show "waiting for the previous page". */
  onStatus?: (status: StatusUpdate) => void;
  /**
   * Pure-Python packages the job modules import, e.g. ["python-dateutil"]. Only wheels
   * build.py bundled into the site (browser-wheels.json, group "packages"; listed in
   * site/packages.json) can be named; they load from the site with their dependencies,
   * never from an index or CDN. Any other name rejects create() with a ValidationError
   * naming it (details.packages) and saying how to bundle it.
   */
  packages?: string[];
  /**
   * Ask the browser to keep this origin's storage (navigator.storage.persist(), from the
   * page). Default: true when `offline` is true, else false. The answer is in storageInfo().
   */
  persist?: boolean;
  /**
   * Register the service worker the build ships (service_worker.js, beside durably.js):
   * it precaches the whole runtime under a cache named after the build's content hash,
   * verified file by file, and the page's own files network-first, so after one visit
   * the app loads and runs with the server gone. A page keeps the version it loaded with;
   * when a newer build's cache is complete, on("update:ready") fires and the next load
   * uses it. A page outside durably.js's folder needs the Service-Worker-Allowed header.
   */
  offline?: boolean;
}

export interface StorageInfo extends Record<string, unknown> {
  /** navigator.storage.persisted(): whether the browser promised not to evict the data. */
  persisted: boolean;
  /** navigator.storage.estimate() in bytes (null where the Storage API is missing). */
  estimate: { usage: number | null; quota: number | null } | null;
}

export interface LocalClient extends DurablyClient {
  readonly kind: "local";
  /** "leader" executes runs in this tab; "follower" forwards to the leader tab. Updated on takeover. */
  readonly role: "leader" | "follower";
  readonly storage: Exclude<Storage, "auto">;
  /** `PRAGMA integrity_check` of the database (run by the leader): "ok" when healthy. */
  integrityCheck(): Promise<string>;
  /** What the storage bridge opened: storage, vfs, filename, journalMode, lockingMode, sqliteVersion, …
   * plus persisted and estimate (answered by the page). */
  storageInfo(): Promise<StorageInfo>;
  /** The database file (type application/vnd.sqlite3): a consistent snapshot of committed
   * state, WAL included, taken by the leader tab. Keep it before the browser evicts the data. */
  exportDatabase(): Promise<Blob>;
  /**
   * Replace the whole database by a file exportDatabase() made. The bytes are checked first
   * (a SQLite file, integrity_check "ok", durably-web's tables): otherwise ValidationError and
   * nothing changes. Then the leader stops (handlers stop, leases released), copies the file in
   * with SQLite's backup API (all or nothing) and starts again; runs of the imported file resume.
   * The current runs are replaced, not merged. If the copy fails the runtime restarts on the old
   * data and the call rejects with ConflictError. Other calls wait meanwhile.
   */
  importDatabase(data: Blob | ArrayBuffer | Uint8Array): Promise<void>;
}

export interface ConnectOptions {
  /** Extra headers for fetch (EventSource cannot send headers; use query parameters for SSE auth). */
  headers?: Record<string, string>;
}

export declare const DurablyWeb: {
  create(options: CreateOptions): Promise<LocalClient>;
  connect(url: string, options?: ConnectOptions): DurablyClient;
  readonly version: string;
};

export default DurablyWeb;
