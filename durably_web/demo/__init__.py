"""The demo: one portable jobs module, run from a terminal here and in the browser demo page."""
