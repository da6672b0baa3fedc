"""One adapter module per external system; no library type leaves its adapter."""
