"""Flag lifecycle: which flags are potentially stale, usage counting, the digest, change notices."""
