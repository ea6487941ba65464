// The page of tests/browser/test_browser_torture.py. Query: ?db=<database>&storage=<auto|opfs|idb>
//   &offline=1 (create({offline: true}): every reload served by the service worker)
// On every load it creates the client (jobs: torture_jobs.py) and sets window.durably once
// create() resolves, and window.t = {events, statuses, error, ready}; window.effects()
// reads back, in insertion order, the side effects the steps recorded in IndexedDB.
(() => {
  const params = new URLSearchParams(location.search);
  window.t = { events: [], statuses: [], error: null, ready: false, loadedAt: Date.now() };
  DurablyWeb.create({
    jobs: ["torture_jobs.py"],
    database: params.get("db") || "torture.db",
    storage: params.get("storage") || "auto",
    options: { pollingInterval: 200 },
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

  window.effects = () =>
    new Promise((resolve, reject) => {
      const open = indexedDB.open("durably-torture-effects", 1);
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
})();
