"""Controller services: authentication/RBAC, codec, distribution, versions, events; no routes."""
