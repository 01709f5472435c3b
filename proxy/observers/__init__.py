"""Per-request consumers of one Exchange (access log, metrics, budget alerts): never able to slow or fail
a request."""
