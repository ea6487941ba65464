// durably.mjs: ES module entry point of durably-web (types: durably.d.ts).
//
//   import DurablyWeb from "./static/durably.mjs";   // or: import { DurablyWeb } from …
//
// The implementation is durably.js; imported as a module it cannot see its own
// URL (no document.currentScript), so this file tells it where it lives.
import "./durably.js";

const DurablyWeb = globalThis.DurablyWeb;
if (!DurablyWeb._baseUrl) DurablyWeb._baseUrl = new URL("./", import.meta.url).href;

export { DurablyWeb };
export default DurablyWeb;
