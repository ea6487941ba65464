// sqlite_bridge.js: a synchronous SQLite handle for Python running in Pyodide.
//
// Runs inside a (module) Web Worker. `openSqliteBridge(options)` is async
// (loading sqlite3.wasm and installing the OPFS pool need promises); the object
// it resolves to is fully synchronous, so Python can call it through Pyodide's
// FFI without awaiting anything. The Python side of this file is
// durably_web/storage/sqlite/wasm_connection.py (WasmSqlConnection).
//
// ---------------------------------------------------------------- protocol --
//
// options = {
//   storage:     "opfs" | "idb" | "memory" | "auto"    (default "opfs")
//   filename:    "/durably.db"        absolute path inside the pool (opfs), the
//                                     database's name (idb)
//   directory:   ".durably-web"       OPFS directory owned by the pool
//   journalMode: null | "delete" | "truncate" | "persist" | "memory" | "off" | "wal"
//                null keeps SQLite's default (rollback journal, "delete").
//                "wal" is only accepted by opfs-sahpool together with
//                exclusive locking (the VFS has no shared memory), so "wal"
//                implies lockingMode "exclusive".
//   lockingMode: null | "normal" | "exclusive"
//   synchronous: null | "off" | "normal" | "full" | "extra"
//   initialCapacity: number of pool slots to reserve (default 6)
//   lockTimeoutMs: give up waiting for OPFS access handles after this (10000)
//   onWait: function({attempt, delayMs, elapsedMs, error}) called before each
//           retry while another context (usually the previous page of this
//           tab, which Chromium tears down lazily, ~2 s) still holds the
//           pool's access handles (idb: once, with reason "idb-lock", when
//           the database's Web Lock is still held).
//   idb only:
//   idbName:         IndexedDB database name (default "durably-web:" + filename)
//   bucket:          null (the site's default storage) | {name, quota, persisted}:
//                    keep the database in that Storage Bucket; persisted: true
//                    protects it from eviction, quota caps it
//   idbDurability:   "strict" (default: IDB resolves once the data is on disk)
//                    | "relaxed" (survives a page or worker crash, not an OS crash)
//   checkpointEvery: log records after which a flush writes a snapshot instead (1000)
//   checkpointBytes: ... or log bytes (4 MiB)
//   flushTimeoutMs:  abort (and report) an IDB write that has not finished
//                    after this long (30000)
// }
//
// storage "auto" resolves, in this order: "idb" if an IndexedDB database of
// this name already exists (never strand data after OPFS appears), "opfs" if
// this worker has OPFS sync access handles (FileSystemFileHandle.prototype.
// createSyncAccessHandle and a working navigator.storage.getDirectory()),
// otherwise "idb". A lock-contention failure of the OPFS pool is an error,
// never a reason to fall back (that would hide the data). info() tells
// {storage, requestedStorage, autoReason}.
//
// ------------------------------------------------------------ storage "idb" --
//
// SQLite runs in memory. Every transaction that commits becomes one redo-log
// entry {seq, tx, s: [[sql, paramsJson], ...]}: the successful statements that
// are not read-only, in order, with their parameters exactly as bound;
// BEGIN/COMMIT are implied by `tx`, a rolled-back transaction is dropped, and
// PRAGMA assignments are kept (and remembered with the snapshot) because
// connection settings such as foreign_keys change what later statements do.
// flush() appends the pending entries to IndexedDB in one transaction; when
// the log has grown past checkpointEvery/checkpointBytes a flush stores a
// serialized image of the database (sqlite3_js_db_export) and deletes the log
// it covers instead. Opening loads the image, replays the log after it and
// checkpoints. Replay requires deterministic statements: durably's SQL takes
// every time and id as a parameter (no random(), no 'now').
//
// A failed IDB transaction changes nothing in IndexedDB (it is atomic); its
// entries stay pending and the next flush retries them, so IndexedDB always
// holds a prefix of the committed history. Single writer: the bridge holds
// the Web Lock "durably-web:idb:<idbName>" while open, and every write checks
// an owner epoch (bumped by each open) inside the same IDB transaction, so an
// older writer fails loudly instead of interleaving its log with a newer one.
//
// The bridge object:
//
//   run(kind, sql, paramsJson) -> number | string | null      (synchronous)
//     kind 0  EXECUTE  one statement, stepped to completion; returns the
//                      number of rows it changed (0 for non-DML statements).
//     kind 1  ONE      one statement; returns the JSON text of the first row
//                      (see "result JSON") or undefined when there is none
//                      (undefined, not null: Pyodide maps it to None).
//     kind 2  ALL      one statement; returns the JSON text of all rows.
//     kind 3  SCRIPT   several statements, no parameters; returns 0.
//     `paramsJson` is null or the JSON text of an object mapping parameter
//     names (without the leading ':', '@' or '$') to values. A parameter the
//     SQL mentions but the object lacks is an error; extra keys are ignored
//     (the same rules as CPython's sqlite3 with a dict).
//     Prepared statements are cached per SQL text (kinds 0-2).
//     A statement that contains more than one SQL statement is an error for
//     kinds 0-2.
//
//   lastError() -> string   JSON {code, primaryCode, name, message} of the
//                            last failure; run() throws a plain Error after
//                            recording it, so the caller reads this only on
//                            the error path.
//   info()      -> string   JSON {storage, requestedStorage, autoReason, vfs,
//                            filename, journalMode, lockingMode, sqliteVersion,
//                            poolWaitMs, poolAttempts; idb: idbName, epoch,
//                            lockWaitMs, snapshotBytes, replayed, replayMs,
//                            pending, logRecords, durability}
//   inTransaction() -> bool  true when not in autocommit mode.
//   close()                  finalizes cached statements and closes the db
//                            (the pool stays installed for this worker; idb:
//                            starts a last write of pending entries, then
//                            releases the Web Lock).
//
//   idb only (Python: WasmSqlConnection.wait_durable awaits flush()):
//   flush() -> Promise       resolves once every transaction committed so far
//                            is in IndexedDB; rejects with an Error (details
//                            in flushError()) and keeps the entries pending.
//                            Commits nobody awaits are also flushed soon after
//                            they happen (write-behind, setTimeout 0).
//   checkpoint() -> Promise  flush() as one snapshot, emptying the log.
//   hasPending() -> bool     some committed transaction is not yet in IDB.
//   flushError() -> string   JSON {code, primaryCode, name, message, domName}:
//                            QuotaExceededError -> SQLITE_FULL (13), another
//                            writer -> SQLITE_BUSY (5), else SQLITE_IOERR (10).
//                            A write that times out and would not fit in the
//                            quota left (StorageManager/bucket estimate()) is
//                            a QuotaExceededError too: Chromium was seen to
//                            leave over-quota transactions in their commit
//                            phase instead of aborting them.
//
// Value encoding (both directions, JSON):
//   null, strings, booleans (params only, bound as 0/1) and numbers map
//   directly; a JS number that is integral binds/reads as INTEGER.
//   {"$f": x}     a REAL whose value is integral or non-finite
//                 (x is a number, or "inf" / "-inf" / "nan")
//   {"$i": "123"} an INTEGER outside JS's safe integer range (|n| > 2**53-1)
//   {"$b": "..."} a BLOB, base64
//
// Result JSON: {"c": [column names], "r": [[row values], ...], "x": 0|1}
//   "x" is 1 when some value uses one of the {"$…"} markers above, so the
//   Python side only walks the rows when it has to.

import sqlite3InitModule from "./sqlite-wasm/index.mjs";

const KIND_EXECUTE = 0;
const KIND_ONE = 1;
const KIND_ALL = 2;
const KIND_SCRIPT = 3;
const STATEMENT_CACHE_SIZE = 128;
const SCRATCH_MIN_BYTES = 4096;
const SCRATCH_MAX_BYTES = 1 << 20;

let sqlite3Promise = null;

/** Load (once per worker) the sqlite3 wasm module. */
export function loadSqlite3() {
  if (!sqlite3Promise) {
    sqlite3Promise = sqlite3InitModule({
      print: (...a) => console.log("[sqlite3]", ...a),
      printErr: (...a) => console.warn("[sqlite3]", ...a),
    });
  }
  return sqlite3Promise;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Errors that mean "another context still holds an access handle".
function isLockContention(e) {
  const name = e && e.name;
  return (
    name === "NoModificationAllowedError" ||
    name === "InvalidStateError" ||
    name === "NotReadableError" ||
    /access handle|locked|lock/i.test(String(e && e.message))
  );
}

const pools = new Map(); // directory -> {util, waitedMs, attempts}

/**
 * Install the opfs-sahpool VFS, retrying with exponential backoff while the
 * OPFS files are still locked by a previous page (Chromium releases the old
 * worker's SyncAccessHandles asynchronously after a reload).
 *
 * preserveOnInitFailure matters: without it a failed install calls
 * removeVfs(), which deletes the pool directory, i.e. the user's data.
 */
async function installPool(sqlite3, { directory, initialCapacity, lockTimeoutMs, onWait }) {
  const known = pools.get(directory);
  if (known) return known;
  const started = performance.now();
  let delay = 50;
  for (let attempt = 1; ; attempt++) {
    try {
      const util = await sqlite3.installOpfsSAHPoolVfs({
        name: "opfs-sahpool-" + directory.replace(/[^A-Za-z0-9_-]/g, "_"),
        directory,
        initialCapacity,
        clearOnInit: false,
        preserveOnInitFailure: true,
        forceReinitIfPreviouslyFailed: true,
      });
      await util.reserveMinimumCapacity(initialCapacity);
      const pool = { util, waitedMs: performance.now() - started, attempts: attempt };
      pools.set(directory, pool);
      return pool;
    } catch (e) {
      const elapsedMs = performance.now() - started;
      if (!isLockContention(e) || elapsedMs + delay > lockTimeoutMs) {
        const err = new Error(
          `opfs-sahpool install failed after ${attempt} attempt(s), ` +
            `${Math.round(elapsedMs)} ms: ${e && e.name}: ${e && e.message}`,
        );
        err.cause = e;
        throw err;
      }
      if (onWait) {
        try {
          onWait({ attempt, delayMs: delay, elapsedMs, error: `${e.name}: ${e.message}` });
        } catch (_) {
          /* a broken callback must not break the retry loop */
        }
      }
      await sleep(delay);
      delay = Math.min(delay * 2, 800);
    }
  }
}

// ---------------------------------------------------------------- values --

function bytesToBase64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

function base64ToBytes(b64) {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

function floatFromMarker(v) {
  if (v === "inf") return Infinity;
  if (v === "-inf") return -Infinity;
  if (v === "nan") return NaN;
  return Number(v);
}

// ---------------------------------------------------------------- bridge --

class SqliteBridge {
  constructor(sqlite3, db, meta) {
    this._sqlite3 = sqlite3;
    this._capi = sqlite3.capi;
    this._wasm = sqlite3.wasm;
    this._db = db;
    this._pDb = db.pointer;
    this._meta = meta;
    this._cache = new Map(); // sql -> {p, names}
    this._lastError = null;
    this._capi.sqlite3_extended_result_codes(this._pDb, 1);
    // The per-statement path (bind, step, reset) calls the wasm module's own exports: capi's
    // wrappers convert every argument through generic adapters and push and pop a scoped
    // allocation per call, which made binding a step's twelve parameters cost ~19 us of a
    // ~23 us insert. The exports take the same arguments when pointers are 32-bit numbers
    // (this build); otherwise capi, which accepts them too.
    this._fast = sqlite3.wasm.ptr.size === 4 ? sqlite3.wasm.exports : this._capi;
    // Text parameters are encoded into one reusable buffer and bound SQLITE_TRANSIENT (SQLite
    // copies them), instead of one allocation plus a typed-array copy per string.
    this._encoder = new TextEncoder();
    this._scratch = null; // pointer into the wasm heap, or null
    this._scratchSize = 0;
  }

  // -- public, synchronous --------------------------------------------------

  run(kind, sql, paramsJson) {
    try {
      if (kind === KIND_SCRIPT) {
        this._db.exec(sql);
        return 0;
      }
      const params = paramsJson == null ? null : JSON.parse(paramsJson);
      const entry = this._statement(sql);
      try {
        this._bind(entry, params);
        if (kind === KIND_EXECUTE) return this._execute(entry);
        return this._fetch(entry, kind === KIND_ONE);
      } finally {
        this._fast.sqlite3_reset(entry.p);
        if (entry.names.length) this._fast.sqlite3_clear_bindings(entry.p);
      }
    } catch (e) {
      throw this._recordError(e);
    }
  }

  lastError() {
    return JSON.stringify(this._lastError);
  }

  inTransaction() {
    return this._capi.sqlite3_get_autocommit(this._pDb) === 0;
  }

  info() {
    return JSON.stringify(this._meta);
  }

  /** The whole database as one SQLite file image (Uint8Array), committed state only.
   * The caller waits until no transaction is open (inTransaction() false): then the
   * image sqlite3_serialize reads through the pager holds every committed page, WAL
   * frames included. Under WAL the log is checkpointed first, so the file in OPFS
   * and the image agree. (The IndexedDB mode's database is in memory: no WAL.) */
  exportImage() {
    if (this.inTransaction()) throw new Error("exportImage() during an open transaction");
    if (String(this._db.selectValue("PRAGMA journal_mode")).toLowerCase() === "wal") {
      this._db.exec("PRAGMA wal_checkpoint(TRUNCATE)");
    }
    return this._capi.sqlite3_js_db_export(this._pDb);
  }

  /** Replace the whole database by ``source`` (an oo1.DB, e.g. from validateDatabaseImage)
   * with SQLite's backup API: one write transaction, so a failure leaves the old
   * content as it was. Nobody else may use this connection meanwhile. */
  async importImage(source) {
    if (this.inTransaction()) throw new Error("importImage() during an open transaction");
    const capi = this._capi;
    const backup = capi.sqlite3_backup_init(this._pDb, "main", source.pointer, "main");
    if (!backup) throw new Error(`cannot import: ${capi.sqlite3_errmsg(this._pDb)}`);
    const rc = capi.sqlite3_backup_step(backup, -1);
    capi.sqlite3_backup_finish(backup);
    if (rc !== capi.SQLITE_DONE) throw new Error(`cannot import: ${capi.sqlite3_js_rc_str(rc)}`);
    if (String(this._db.selectValue("PRAGMA journal_mode")).toLowerCase() === "wal") {
      this._db.exec("PRAGMA wal_checkpoint(TRUNCATE)");
    }
  }

  close() {
    for (const entry of this._cache.values()) this._capi.sqlite3_finalize(entry.p);
    this._cache.clear();
    if (this._scratch !== null) this._wasm.dealloc(this._scratch);
    this._scratch = null;
    this._scratchSize = 0;
    if (this._db) this._db.close();
    this._db = null;
    this._pDb = 0;
  }

  // -- internals -------------------------------------------------------------

  _statement(sql) {
    let entry = this._cache.get(sql);
    if (entry) return entry;
    const p = this._prepareOne(sql);
    const names = [];
    const n = this._capi.sqlite3_bind_parameter_count(p);
    for (let i = 1; i <= n; i++) {
      const name = this._capi.sqlite3_bind_parameter_name(p, i);
      names.push(name ? name.slice(1) : null);
    }
    entry = { p, names };
    if (this._cache.size >= STATEMENT_CACHE_SIZE) {
      const [oldSql, old] = this._cache.entries().next().value;
      this._capi.sqlite3_finalize(old.p);
      this._cache.delete(oldSql);
    }
    this._cache.set(sql, entry);
    return entry;
  }

  /** Prepare exactly one statement; anything but whitespace/comments after it is an error. */
  _prepareOne(sql) {
    const capi = this._capi;
    const wasm = this._wasm;
    if (!this._pDb) throw Object.assign(new Error("database is closed"), { resultCode: capi.SQLITE_MISUSE });
    const pSql = wasm.allocCString(sql);
    const stack = wasm.pstack.pointer;
    try {
      const ppStmt = wasm.pstack.allocPtr();
      const ppTail = wasm.pstack.allocPtr();
      let rc = capi.sqlite3_prepare_v2(this._pDb, pSql, -1, ppStmt, ppTail);
      if (rc) throw this._sqliteError(rc);
      const p = wasm.peekPtr(ppStmt);
      if (!p) throw Object.assign(new Error("empty SQL statement"), { resultCode: capi.SQLITE_MISUSE });
      const pTail = wasm.peekPtr(ppTail);
      if (wasm.peek8(pTail) !== 0) {
        rc = capi.sqlite3_prepare_v2(this._pDb, pTail, -1, ppStmt, null);
        const p2 = wasm.peekPtr(ppStmt);
        if (rc || p2) {
          if (p2) capi.sqlite3_finalize(p2);
          capi.sqlite3_finalize(p);
          throw Object.assign(new Error("You can only execute one statement at a time."), {
            resultCode: capi.SQLITE_MISUSE,
          });
        }
      }
      return p;
    } finally {
      wasm.pstack.restore(stack);
      wasm.dealloc(pSql);
    }
  }

  _bind(entry, params) {
    const { names, p } = entry;
    if (!names.length) return;
    const capi = this._capi;
    const fast = this._fast;
    if (params === null || typeof params !== "object") params = {};
    for (let i = 0; i < names.length; i++) {
      const name = names[i];
      if (name === null || !(name in params)) {
        throw Object.assign(new Error(`You did not supply a value for binding parameter :${name ?? "?" + (i + 1)}.`), {
          resultCode: capi.SQLITE_MISUSE,
        });
      }
      const v = params[name];
      const ndx = i + 1;
      let rc;
      switch (typeof v) {
        case "string":
          rc = this._bindText(p, ndx, v);
          break;
        case "number":
          if (!Number.isInteger(v)) rc = fast.sqlite3_bind_double(p, ndx, v);
          else if ((v | 0) === v) rc = fast.sqlite3_bind_int(p, ndx, v); // no BigInt for 32-bit values
          else rc = fast.sqlite3_bind_int64(p, ndx, BigInt(v));
          break;
        case "boolean":
          rc = fast.sqlite3_bind_int(p, ndx, v ? 1 : 0);
          break;
        case "object":
          if (v === null) rc = fast.sqlite3_bind_null(p, ndx);
          else if ("$f" in v) rc = capi.sqlite3_bind_double(p, ndx, floatFromMarker(v.$f));
          else if ("$i" in v) rc = capi.sqlite3_bind_int64(p, ndx, BigInt(v.$i));
          else if ("$b" in v) {
            const bytes = base64ToBytes(v.$b);
            rc = bytes.length ? capi.sqlite3_bind_blob(p, ndx, bytes, -1, 0) : capi.sqlite3_bind_zeroblob(p, ndx, 0);
          }
          else throw Object.assign(new Error(`unsupported parameter value for :${name}`), { resultCode: capi.SQLITE_MISUSE });
          break;
        default:
          throw Object.assign(new Error(`unsupported parameter type ${typeof v} for :${name}`), {
            resultCode: capi.SQLITE_MISUSE,
          });
      }
      if (rc) throw this._sqliteError(rc);
    }
  }

  /** Bind a JS string as TEXT: UTF-8 encoded into the scratch buffer, copied by SQLite. */
  _bindText(p, ndx, v) {
    const fast = this._fast;
    // Worst case 3 bytes per UTF-16 unit; past 1 MiB, a buffer of its own (SQLite frees it).
    const most = v.length * 3;
    if (most > SCRATCH_MAX_BYTES) {
      const [pStr, n] = this._wasm.allocCString(v, true);
      return fast.sqlite3_bind_text(p, ndx, pStr, n, this._capi.SQLITE_WASM_DEALLOC);
    }
    if (most > this._scratchSize || this._scratch === null) {
      // Also for "": a null pointer would bind NULL, not an empty text.
      const size = Math.max(most, SCRATCH_MIN_BYTES, this._scratchSize * 2);
      const next = this._wasm.alloc(size); // throws WasmAllocError when out of memory
      if (this._scratch !== null) this._wasm.dealloc(this._scratch);
      this._scratch = next;
      this._scratchSize = size;
    }
    const start = Number(this._scratch);
    // heap8u() again each time: the heap's ArrayBuffer changes when wasm memory grows.
    const { written } = this._encoder.encodeInto(v, this._wasm.heap8u().subarray(start, start + this._scratchSize));
    return fast.sqlite3_bind_text(p, ndx, this._scratch, written, this._capi.SQLITE_TRANSIENT);
  }

  _execute(entry) {
    const capi = this._capi;
    const fast = this._fast;
    const before = fast.sqlite3_total_changes(this._pDb);
    let rc;
    while ((rc = fast.sqlite3_step(entry.p)) === capi.SQLITE_ROW) {
      /* e.g. PRAGMA journal_mode=WAL or INSERT … RETURNING: drain rows */
    }
    if (rc !== capi.SQLITE_DONE) throw this._sqliteError(rc);
    return fast.sqlite3_total_changes(this._pDb) === before ? 0 : fast.sqlite3_changes(this._pDb);
  }

  _fetch(entry, onlyOne) {
    const capi = this._capi;
    const p = entry.p;
    const ncol = this._fast.sqlite3_column_count(p);
    const rows = [];
    const flag = { x: 0 };
    let rc;
    while ((rc = this._fast.sqlite3_step(p)) === capi.SQLITE_ROW) {
      const row = new Array(ncol);
      for (let i = 0; i < ncol; i++) row[i] = this._column(p, i, flag);
      rows.push(row);
      if (onlyOne) break;
    }
    if (rc !== capi.SQLITE_ROW && rc !== capi.SQLITE_DONE) throw this._sqliteError(rc);
    if (onlyOne && rows.length === 0) return undefined; // Pyodide: undefined -> None (null -> jsnull)
    const cols = new Array(ncol);
    for (let i = 0; i < ncol; i++) cols[i] = capi.sqlite3_column_name(p, i);
    return JSON.stringify({ c: cols, r: rows, x: flag.x });
  }

  _column(p, i, flag) {
    const capi = this._capi;
    const fast = this._fast;
    switch (fast.sqlite3_column_type(p, i)) {
      case capi.SQLITE_NULL:
        return null;
      case capi.SQLITE_INTEGER: {
        const v = fast.sqlite3_column_int64(p, i); // BigInt
        if (v >= Number.MIN_SAFE_INTEGER && v <= Number.MAX_SAFE_INTEGER) return Number(v);
        flag.x = 1;
        return { $i: String(v) };
      }
      case capi.SQLITE_FLOAT: {
        const v = fast.sqlite3_column_double(p, i);
        if (Number.isFinite(v) && !Number.isInteger(v)) return v;
        flag.x = 1;
        if (Number.isNaN(v)) return { $f: "nan" };
        if (!Number.isFinite(v)) return { $f: v > 0 ? "inf" : "-inf" };
        return { $f: v };
      }
      case capi.SQLITE_TEXT:
        return capi.sqlite3_column_text(p, i);
      case capi.SQLITE_BLOB: {
        const n = capi.sqlite3_column_bytes(p, i);
        const ptr = Number(capi.sqlite3_column_blob(p, i));
        flag.x = 1;
        return { $b: n ? bytesToBase64(this._wasm.heap8u().subarray(ptr, ptr + n)) : "" };
      }
      default:
        throw new Error("unknown column type");
    }
  }

  _sqliteError(rc) {
    const capi = this._capi;
    const code = this._pDb ? capi.sqlite3_extended_errcode(this._pDb) || rc : rc;
    const message = this._pDb ? capi.sqlite3_errmsg(this._pDb) : capi.sqlite3_errstr(rc);
    return Object.assign(new Error(message), { resultCode: code, sqliteMessage: message });
  }

  _recordError(e) {
    const capi = this._capi;
    let code = (e && e.resultCode) || capi.SQLITE_ERROR;
    // oo1 (used for scripts) reports the primary code; ask for the extended one.
    if (this._pDb && (code & 0xff) === code) {
      const ext = capi.sqlite3_extended_errcode(this._pDb);
      if ((ext & 0xff) === code) code = ext;
    }
    let message = (e && (e.sqliteMessage || e.message)) || String(e);
    message = message.replace(/^sqlite3 result code \d+: /, "");
    this._lastError = {
      code,
      primaryCode: code & 0xff,
      name: capi.sqlite3_js_rc_str(code) || null,
      message,
    };
    const err = new Error(`${this._lastError.name || "SQLITE_ERROR"}: ${message}`);
    err.resultCode = code;
    return err;
  }
}

// ------------------------------------------------------------- IndexedDB --
//
// storage "idb": SQLite runs in memory; every committed transaction is kept as
// a redo-log entry (its statements with their parameters) and flush() writes
// the entries to IndexedDB. Opening loads the latest snapshot (a serialized
// image of the database) and replays the log after it. See the header.

const IDB_VERSION = 1;
const LOG = "log"; // seq -> {seq, tx, s: [[sql, paramsJson], ...], p: [pragma sql, ...]}
const META = "meta"; // "owner" -> {epoch, openedAt}
const SNAPSHOT = "snapshot"; // "main" -> {seq, image, pragmas, savedAt}
const SQLITE_BUSY = 5;
const SQLITE_IOERR = 10;
const SQLITE_FULL = 13;
// sqlite3.h values; the wasm build does not export these two constants.
const SQLITE_DESERIALIZE_FREEONCLOSE = 1;
const SQLITE_DESERIALIZE_RESIZEABLE = 2;

function openIdb(factory, name) {
  return new Promise((resolve, reject) => {
    const req = factory.open(name, IDB_VERSION);
    req.onupgradeneeded = () => {
      for (const store of [LOG, META, SNAPSHOT]) {
        if (!req.result.objectStoreNames.contains(store)) req.result.createObjectStore(store);
      }
    };
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

/**
 * Run body(tx, fail) in one IDB transaction. Resolves on "complete" (with
 * durability "strict" that is after the browser flushed it to disk) and
 * rejects with the abort reason: fail(error) aborts with a reason of our own.
 * A transaction still unsettled after timeoutMs is aborted: a flush must end.
 */
function idbTransaction(idb, stores, mode, durability, body, timeoutMs = 0) {
  return new Promise((resolve, reject) => {
    let reason = null;
    let tx;
    let timer = 0;
    const fail = (error) => {
      reason ??= error;
      try {
        tx.abort();
      } catch (_) {
        /* already finished */
      }
    };
    try {
      tx = idb.transaction(stores, mode, { durability });
      body(tx, fail);
    } catch (e) {
      if (tx) fail(e);
      reject(e);
      return;
    }
    if (timeoutMs > 0) {
      // Reject by ourselves: a transaction stuck in its commit phase (seen in
      // Chromium 156 when a large write exceeds a Storage Bucket's quota)
      // ignores abort() and never fires "abort". It still commits all or nothing.
      timer = setTimeout(() => {
        const timeout = new DOMException(`IndexedDB transaction did not finish within ${timeoutMs} ms`, "TimeoutError");
        fail(timeout);
        reject(timeout);
      }, timeoutMs);
    }
    tx.oncomplete = () => {
      clearTimeout(timer);
      resolve();
    };
    tx.onabort = () => {
      clearTimeout(timer);
      reject(reason ?? tx.error ?? new DOMException("IndexedDB transaction aborted", "AbortError"));
    };
  });
}

/**
 * Hold an exclusive Web Lock for this IndexedDB database while the bridge is
 * open. After a reload the previous page's worker may hold it a moment longer;
 * wait (reporting through onWait like the OPFS pool does) up to lockTimeoutMs.
 */
async function acquireIdbLock(name, { lockTimeoutMs, onWait }) {
  if (!navigator.locks) return { release() {}, waitedMs: 0 }; // the owner epoch still fences writers
  let release;
  const held = new Promise((resolve) => (release = resolve));
  const started = performance.now();
  const got = await new Promise((resolve, reject) => {
    navigator.locks
      .request(name, { ifAvailable: true }, (lock) => {
        resolve(lock !== null);
        return lock ? held : undefined;
      })
      .catch(reject);
  });
  if (!got) {
    try {
      onWait?.({ attempt: 1, delayMs: lockTimeoutMs, elapsedMs: 0, reason: "idb-lock", error: `Web Lock ${name} is held` });
    } catch (_) {
      /* a broken callback must not break the wait */
    }
    await new Promise((resolve, reject) => {
      navigator.locks
        .request(name, { signal: AbortSignal.timeout(lockTimeoutMs) }, () => {
          resolve();
          return held;
        })
        .catch((e) =>
          reject(new Error(`IndexedDB database is in use by another context (Web Lock ${name} not free after ${lockTimeoutMs} ms): ${e.name}`)),
        );
    });
  }
  return { release, waitedMs: performance.now() - started };
}

/** Leading keyword(s) of a statement, after comments and whitespace. */
function leadingWords(sql) {
  const m = /^(?:\s+|--[^\n]*(?:\n|$)|\/\*[\s\S]*?\*\/)*(\w+)([\s\S]*)$/.exec(sql);
  return m ? [m[1].toUpperCase(), m[2]] : ["", ""];
}

class IdbSqliteBridge extends SqliteBridge {
  constructor(sqlite3, db, meta, state) {
    super(sqlite3, db, meta);
    this._idb = state.idb;
    this._epoch = state.epoch;
    this._lock = state.lock;
    this._durability = state.durability;
    this._checkpointEvery = state.checkpointEvery;
    this._checkpointBytes = state.checkpointBytes;
    this._flushTimeoutMs = state.flushTimeoutMs;
    this._estimate = state.estimate; // () => Promise<{usage, quota}> of the storage holding the database
    this._seq = state.seq; // last seq handed out (replayed or new)
    this._pragmas = new Map(); // pragma name -> its latest committed assignment
    this._txStatements = []; // statements of the open transaction
    this._txPragmas = [];
    this._txExplicit = false;
    this._pending = []; // committed groups not yet durable, oldest first
    this._logRecords = 0; // log records in IDB after the snapshot
    this._logBytes = 0;
    this._flushChain = Promise.resolve();
    this._flushScheduled = false;
    this._flushError = null;
    this._warned = null;
    this._idbClosedByBrowser = false;
    // Fires when the browser closes the connection itself (storage cleared, disk gone).
    this._idb.onclose = () => (this._idbClosedByBrowser = true);
  }

  // -- public, synchronous --------------------------------------------------

  run(kind, sql, paramsJson) {
    if (kind === KIND_SCRIPT) return this._runScript(sql);
    let ok = false;
    try {
      const result = super.run(kind, sql, paramsJson);
      ok = true;
      return result;
    } finally {
      const entry = this._cache.get(sql); // absent when preparing failed
      const cls = entry ? (entry.cls ??= this._classify(entry.p, sql)) : "read";
      this._afterStatement(cls, sql, paramsJson ?? null, ok);
    }
  }

  /** True while some committed transaction is not yet in IndexedDB. */
  hasPending() {
    return this._pending.length > 0;
  }

  /** JSON {code, primaryCode, name, message, domName} of the last failed flush. */
  flushError() {
    return JSON.stringify(this._flushError);
  }

  info() {
    return JSON.stringify({
      ...this._meta,
      epoch: this._epoch,
      pending: this._pending.length,
      logRecords: this._logRecords,
      durability: this._durability,
    });
  }

  close() {
    if (!this._db) return;
    super.close();
    // Last chance for commits nobody awaited: IDB finishes a transaction created
    // before close() even though the connection then closes.
    if (this._pending.length && !this._idbClosedByBrowser) {
      this._write(false).catch((e) => console.warn("[sqlite_bridge] final flush failed:", e));
    }
    this._idb.close();
    this._lock.release();
  }

  // -- public, asynchronous -------------------------------------------------

  /** Resolves once every transaction committed so far is in IndexedDB. */
  flush() {
    return this._enqueue(() => this._write(false));
  }

  /** The backup bypasses the redo log: persist the new content as a fresh snapshot. */
  async importImage(source) {
    await super.importImage(source);
    await this.checkpoint();
  }

  /** flush(), and replace the log by a snapshot of the whole database. */
  checkpoint() {
    return this._enqueue(() => this._write(true));
  }

  // -- redo log ---------------------------------------------------------------

  /**
   * What a statement means for the redo log:
   *   "begin" / "commit" / "rollback"   transaction control, not logged (a
   *                                     log entry is one whole transaction);
   *   "pragma"  an assignment (PRAGMA x = y): logged, and remembered, because
   *             connection settings such as foreign_keys change what later
   *             statements do and are not part of the database image;
   *   "write"   anything that is not read-only, and savepoints;
   *   "read"    the rest (SELECT, PRAGMA queries).
   */
  _classify(p, sql) {
    const [word, rest] = leadingWords(sql);
    switch (word) {
      case "BEGIN":
        return "begin";
      case "COMMIT":
      case "END":
        return "commit";
      case "ROLLBACK":
        return /\bTO\b/i.test(rest) ? "write" : "rollback";
      case "SAVEPOINT":
      case "RELEASE":
        return "write";
      case "PRAGMA":
        return rest.includes("=") ? "pragma" : "read";
      default:
        return this._capi.sqlite3_stmt_readonly(p) ? "read" : "write";
    }
  }

  _afterStatement(cls, sql, paramsJson, ok) {
    if (ok) {
      if (cls === "write" || cls === "pragma") this._txStatements.push([sql, paramsJson]);
      if (cls === "pragma") this._txPragmas.push(sql);
      if (cls === "rollback") this._dropTransaction();
    }
    if (!this._pDb) return;
    if (this._capi.sqlite3_get_autocommit(this._pDb) === 0) {
      this._txExplicit = true;
      return;
    }
    // Back in autocommit mode: the transaction (explicit or the statement's own)
    // has ended. A failure that ends it means SQLite rolled it back.
    if (ok && this._txStatements.length) this._commitGroup();
    else this._dropTransaction();
  }

  _dropTransaction() {
    this._txStatements = [];
    this._txPragmas = [];
    this._txExplicit = false;
  }

  _commitGroup() {
    const group = { seq: ++this._seq, tx: this._txExplicit, s: this._txStatements, p: this._txPragmas };
    for (const sql of group.p) this._pragmas.set(leadingWords(sql)[1].split("=")[0].trim().toLowerCase(), sql);
    this._pending.push(group);
    this._dropTransaction();
    this._scheduleFlush();
  }

  /**
   * Write-behind for commits nobody awaits (progress, log lines): flush soon
   * after the current synchronous stretch of Python. Failures are reported to
   * whoever awaits flush() next (the engine does after every step).
   */
  _scheduleFlush() {
    if (this._flushScheduled) return;
    this._flushScheduled = true;
    setTimeout(() => {
      this._flushScheduled = false;
      if (this._db) this.flush().catch(() => {});
    }, 0);
  }

  /** Scripts are run statement by statement so each one is classified and logged. */
  _runScript(sql) {
    const capi = this._capi;
    const wasm = this._wasm;
    if (!this._pDb) throw this._recordError(Object.assign(new Error("database is closed"), { resultCode: capi.SQLITE_MISUSE }));
    const pSql = wasm.allocCString(sql);
    const stack = wasm.pstack.pointer;
    try {
      const ppStmt = wasm.pstack.allocPtr();
      const ppTail = wasm.pstack.allocPtr();
      let pos = pSql;
      while (wasm.peek8(pos) !== 0) {
        const rc = capi.sqlite3_prepare_v2(this._pDb, pos, -1, ppStmt, ppTail);
        if (rc) throw this._sqliteError(rc);
        const p = wasm.peekPtr(ppStmt);
        pos = wasm.peekPtr(ppTail);
        if (!p) continue; // only whitespace or a comment was left
        const text = capi.sqlite3_sql(p);
        const cls = this._classify(p, text);
        let ok = false;
        try {
          let src;
          while ((src = capi.sqlite3_step(p)) === capi.SQLITE_ROW) {
            /* drain */
          }
          if (src !== capi.SQLITE_DONE) throw this._sqliteError(src);
          ok = true;
        } finally {
          capi.sqlite3_finalize(p);
          this._afterStatement(cls, text, null, ok);
        }
      }
      return 0;
    } catch (e) {
      throw this._recordError(e);
    } finally {
      wasm.pstack.restore(stack);
      wasm.dealloc(pSql);
    }
  }

  /** Re-execute logged transactions (at open); nothing is logged again. */
  _replay(pragmas, groups) {
    const exec = (sql, params) => SqliteBridge.prototype.run.call(this, KIND_EXECUTE, sql, params);
    for (const sql of pragmas) {
      exec(sql, null);
      this._pragmas.set(leadingWords(sql)[1].split("=")[0].trim().toLowerCase(), sql);
    }
    for (const group of groups) {
      try {
        if (group.tx) exec("BEGIN", null);
        for (const [sql, params] of group.s) exec(sql, params);
        if (group.tx) exec("COMMIT", null);
      } catch (e) {
        throw new Error(
          `cannot replay the IndexedDB redo log at entry ${group.seq} ` +
            `(the stored database is left untouched): ${e.message}`,
        );
      }
      for (const sql of group.p) this._pragmas.set(leadingWords(sql)[1].split("=")[0].trim().toLowerCase(), sql);
      this._seq = group.seq;
      this._logRecords++;
    }
  }

  // -- writing to IndexedDB ---------------------------------------------------

  _enqueue(job) {
    const next = this._flushChain.then(job);
    this._flushChain = next.catch(() => {});
    return next;
  }

  /**
   * One IDB transaction: check that we are still the owner, then either append
   * the pending groups to the log, or (checkpoint) store an image of the
   * database and delete the log it covers. The IDB transaction is atomic, so a
   * failure leaves IndexedDB exactly as it was; the groups stay pending.
   */
  _write(checkpoint) {
    const groups = this._pending.slice();
    const bytes = groups.reduce((n, g) => n + g.s.reduce((m, [sql, params]) => m + sql.length + (params?.length ?? 0), 0), 0);
    const inTx = !this._pDb || this._capi.sqlite3_get_autocommit(this._pDb) === 0 || this._txStatements.length > 0;
    if (!checkpoint && !groups.length) return Promise.resolve();
    if (!checkpoint && !inTx) {
      checkpoint =
        this._logRecords + groups.length >= this._checkpointEvery || this._logBytes + bytes >= this._checkpointBytes;
    }
    // An image taken inside a transaction would contain uncommitted changes.
    if (checkpoint && inTx) checkpoint = false;
    if (!checkpoint && !groups.length) return Promise.resolve();
    const seq = this._seq;
    const image = checkpoint ? this._capi.sqlite3_js_db_export(this._pDb) : null;
    const pragmas = [...this._pragmas.values()];
    const stores = checkpoint ? [META, LOG, SNAPSHOT] : [META, LOG];
    let written;
    try {
      if (this._idbClosedByBrowser) {
        throw new DOMException("the browser closed the IndexedDB connection (site data cleared?)", "InvalidStateError");
      }
      written = idbTransaction(this._idb, stores, "readwrite", this._durability, (tx, fail) => {
        const owner = tx.objectStore(META).get("owner");
        owner.onsuccess = () => {
          const epoch = owner.result?.epoch;
          if (epoch !== this._epoch) {
            fail(Object.assign(new Error(`another context opened this database (writer epoch ${epoch}, ours ${this._epoch}); this one no longer writes to it`), { name: "DurablyFencedError" }));
          }
        };
        const log = tx.objectStore(LOG);
        if (checkpoint) {
          tx.objectStore(SNAPSHOT).put({ seq, image, pragmas, savedAt: Date.now() }, "main");
          log.delete(IDBKeyRange.upperBound(seq));
        } else {
          for (const group of groups) log.put(group, group.seq);
        }
      }, this._flushTimeoutMs);
    } catch (e) {
      written = Promise.reject(e);
    }
    return written.then(
      () => {
        this._pending.splice(0, groups.length);
        this._flushError = null;
        if (checkpoint) {
          this._logRecords = 0;
          this._logBytes = 0;
        } else {
          this._logRecords += groups.length;
          this._logBytes += bytes;
        }
      },
      (e) =>
        this._quotaCause(e, checkpoint ? image.length : bytes).then((cause) => {
          throw this._recordFlushError(cause, groups.length);
        }),
    );
  }

  /**
   * The cause to report for a failed write of about ``bytes`` bytes. A write that
   * hung past the flush timeout and does not fit in the quota left failed for
   * want of quota: Chromium was seen to leave such a transaction in its commit
   * phase instead of aborting it with QuotaExceededError. Any other hang stays
   * a TimeoutError (SQLITE_IOERR).
   */
  async _quotaCause(e, bytes) {
    if (!e || e.name !== "TimeoutError" || !this._estimate) return e;
    try {
      const { usage, quota } = await this._estimate();
      if (typeof quota === "number" && typeof usage === "number" && usage + bytes > quota) {
        return new DOMException(
          `${e.message}: the write needs ~${bytes} bytes, and ${Math.max(0, quota - usage)} of the` +
            ` ${quota}-byte quota are left`,
          "QuotaExceededError",
        );
      }
    } catch (_) {
      /* no estimate: report the timeout as it is */
    }
    return e;
  }

  _recordFlushError(e, count) {
    const domName = (e && e.name) || "Error";
    const [code, name] =
      domName === "QuotaExceededError"
        ? [SQLITE_FULL, "SQLITE_FULL"]
        : domName === "DurablyFencedError"
          ? [SQLITE_BUSY, "SQLITE_BUSY"]
          : [SQLITE_IOERR, "SQLITE_IOERR"];
    const message =
      `IndexedDB did not store ${count} committed transaction(s): ${domName}: ${(e && e.message) || e}. ` +
      "Everything stored before is intact; these transactions stay in memory and are retried " +
      "at the next flush, but they are lost if the page closes first.";
    this._flushError = { code, primaryCode: code & 0xff, name, message, domName };
    if (this._warned !== message) {
      this._warned = message;
      console.warn("[sqlite_bridge]", message);
    }
    return Object.assign(new Error(`${name}: ${message}`), { resultCode: code, domName });
  }
}

/** Open (or create) an "idb" database: claim it, load its snapshot, replay its log. */
async function openIdbDatabase(sqlite3, options, meta) {
  const filename = options.filename ?? "/durably.db";
  const idbName = idbNameFor(options);
  const { factory, estimate } = await idbFactoryFor(options);
  const lock = await acquireIdbLock(`durably-web:idb:${options.bucket?.name ?? ""}:${idbName}`, {
    lockTimeoutMs: options.lockTimeoutMs ?? 10000,
    onWait: options.onWait,
  });
  let idb = null;
  let db = null;
  try {
    idb = await openIdb(factory, idbName);
    // One transaction: bump the writer epoch (fencing any older writer) and read
    // the snapshot and the log, so they are a consistent pair.
    const found = {};
    await idbTransaction(idb, [META, SNAPSHOT, LOG], "readwrite", "strict", (tx) => {
      const metaStore = tx.objectStore(META);
      const owner = metaStore.get("owner");
      owner.onsuccess = () => {
        found.epoch = (owner.result?.epoch ?? 0) + 1;
        metaStore.put({ epoch: found.epoch, openedAt: Date.now() }, "owner");
      };
      const snap = tx.objectStore(SNAPSHOT).get("main");
      snap.onsuccess = () => (found.snapshot = snap.result);
      const log = tx.objectStore(LOG).getAll();
      log.onsuccess = () => (found.log = log.result);
    });
    db = new sqlite3.oo1.DB(":memory:", "c");
    const snapshot = found.snapshot ?? null;
    if (snapshot && snapshot.image.length) loadImage(sqlite3, db, snapshot.image);
    const baseSeq = snapshot ? snapshot.seq : 0;
    const groups = found.log.filter((g) => g.seq > baseSeq);
    Object.assign(meta, {
      filename,
      vfs: "memory+idb",
      idbName,
      bucket: options.bucket?.name ?? null,
      journalMode: String(db.selectValue("PRAGMA journal_mode")),
      lockingMode: String(db.selectValue("PRAGMA locking_mode")),
      lockWaitMs: Math.round(lock.waitedMs),
      snapshotBytes: snapshot ? snapshot.image.length : 0,
      replayed: groups.length,
    });
    const bridge = new IdbSqliteBridge(sqlite3, db, meta, {
      idb,
      epoch: found.epoch,
      lock,
      seq: baseSeq,
      durability: options.idbDurability ?? "strict",
      checkpointEvery: options.checkpointEvery ?? 1000,
      checkpointBytes: options.checkpointBytes ?? 4 * 1024 * 1024,
      flushTimeoutMs: options.flushTimeoutMs ?? 30000,
      estimate,
    });
    const t0 = performance.now();
    bridge._replay(snapshot ? snapshot.pragmas : [], groups);
    meta.replayMs = Math.round(performance.now() - t0);
    // Start from a compact state: one image, empty log. Best effort: with a
    // full disk the log simply stays, and the database must still open.
    if (groups.length) await bridge.checkpoint().catch((e) => (meta.checkpointError = String(e.message)));
    return bridge;
  } catch (e) {
    if (db && db.pointer) db.close();
    idb?.close();
    lock.release();
    throw e;
  }
}

/**
 * The IndexedDB factory: the page's default storage, or a Storage Bucket
 * (navigator.storageBuckets) when options.bucket = {name, quota?, persisted?}.
 * A bucket keeps durably's data apart from the rest of the site's: with
 * persisted: true the browser does not evict it under storage pressure, and a
 * quota caps it (writes beyond it fail with QuotaExceededError).
 * Returns {factory, estimate}: the IDBFactory and a () => Promise<{usage, quota}>
 * of that storage (null where the browser has no StorageManager).
 */
async function idbFactoryFor(options) {
  const bucket = options.bucket;
  if (!bucket) return { factory: indexedDB, estimate: navigator.storage?.estimate ? () => navigator.storage.estimate() : null };
  if (!navigator.storageBuckets) throw new Error("options.bucket needs the Storage Buckets API (navigator.storageBuckets)");
  const policy = { durability: "strict" };
  if (bucket.quota != null) policy.quota = bucket.quota;
  if (bucket.persisted != null) policy.persisted = bucket.persisted;
  const opened = await navigator.storageBuckets.open(bucket.name, policy);
  return { factory: opened.indexedDB, estimate: () => opened.estimate() };
}

function idbNameFor(options) {
  return options.idbName ?? "durably-web:" + (options.filename ?? "/durably.db");
}

function loadImage(sqlite3, db, image) {
  const { capi, wasm } = sqlite3;
  const bytes = image instanceof Uint8Array ? image : new Uint8Array(image);
  const p = wasm.alloc(bytes.length); // sqlite3_malloc, so SQLite may free/resize it
  wasm.heap8u().set(bytes, Number(p));
  const rc = capi.sqlite3_deserialize(
    db.pointer,
    "main",
    p,
    bytes.length,
    bytes.length,
    SQLITE_DESERIALIZE_FREEONCLOSE | SQLITE_DESERIALIZE_RESIZEABLE,
  );
  if (rc) throw new Error(`cannot load the IndexedDB snapshot: ${capi.sqlite3_js_rc_str(rc)}`);
}

/** Open ``bytes`` as an in-memory SQLite database and check that it is durably-web's:
 * a SQLite file that passes integrity_check and has the durably_migrations and
 * durably_runs tables. Returns {db, schemaVersion}; the caller closes db. Throws
 * with a reason otherwise. */
export async function validateDatabaseImage(bytes) {
  const data = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  const magic = "SQLite format 3\u0000";
  if (data.length < 100 || String.fromCharCode(...data.subarray(0, 16)) !== magic) {
    throw new Error("not a SQLite database file");
  }
  const sqlite3 = await loadSqlite3();
  const db = new sqlite3.oo1.DB(":memory:", "c");
  try {
    const copy = data.slice();
    // A file written in WAL mode says so in bytes 18-19; an in-memory database cannot
    // open WAL, and the content (checkpointed by exportImage) is the same: mark it rollback.
    if (copy[18] === 2 && copy[19] === 2) copy[18] = copy[19] = 1;
    loadImage(sqlite3, db, copy);
    const check = db.selectValue("PRAGMA integrity_check");
    if (check !== "ok") throw new Error(`the database is damaged (integrity_check: ${check})`);
    const tables = db.selectValues("SELECT name FROM sqlite_master WHERE type = 'table'");
    for (const name of ["durably_migrations", "durably_runs"]) {
      if (!tables.includes(name)) throw new Error(`not a durably-web database (no table ${name})`);
    }
    return { db, schemaVersion: db.selectValue("SELECT MAX(version) FROM durably_migrations") };
  } catch (e) {
    db.close();
    throw e;
  }
}

// ------------------------------------------------------------------ auto --

/** True when this worker can use OPFS synchronous access handles (opfs-sahpool's need). */
async function opfsSyncHandlesAvailable() {
  if (typeof FileSystemFileHandle !== "function") return false;
  if (typeof FileSystemFileHandle.prototype.createSyncAccessHandle !== "function") return false;
  if (typeof navigator.storage?.getDirectory !== "function") return false;
  try {
    await navigator.storage.getDirectory(); // SecurityError in some private modes
    return true;
  } catch (_) {
    return false;
  }
}

async function idbDatabaseExists(options) {
  const name = idbNameFor(options);
  try {
    const { factory } = await idbFactoryFor(options);
    if (typeof factory?.databases !== "function") return false;
    return (await factory.databases()).some((d) => d.name === name);
  } catch (_) {
    return false;
  }
}

/** "auto": keep using an existing IndexedDB copy; else OPFS when possible; else IndexedDB. */
async function resolveAutoStorage(options) {
  if (await idbDatabaseExists(options)) return ["idb", "an IndexedDB copy of this database exists"];
  if (await opfsSyncHandlesAvailable()) return ["opfs", "OPFS sync access handles are available"];
  return ["idb", "OPFS sync access handles are unavailable"];
}

function pragmaValue(kind, value, allowed) {
  const v = String(value).toLowerCase();
  if (!allowed.includes(v)) throw new Error(`unsupported ${kind}: ${value}`);
  return v;
}

/** Open a database and return a synchronous SqliteBridge (see protocol above). */
export async function openSqliteBridge(options = {}) {
  const requested = options.storage ?? "opfs";
  let storage = requested;
  let autoReason = null;
  if (requested === "auto") [storage, autoReason] = await resolveAutoStorage(options);
  const sqlite3 = await loadSqlite3();
  let db;
  const meta = {
    storage,
    requestedStorage: requested,
    autoReason,
    vfs: null,
    filename: null,
    journalMode: null,
    lockingMode: null,
    sqliteVersion: sqlite3.version.libVersion,
    poolWaitMs: 0,
    poolAttempts: 0,
  };
  if (storage === "memory") {
    db = new sqlite3.oo1.DB(":memory:", "c");
    meta.filename = ":memory:";
    meta.vfs = "memory";
  } else if (storage === "opfs") {
    const pool = await installPool(sqlite3, {
      directory: options.directory ?? ".durably-web",
      initialCapacity: options.initialCapacity ?? 6,
      lockTimeoutMs: options.lockTimeoutMs ?? 10000,
      onWait: options.onWait,
    });
    const filename = options.filename ?? "/durably.db";
    if (!filename.startsWith("/")) throw new Error("opfs-sahpool needs an absolute filename (\"/name.db\")");
    db = new pool.util.OpfsSAHPoolDb(filename);
    meta.filename = filename;
    meta.vfs = pool.util.vfsName;
    meta.poolWaitMs = Math.round(pool.waitedMs);
    meta.poolAttempts = pool.attempts;
  } else if (storage === "idb") {
    // journalMode / lockingMode / synchronous do not apply: the database is in memory.
    return openIdbDatabase(sqlite3, options, meta);
  } else {
    throw new Error(`unknown storage ${JSON.stringify(storage)} (use "auto", "opfs", "idb" or "memory")`);
  }
  try {
    let journalMode = options.journalMode ?? null;
    let lockingMode = options.lockingMode ?? null;
    if (journalMode && journalMode.toLowerCase() === "wal" && storage === "opfs") lockingMode = "exclusive";
    if (lockingMode) {
      lockingMode = pragmaValue("locking mode", lockingMode, ["normal", "exclusive"]);
      db.exec(`PRAGMA locking_mode=${lockingMode}`);
    }
    if (journalMode) {
      journalMode = pragmaValue("journal mode", journalMode, ["delete", "truncate", "persist", "memory", "wal", "off"]);
      const got = db.selectValue(`PRAGMA journal_mode=${journalMode}`);
      if (String(got).toLowerCase() !== journalMode) {
        throw new Error(`journal_mode=${journalMode} was refused (SQLite kept ${got})`);
      }
    }
    if (options.synchronous) {
      const s = pragmaValue("synchronous", options.synchronous, ["off", "normal", "full", "extra"]);
      db.exec(`PRAGMA synchronous=${s}`);
    }
    meta.journalMode = String(db.selectValue("PRAGMA journal_mode"));
    meta.lockingMode = String(db.selectValue("PRAGMA locking_mode"));
  } catch (e) {
    db.close();
    throw e;
  }
  return new SqliteBridge(sqlite3, db, meta);
}
