// Shared by runtime.html (script tag) and module.html (ES module import).
// Query: ?db=<database>&storage=<auto|opfs|idb|memory>
// Sets window.durably once create() resolves, and window.t = {events, statuses,
// error, ready}; window.effects() reads back the side effects runtime_jobs.py
// recorded in IndexedDB.
globalThis.startTestPage = (DurablyWeb) => {
  const params = new URLSearchParams(location.search);
  window.t = { events: [], statuses: [], error: null, ready: false };
  DurablyWeb.create({
    jobs: ["runtime_jobs.py"],
    database: params.get("db") || "runtime-test.db",
    storage: params.get("storage") || "auto",
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
      const request = open.result.transaction("effects").objectStore("effects").getAll();
      request.onsuccess = () => {
        open.result.close();
        resolve(request.result);
      };
      request.onerror = () => reject(request.error);
    };
  });
