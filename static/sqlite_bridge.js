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
//   storage:     "opfs" | "memory"    (default "opfs")
//   filename:    "/durably.db"        absolute path inside the pool (opfs only)
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
//           pool's access handles.
// }
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
//   info()      -> string   JSON {storage, vfs, filename, journalMode,
//                            lockingMode, sqliteVersion, poolWaitMs, poolAttempts}
//   inTransaction() -> bool  true when not in autocommit mode.
//   close()                  finalizes cached statements and closes the db
//                            (the pool stays installed for this worker).
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
        this._capi.sqlite3_reset(entry.p);
        if (entry.names.length) this._capi.sqlite3_clear_bindings(entry.p);
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

  close() {
    for (const entry of this._cache.values()) this._capi.sqlite3_finalize(entry.p);
    this._cache.clear();
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
        case "string": {
          // Allocate the C string ourselves: capi.sqlite3_bind_text() with a JS
          // string hits a ReferenceError (`pMem`) in sqlite-wasm 3.54.1.
          const [pStr, n] = this._wasm.allocCString(v, true);
          rc = capi.sqlite3_bind_text(p, ndx, pStr, n, capi.SQLITE_WASM_DEALLOC);
          break;
        }
        case "number":
          rc = Number.isInteger(v) ? capi.sqlite3_bind_int64(p, ndx, BigInt(v)) : capi.sqlite3_bind_double(p, ndx, v);
          break;
        case "boolean":
          rc = capi.sqlite3_bind_int(p, ndx, v ? 1 : 0);
          break;
        case "object":
          if (v === null) rc = capi.sqlite3_bind_null(p, ndx);
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

  _execute(entry) {
    const capi = this._capi;
    const before = capi.sqlite3_total_changes(this._pDb);
    let rc;
    while ((rc = capi.sqlite3_step(entry.p)) === capi.SQLITE_ROW) {
      /* e.g. PRAGMA journal_mode=WAL or INSERT … RETURNING: drain rows */
    }
    if (rc !== capi.SQLITE_DONE) throw this._sqliteError(rc);
    return capi.sqlite3_total_changes(this._pDb) === before ? 0 : capi.sqlite3_changes(this._pDb);
  }

  _fetch(entry, onlyOne) {
    const capi = this._capi;
    const p = entry.p;
    const ncol = capi.sqlite3_column_count(p);
    const rows = [];
    const flag = { x: 0 };
    let rc;
    while ((rc = capi.sqlite3_step(p)) === capi.SQLITE_ROW) {
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
    switch (capi.sqlite3_column_type(p, i)) {
      case capi.SQLITE_NULL:
        return null;
      case capi.SQLITE_INTEGER: {
        const v = capi.sqlite3_column_int64(p, i); // BigInt
        if (v >= Number.MIN_SAFE_INTEGER && v <= Number.MAX_SAFE_INTEGER) return Number(v);
        flag.x = 1;
        return { $i: String(v) };
      }
      case capi.SQLITE_FLOAT: {
        const v = capi.sqlite3_column_double(p, i);
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

function pragmaValue(kind, value, allowed) {
  const v = String(value).toLowerCase();
  if (!allowed.includes(v)) throw new Error(`unsupported ${kind}: ${value}`);
  return v;
}

/** Open a database and return a synchronous SqliteBridge (see protocol above). */
export async function openSqliteBridge(options = {}) {
  const storage = options.storage ?? "opfs";
  const sqlite3 = await loadSqlite3();
  let db;
  const meta = {
    storage,
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
  } else {
    throw new Error(`unknown storage ${JSON.stringify(storage)} (use "opfs" or "memory")`);
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
