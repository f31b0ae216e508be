"""The OpenAI-compatible HTTP server: protocol, routes, keys and limits, metrics, logs, process lifecycle."""
