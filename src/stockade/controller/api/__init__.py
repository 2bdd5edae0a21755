"""Controller HTTP edge: routes and request/response schemas only; no SQL here (services and storage do that)."""
