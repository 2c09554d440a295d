"""The operators' web: a read-only dashboard and the JSON API behind it, plus /metrics and /healthz."""
