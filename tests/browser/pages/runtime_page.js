// Shared by runtime.html (script tag) and module.html (ES module import).
// Query: ?db=<database>&storage=<auto|opfs|idb|memory>&lease=<leaseDuration, ms>
//        &poll=<pollingInterval, ms>&jobs=<comma-separated job modules, default runtime_jobs.py>
//        &recheck=<offlineRecheckInterval, ms>
//        &offline=1 (create({offline: true}): the service worker precache)
// Sets window.durably once create() resolves, and window.t = {events, statuses,
// error, ready}; window.effects() reads back, in key order, the step-execution
// records runtime_jobs.py wrote to IndexedDB (see tests/browser/executions.py).
globalThis.startTestPage = (DurablyWeb) => {
  const params = new URLSearchParams(location.search);
  window.t = { events: [], statuses: [], error: null, ready: false };
  const options = {};
  if (params.get("lease")) options.leaseDuration = Number(params.get("lease"));
  if (params.get("poll")) options.pollingInterval = Number(params.get("poll"));
  if (params.get("recheck")) options.offlineRecheckInterval = Number(params.get("recheck"));
  DurablyWeb.create({
    jobs: (params.get("jobs") || "runtime_jobs.py").split(","),
    database: params.get("db") || "runtime-test.db",
    storage: params.get("storage") || "auto",
    options,
    offline: params.get("offline") === "1",
    onStatus: (s) => t.statuses.push({ ...s, at: Date.now() }),
  }).then(
    (durably) => {
      window.durably = durably;
      durably.on("*", (e) => t.events.push({ ...e, at: Date.now() }));
      t.ready = true;
    },
    (e) => (t.error = { name: e.name, message: e.message }),
  );
};

globalThis.effects = () =>
  new Promise((resolve, reject) => {
    const open = indexedDB.open("durably-test-effects", 1);
    open.onupgradeneeded = () => open.result.createObjectStore("effects", { autoIncrement: true });
    open.onerror = () => reject(open.error);
    open.onsuccess = () => {
      const store = open.result.transaction("effects").objectStore("effects");
      const keys = store.getAllKeys();
      const values = store.getAll();
      values.onsuccess = () => {
        open.result.close();
        resolve(values.result.map((v, i) => ({ ...v, key: keys.result[i] })));
      };
      values.onerror = () => reject(values.error);
    };
  });
