"""Policy as code: YAML files <-> ``stockade.model.Policy``.

``load_policy(path)`` reads one file or every ``*.yaml`` / ``*.yml`` file under a directory
(recursively, sorted by relative path, hidden entries skipped); ``load_documents(text,
source)`` reads in-memory text; ``dump_policy(policy)`` writes deterministic YAML that
loads back to an equal Policy. Any problem raises ``stockade.errors.ValidationError``
listing every issue found, each as ``file:line: field: message``, for example
``policy/shop.yaml:14: rules[2].services[0]: unknown service "htps"``. Field paths are
inside the document, list indexes count from 0. Unknown keys are errors.

The rules about one document live in ``stockade.codec``, shared with the REST API (whose
bodies are these documents without ``apiVersion``/``kind``); this package adds files, line
numbers and cross-references. Every document has ``apiVersion: stockade.io/v1``, a ``kind`` and (except Settings) a
``name`` (1-63 characters of ``A-Za-z0-9_.-``, unique per kind across all files)::

    kind: Settings            # at most one
    controller: [10.70.0.1]   # CIDRs the agent may always reach on controller_port
    controller_port: 8443
    management: [22/tcp]      # inbound always allowed on enforcing hosts ([] for none)

    kind: LabelKey            # role, app, env, loc are always declared
    name: env
    values: [dev, prod]       # optional: the allowed values

    kind: LabelGroup          # matches a workload carrying any of the values
    name: non-prod
    key: env
    values: [dev, test]

    kind: Service             # the service "any" (every protocol) is built in
    name: web
    ports: [80/tcp, 8000-8080/tcp, 53/udp, udp, icmp, "icmp:8", "icmpv6:echo-request", any]
    description: ...

    kind: IPList
    name: office
    include: [10.70.0.192/26, fd70::c0/122]   # a bare address means /32 or /128
    exclude: [10.70.0.254]

    kind: Workload
    name: web-prod-1
    labels: {role: web, app: shop, env: prod}  # at most one value per key; a number must be quoted
    interfaces:
      - name: eth0                              # a name (eth0.100 yes, eth0@if12 no)
        addresses: [10.70.0.11, fd70::11]       # host addresses: no 0.0.0.0, ::, broadcast, multicast,
                                                # loopback or link-local
    mode: full                # idle | visibility (default) | selective | full
    backend: nftables         # default
    description: ...

    kind: Ruleset
    name: shop-prod
    scope: [{labels: {app: shop, env: prod}}]  # required: label selectors, or "all" (never empty)
    rules:
      - consumers: [{labels: {role: web}}]     # a list of selectors, or "all"
        providers: [{labels: {role: app}}]
        services: [app-http]                    # service names
        consumers_scope: intra                  # intra (default) | global (extra-scope)
        description: ...

    kind: DenyRule
    name: no-smb
    consumers: all
    providers: all
    services: [smb]
    override: true            # an override-deny beats every allow; default false

A selector is ``all``, ``{ip_list: NAME}``, or a label selector combining
``labels: {key: value, ...}`` (all required), ``label_groups: [NAME, ...]`` (each must
match) and ``exclude: {key: value-or-list}`` (none may match); the REST API's ``{all: true}`` is
accepted for ``all``. An empty selector is an error, never "everything"; an exclude-only
selector (every workload except those labels) is accepted. Label keys and values must be declared/allowed; every
referenced service, IP list and label group must exist; an address belongs to at most
one workload.
"""

from stockade.policyfile.dump import dump_policy
from stockade.policyfile.loader import load_documents, load_policy, load_sources

__all__ = ["dump_policy", "load_documents", "load_policy", "load_sources"]
