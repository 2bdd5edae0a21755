"""The Stockade controller: REST API, storage, policy versions, auth, agent enrolment and distribution.

Modules (imports point downwards):

* :mod:`.app` - ``create_app(settings)``: migrations, first owner, error mapping, routers;
* :mod:`.context` - settings, shared state, the ``require(permission)`` dependency;
* :mod:`.objects_api`, :mod:`.policy_api`, :mod:`.agents_api`, :mod:`.admin_api` - routes;
* :mod:`.store` - object repository (revisions, ETags, validation, side tables);
* :mod:`.versions` - provision, rollback, diffs;
* :mod:`.distribution` - the in-memory incremental compiler, per-host revisions, long-poll wake-ups;
* :mod:`.auth` - API keys, sessions, agent tokens, RBAC, rate limiting;
* :mod:`.events` - audit events and syslog forwarding; :mod:`.metrics` - Prometheus;
* :mod:`.codec` / :mod:`.schemas` - API bodies <-> domain model; :mod:`.db` - tables, engine, Alembic;
* :mod:`.tls` - the self-generated CA and server certificate.

The agent-facing protocol (enrol, report interfaces, heartbeat, long-poll, fetch full or delta,
acknowledge) is documented in :mod:`.agents_api`.
"""
