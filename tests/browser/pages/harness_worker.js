// harness_worker.js: a bare Pyodide + SQLite-bridge worker for tests and benchmarks.
// A test page: it lives in tests/browser/pages/, served under /_test/ next to the
// built site/, never shipped in the wheel or site/.
//
// The runtime's own worker is worker.js; this one runs arbitrary Python sent by
// harness.html, so tests can drive the bridge and the store below the JS API.
//
// Everything is loaded from the folder above this worker's (the built site/): no CDN.
//
// Messages in (from the page), each with a numeric `id`:
//   {id, cmd: "init", packages: ["durably-web", ...]}
//       load Pyodide and the packages (resolved through site/pyodide-lock.json);
//       replies with timings {pyodideMs, packagesMs, workerStartToReadyMs}.
//   {id, cmd: "run", code: "python source"}
//       runPythonAsync(code) (top-level await allowed); replies with the value
//       of the last expression, which should be a str/number/bool/None
//       (return json.dumps(...) for anything richer).
// Messages out:
//   {id, ok: true, result} | {id, ok: false, error}
//   {type: "status", event: "opfs-wait", attempt, delayMs, elapsedMs, error}
//       while the OPFS pool waits for a previous page to let go of its files.
//
// Python reaches SQLite through globalThis.openSqliteBridge (see
// sqlite_bridge.js and durably_web/storage/sqlite/wasm_connection.py).

import { loadPyodide } from "../pyodide.mjs";
import { openSqliteBridge } from "../sqlite_bridge.js";

const workerStart = performance.now();
let pyodide = null;

globalThis.openSqliteBridge = (options = {}) => {
  const pyOnWait = options.onWait;
  return openSqliteBridge({
    ...options,
    onWait(info) {
      self.postMessage({ type: "status", event: "opfs-wait", ...info });
      if (pyOnWait) pyOnWait(info);
    },
  });
};

async function init({ packages = [] }) {
  const t0 = performance.now();
  pyodide = await loadPyodide({
    indexURL: new URL("../", import.meta.url).href,
    stdout: (s) => console.log("[py]", s),
    stderr: (s) => console.warn("[py]", s),
  });
  const t1 = performance.now();
  if (packages.length) {
    await pyodide.loadPackage(packages, {
      messageCallback: (m) => console.log("[loadPackage]", m),
      errorCallback: (m) => console.warn("[loadPackage]", m),
    });
  }
  const t2 = performance.now();
  return {
    pyodideMs: t1 - t0,
    packagesMs: t2 - t1,
    workerStartToReadyMs: t2 - workerStart,
    pythonVersion: pyodide.runPython("import sys; sys.version.split()[0]"),
  };
}

async function run({ code }) {
  if (!pyodide) throw new Error("init first");
  let result = await pyodide.runPythonAsync(code);
  if (result && typeof result.toJs === "function") {
    const converted = result.toJs({ dict_converter: Object.fromEntries });
    result.destroy();
    result = converted;
  }
  return result;
}

const handlers = { init, run };

self.onmessage = async (event) => {
  const { id, cmd } = event.data;
  try {
    const handler = handlers[cmd];
    if (!handler) throw new Error(`unknown command ${cmd}`);
    self.postMessage({ id, ok: true, result: await handler(event.data) });
  } catch (e) {
    self.postMessage({ id, ok: false, error: String((e && e.stack) || e) });
  }
};
self.postMessage({ type: "status", event: "worker-started" });
