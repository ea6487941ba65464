// service_worker.js: durably-web's precache, so the app loads and runs with no network.
//
// Registered by DurablyWeb.create({offline: true}), or by one line on the page:
//   navigator.serviceWorker.register("service_worker.js")   // the site's folder
// Its scope is the folder it is served from; see docs/browser-build.md ("Offline").
//
// Versions. build.py writes precache-manifest.json next to this file (every runtime
// file with its sha256 and size) and the build's version (a hash of them all) into
// BUILD_VERSION below, so a new build changes this script's bytes and the browser
// installs it. Install fetches every manifest file, verified against its sha256
// (Request integrity), into the cache "durably-web-<version>", and marks the cache
// complete last: a half-updated server fails the install and the old version stays.
//
// Never mixing versions. A page, and the dedicated worker it starts (a client of its
// own), are bound to one version for their whole life: a navigation binds its new
// client to the newest complete version (this worker's, once it is active), a worker
// script request binds the worker to its page's version, and every other request is
// answered from its client's version. The bindings live in IndexedDB because a
// service worker's globals are discarded whenever it idles. A version's cache is
// deleted once no live client is bound to it.
//
// The page's own files (its HTML, scripts, styles, job modules: anything in scope that
// is not a runtime file) go network-first into the "durably-web-pages" cache, which
// answers when the network does not, or has not within PAGE_NETWORK_TIMEOUT_MS (a
// network that connects but never answers must not hang the app; the late answer
// still refreshes the cache for the next load).
"use strict";

const BUILD_VERSION = "__DURABLY_BUILD_VERSION__"; // replaced by build.py
const VERSION_CACHE = /^durably-web-([0-9a-f]{16})$/;
const PAGES_CACHE = "durably-web-pages";
const MANIFEST_URL = new URL("precache-manifest.json", self.location.href).href;
// Put last into a version's cache: a cache without it is incomplete and never read.
const COMPLETE_KEY = new URL("precache-manifest.json?complete", self.location.href).href;
const PRECACHE_LANES = 4; // parallel fetches during install
const MESSAGE = "durably-web:"; // prefix of the messages exchanged with durably.js
const PAGE_NETWORK_TIMEOUT_MS = 3000;

const cacheName = (version) => `durably-web-${version}`;

// --------------------------------------------------------------- install --

self.addEventListener("install", (event) => {
  // skipWaiting: open pages need not close first; they keep their own version by binding.
  event.waitUntil(precache().then(() => self.skipWaiting()));
});

async function precache() {
  if (!/^[0-9a-f]{16}$/.test(BUILD_VERSION)) {
    throw new Error("durably-web: this service_worker.js has no build version; serve the one build.py writes into site/");
  }
  const response = await fetch(MANIFEST_URL, { cache: "no-store" });
  if (!response.ok) throw new Error(`durably-web: ${MANIFEST_URL} answered ${response.status}`);
  const manifest = await response.json();
  if (manifest.version !== BUILD_VERSION) {
    // This script and the manifest come from different builds: the server is mid-update.
    throw new Error(`durably-web: precache-manifest.json is version ${manifest.version}, the service worker ${BUILD_VERSION}`);
  }
  const cache = await caches.open(cacheName(BUILD_VERSION));
  if (await cache.match(COMPLETE_KEY)) return; // the same build again (e.g. a new registration)
  const queue = [...manifest.files];
  const lane = async () => {
    for (let file = queue.shift(); file; file = queue.shift()) {
      const url = new URL(file.path, MANIFEST_URL).href;
      // integrity: the browser rejects a body whose sha256 is not the manifest's.
      const got = await fetch(url, { cache: "no-cache", integrity: `sha256-${hexToBase64(file.sha256)}` });
      if (!got.ok) throw new Error(`durably-web: precaching ${url} answered ${got.status}`);
      await cache.put(url, got);
    }
  };
  await Promise.all(Array.from({ length: PRECACHE_LANES }, lane));
  await cache.put(COMPLETE_KEY, new Response(BUILD_VERSION, { headers: { "Content-Type": "text/plain" } }));
}

function hexToBase64(hex) {
  let bytes = "";
  for (let i = 0; i < hex.length; i += 2) bytes += String.fromCharCode(parseInt(hex.slice(i, i + 2), 16));
  return btoa(bytes);
}

// -------------------------------------------------------------- activate --

self.addEventListener("activate", (event) => {
  event.waitUntil(
    (async () => {
      await recordActivation(BUILD_VERSION);
      // Pages bound to an older version keep it; tell them a newer one is ready.
      for (const client of await self.clients.matchAll({ type: "window", includeUncontrolled: true })) {
        const binding = await bindings.get(client.id);
        if (binding && binding.version !== BUILD_VERSION) {
          client.postMessage({ type: MESSAGE + "update-ready", version: BUILD_VERSION, current: binding.version });
        }
      }
      await collectGarbage();
    })(),
  );
});

// ----------------------------------------------------------------- fetch --

self.addEventListener("fetch", (event) => {
  const request = event.request;
  if (request.method !== "GET") return;
  const url = new URL(request.url);
  if (url.origin !== self.location.origin || !request.url.startsWith(self.registration.scope)) return;
  if (url.href === self.location.href || url.href.split("?")[0] === MANIFEST_URL) return; // always the network's
  event.respondWith(respond(event, url));
});

async function respond(event, url) {
  const version = await versionFor(event);
  const cache = version && (await caches.open(cacheName(version)));
  if (cache && (await cache.match(COMPLETE_KEY))) {
    // Runtime files are cached under their URL without a query string.
    const hit = await cache.match(url.origin + url.pathname);
    if (hit) return hit;
  }
  if (event.request.mode === "navigate") event.waitUntil(collectGarbage());
  return networkFirst(event);
}

/** The version the request's client is bound to (binding it first if it is new). */
async function versionFor(event) {
  const { clientId, resultingClientId, request } = event;
  if (resultingClientId) {
    // A new client: a page (navigation) gets the newest complete version, which is this
    // active worker's; a dedicated worker gets the version of the page that starts it.
    const parent = request.mode === "navigate" ? null : clientId || null;
    const parentBinding = parent && (await bindings.get(parent));
    const version = parentBinding ? parentBinding.version : BUILD_VERSION;
    await bindings.put(resultingClientId, { version, parent, at: Date.now() });
    return version;
  }
  if (!clientId) return BUILD_VERSION;
  const binding = await bindings.get(clientId);
  if (binding) return binding.version;
  // Not seen before (its binding was lost): from now on it stays on this version.
  await bindings.put(clientId, { version: BUILD_VERSION, parent: null, at: Date.now() });
  return BUILD_VERSION;
}

async function networkFirst(event) {
  const { request } = event;
  const pages = await caches.open(PAGES_CACHE);
  const fromNetwork = fetch(request).then(async (response) => {
    if (response.ok && response.type === "basic") await pages.put(request.url, response.clone());
    return response;
  });
  event.waitUntil(fromNetwork.catch(() => undefined)); // a late answer still updates the cache
  const cachedCopy = async () =>
    (await pages.match(request.url)) || (request.mode === "navigate" && (await pages.match(request.url, { ignoreSearch: true })));
  let timer;
  const slow = new Promise((resolve) => (timer = setTimeout(resolve, PAGE_NETWORK_TIMEOUT_MS, null)));
  try {
    const answer = await Promise.race([fromNetwork, slow]);
    if (answer) return answer;
    return (await cachedCopy()) || (await fromNetwork); // nothing cached: keep waiting
  } catch (error) {
    const cached = await cachedCopy();
    if (cached) return cached;
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

// --------------------------------------------------------------- messages --

self.addEventListener("message", (event) => {
  const data = event.data || {};
  if (data.type !== MESSAGE + "hello" || !event.source) return;
  event.waitUntil(
    (async () => {
      const binding = await bindings.get(event.source.id);
      // A page that is not controlled yet (its first visit) runs from the network.
      const version = binding ? binding.version : null;
      event.source.postMessage({ type: MESSAGE + "hello", version, newest: BUILD_VERSION });
      await cachePageFiles(Array.isArray(data.pageFiles) ? data.pageFiles : []);
      event.source.postMessage({ type: MESSAGE + "page-files-cached", version });
      await collectGarbage();
    })(),
  );
});

/** Fetch the page's own files into the pages cache (the first visit is not controlled). */
async function cachePageFiles(urls) {
  const pages = await caches.open(PAGES_CACHE);
  await Promise.all(
    urls.map(async (href) => {
      const url = new URL(href, self.registration.scope);
      if (url.origin !== self.location.origin || !url.href.startsWith(self.registration.scope)) return;
      try {
        const response = await fetch(url.href, { cache: "no-cache" });
        if (response.ok && response.type === "basic") await pages.put(url.href, response);
      } catch (error) {
        // Offline already: whatever the pages cache holds stays.
      }
    }),
  );
}

// ------------------------------------------------------ garbage collection --

/**
 * Delete the caches of versions this registration activated before this one, once no
 * live client is bound to them, and the bindings of clients that are gone.
 *
 * Only versions recorded as activated are ever deleted: a newer version being installed
 * right now (its cache still filling) is never touched by the worker it will replace.
 */
async function collectGarbage() {
  const activated = await readActivations();
  if (activated[activated.length - 1] !== BUILD_VERSION) return; // a newer worker is in charge
  const live = new Set((await self.clients.matchAll({ type: "all", includeUncontrolled: true })).map((c) => c.id));
  const inUse = new Set([BUILD_VERSION]);
  for (const [id, binding] of await bindings.entries()) {
    // A dedicated worker lives no longer than its page: it counts as live while the page is.
    if (live.has(id) || (binding.parent && live.has(binding.parent))) inUse.add(binding.version);
    else await bindings.delete(id);
  }
  for (const name of await caches.keys()) {
    const match = VERSION_CACHE.exec(name);
    if (match && !inUse.has(match[1]) && activated.includes(match[1])) await caches.delete(name);
  }
}

// -------------------------------------------------------------- IndexedDB --

const DB_NAME = "durably-web-service-worker";

function openDb() {
  return new Promise((resolve, reject) => {
    const open = indexedDB.open(DB_NAME, 1);
    open.onupgradeneeded = () => {
      open.result.createObjectStore("bindings"); // client id -> {version, parent, at}
      open.result.createObjectStore("meta"); // "activated" -> [versions, oldest first]
    };
    open.onsuccess = () => resolve(open.result);
    open.onerror = () => reject(open.error);
  });
}

async function transact(store, mode, operate) {
  const db = await openDb();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(store, mode);
      const request = operate(tx.objectStore(store));
      tx.oncomplete = () => resolve(request && request.result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  } finally {
    db.close();
  }
}

// Reads go through a memory copy (lost when the worker idles; IndexedDB is the truth).
const known = new Map();

const bindings = {
  async get(id) {
    if (!known.has(id)) {
      const value = await transact("bindings", "readonly", (s) => s.get(id));
      if (!value) return null;
      known.set(id, value);
    }
    return known.get(id);
  },
  async put(id, value) {
    await transact("bindings", "readwrite", (s) => s.put(value, id));
    known.set(id, value);
  },
  async delete(id) {
    await transact("bindings", "readwrite", (s) => s.delete(id));
    known.delete(id);
  },
  async entries() {
    const db = await openDb();
    try {
      return await new Promise((resolve, reject) => {
        const store = db.transaction("bindings").objectStore("bindings");
        const keys = store.getAllKeys();
        const values = store.getAll();
        values.onsuccess = () => resolve(keys.result.map((k, i) => [k, values.result[i]]));
        values.onerror = () => reject(values.error);
      });
    } finally {
      db.close();
    }
  },
};

async function readActivations() {
  return (await transact("meta", "readonly", (s) => s.get("activated"))) || [];
}

async function recordActivation(version) {
  const activated = (await readActivations()).filter((v) => v !== version);
  activated.push(version);
  await transact("meta", "readwrite", (s) => s.put(activated, "activated"));
}
