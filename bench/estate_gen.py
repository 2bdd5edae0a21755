"""Generator of large, realistic estates (a ``Policy`` with inventory) for benchmarks.

The estate looks like a real enterprise: many applications, each deployed in ``prod`` and
``dev`` across a couple of locations, each app+env governed by one ruleset scoped
``{app, env}`` with intra-scope role -> role rules, an office/partner entry rule and
extra-scope rules letting other apps' clients in. Shared infrastructure (DNS, NTP, LDAP,
monitoring, backup, bastion) is reached through global rulesets; label groups, IP lists
with exclusions, a ``dev -> prod`` deny and absolute override-denies (SMB, telnet) complete
it. Every workload has one IPv4 and one IPv6 address, handed out in a shuffled order with
gaps, so peer sets do not collapse into a few CIDRs.

The counts of workloads, rulesets and rules hit the requested :class:`EstateSpec` exactly
(as long as the spec leaves room for the fixed infrastructure part). Output is a pure
function of the spec (seeded RNG), so every run benchmarks the same estate.

Usage::

    from estate_gen import SIZES, generate
    estate = generate(SIZES["large"])
    estate.policy  # stockade.model.Policy
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from enum import Enum

from stockade.model import (
    ALL_WORKLOADS,
    AllowRule,
    ConsumerScope,
    DenyRule,
    EnforcementMode,
    Interface,
    IPList,
    IPListSelector,
    Label,
    LabelGroup,
    LabelSelector,
    Policy,
    Proto,
    Ruleset,
    Selector,
    Service,
    ServiceEntry,
    Workload,
)


@dataclass(frozen=True)
class EstateSpec:
    """Requested size of a generated estate; ``seed`` makes it reproducible."""

    name: str
    workloads: int
    rulesets: int
    rules: int
    seed: int = 7


SIZES: dict[str, EstateSpec] = {
    "small": EstateSpec("small", 1_000, 100, 2_000),
    "medium": EstateSpec("medium", 5_000, 500, 10_000),
    "large": EstateSpec("large", 25_000, 2_500, 50_000),
    "xlarge": EstateSpec("xlarge", 125_000, 12_500, 250_000),
    "xxlarge": EstateSpec("xxlarge", 250_000, 25_000, 500_000),
}

LOCATIONS = ("par", "fra", "nyc", "sgp")
DEPENDENCIES = 8  # other apps whose clients each app lets in (extra-scope rules)
ENVS = ("prod", "dev")


class Archetype(Enum):
    """Shape of an application: which roles it has and how they talk."""

    WEB = "web"  # lb -> web -> app -> db/cache
    SERVICE = "service"  # api -> app -> db/cache/queue
    PIPELINE = "pipeline"  # queue -> worker -> db/search, batch jobs


# Roles in the order hosts are added to an app+env (the first ten make a typical deployment;
# smaller deployments drop from the end, larger ones cycle through the list again).
_ROLE_ORDER: dict[Archetype, tuple[str, ...]] = {
    Archetype.WEB: ("lb", "web", "app", "db", "web", "app", "cache", "db", "app", "batch", "web", "cache"),
    Archetype.SERVICE: ("api", "app", "db", "cache", "api", "app", "queue", "db", "app", "api", "cache", "queue"),
    Archetype.PIPELINE: ("queue", "worker", "db", "worker", "search", "queue", "worker", "db", "batch", "worker"),
}
_ENTRY_ROLE = {Archetype.WEB: "lb", Archetype.SERVICE: "api", Archetype.PIPELINE: "queue"}
_ENTRY_SERVICES = {Archetype.WEB: ("https",), Archetype.SERVICE: ("grpc", "https"), Archetype.PIPELINE: ("kafka",)}
_CLIENT_ROLE = {Archetype.WEB: "app", Archetype.SERVICE: "app", Archetype.PIPELINE: "worker"}

# Intra-scope rules per archetype: (consumer roles, provider roles, services), in priority order.
_INTRA: dict[Archetype, tuple[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...]] = {
    Archetype.WEB: (
        (("lb",), ("web",), ("http", "https")),
        (("web",), ("app",), ("app-http",)),
        (("app",), ("db",), ("postgres",)),
        (("app", "web"), ("cache",), ("redis",)),
        (("db",), ("db",), ("postgres",)),
        (("cache",), ("cache",), ("redis-cluster",)),
        (("app",), ("app",), ("grpc",)),
        (("batch",), ("db",), ("postgres",)),
        (("batch",), ("app",), ("app-http",)),
        (("web",), ("web",), ("memcached",)),
        (("lb",), ("lb",), ("vrrp",)),
        (("app", "batch"), ("db",), ("ping",)),
        (("lb",), ("app",), ("app-http",)),
    ),
    Archetype.SERVICE: (
        (("api",), ("app",), ("grpc",)),
        (("app",), ("db",), ("mysql",)),
        (("app",), ("cache",), ("redis",)),
        (("app",), ("queue",), ("amqp",)),
        (("db",), ("db",), ("mysql", "galera")),
        (("queue",), ("queue",), ("amqp-cluster",)),
        (("cache",), ("cache",), ("redis-cluster",)),
        (("api", "app"), ("app",), ("app-http",)),
        (("api",), ("cache",), ("redis",)),
        (("app",), ("api",), ("https",)),
        (("api",), ("api",), ("grpc",)),
        (("app",), ("app",), ("grpc",)),
        (("api", "app"), ("db",), ("ping",)),
    ),
    Archetype.PIPELINE: (
        (("worker",), ("queue",), ("kafka",)),
        (("queue",), ("queue",), ("kafka", "zookeeper")),
        (("worker",), ("db",), ("postgres",)),
        (("worker",), ("search",), ("elasticsearch",)),
        (("search",), ("search",), ("elasticsearch",)),
        (("db",), ("db",), ("postgres",)),
        (("batch",), ("queue",), ("kafka",)),
        (("batch",), ("db",), ("postgres",)),
        (("worker",), ("worker",), ("worker-ports",)),
        (("batch",), ("search",), ("elasticsearch",)),
        (("worker",), ("batch",), ("app-http",)),
        (("batch",), ("worker",), ("worker-ports",)),
        (("worker", "batch"), ("queue",), ("ping",)),
    ),
}

INFRA_PER_LOC: tuple[tuple[str, str, int], ...] = (  # (app, role, hosts per location)
    ("monitoring", "monitor", 2),
    ("dns", "dns", 2),
    ("ntp", "ntp", 1),
    ("ldap", "ldap", 2),
    ("backup", "backup", 1),
    ("bastion", "bastion", 1),
)


def _tcp(*ports: int) -> tuple[ServiceEntry, ...]:
    return tuple(ServiceEntry(Proto.TCP, p, p) for p in ports)


def _services() -> tuple[Service, ...]:
    both53 = (ServiceEntry(Proto.UDP, 53, 53), ServiceEntry(Proto.TCP, 53, 53))
    table: dict[str, tuple[ServiceEntry, ...]] = {
        "any": (ServiceEntry(Proto.ANY),),
        "http": _tcp(80),
        "https": _tcp(443),
        "app-http": _tcp(8080),
        "grpc": _tcp(50051),
        "postgres": _tcp(5432),
        "mysql": _tcp(3306),
        "galera": (*_tcp(4567, 4568, 4444), ServiceEntry(Proto.UDP, 4567, 4567)),
        "redis": _tcp(6379),
        "redis-cluster": (ServiceEntry(Proto.TCP, 16379, 16379), ServiceEntry(Proto.TCP, 6379, 6379)),
        "memcached": (ServiceEntry(Proto.TCP, 11211, 11211), ServiceEntry(Proto.UDP, 11211, 11211)),
        "amqp": _tcp(5672),
        "amqp-cluster": _tcp(4369, 25672),
        "kafka": _tcp(9092),
        "zookeeper": _tcp(2181, 2888, 3888),
        "elasticsearch": (ServiceEntry(Proto.TCP, 9200, 9200), ServiceEntry(Proto.TCP, 9300, 9300)),
        "worker-ports": (ServiceEntry(Proto.TCP, 8000, 8099),),
        "vrrp": (ServiceEntry(Proto.UDP, 3784, 3784),),  # bfd-style heartbeat between balancers
        "node-exporter": _tcp(9100),
        "prometheus": _tcp(9090),
        "ping": (ServiceEntry(Proto.ICMP, 8, 8), ServiceEntry(Proto.ICMPV6, 128, 128)),
        "dns": both53,
        "ntp": (ServiceEntry(Proto.UDP, 123, 123),),
        "ldap": _tcp(389),
        "ldaps": _tcp(636),
        "ldap-repl": _tcp(389, 636),
        "backup-agent": (ServiceEntry(Proto.TCP, 10050, 10051),),
        "ssh": _tcp(22),
        "smb": _tcp(139, 445),
        "telnet": _tcp(23),
    }
    return tuple(Service(n, e) for n, e in sorted(table.items()))


def _ip_lists() -> tuple[IPList, ...]:
    net = ipaddress.ip_network
    return (
        IPList("office", (net("192.0.2.0/24"), net("172.16.10.0/23"), net("2001:db8:100::/48"))),
        IPList(
            "partners",
            (net("198.51.100.0/24"), net("203.0.113.0/24"), net("2001:db8:200::/48")),
            (net("198.51.100.128/28"), net("2001:db8:200:ff::/64")),
        ),
        IPList("internet", (net("0.0.0.0/0"), net("::/0")), (net("10.0.0.0/8"), net("fd00::/8"))),
    )


def _label_groups() -> tuple[LabelGroup, ...]:
    return (
        LabelGroup("datastores", "role", frozenset({"db", "cache", "search"})),
        LabelGroup("frontends", "role", frozenset({"lb", "web", "api"})),
        LabelGroup("emea", "loc", frozenset({"par", "fra"})),
    )


def lab(key: str, value: str) -> Label:
    return Label(key, value)


def sel(
    *labels: tuple[str, str], groups: tuple[str, ...] = (), exclude: tuple[tuple[str, str], ...] = ()
) -> LabelSelector:
    """A label selector from (key, value) pairs (sorted, as the loader would build it)."""
    return LabelSelector(
        tuple(sorted(Label(k, v) for k, v in labels)),
        tuple(sorted(groups)),
        tuple(sorted(Label(k, v) for k, v in exclude)),
    )


def _infra_rulesets() -> tuple[Ruleset, ...]:
    """Global and shared-service rulesets (fixed size, independent of the estate size)."""
    everyone = (ALL_WORKLOADS,)
    glob = ConsumerScope.GLOBAL
    return (
        Ruleset(
            "global-monitoring",
            (),
            (
                AllowRule((sel(("app", "monitoring"), ("role", "monitor")),), everyone, ("node-exporter", "ping")),
                AllowRule((IPListSelector("office"),), (sel(("role", "monitor")),), ("https",)),
            ),
        ),
        Ruleset(
            "global-shared-services",
            (),
            (
                AllowRule(everyone, (sel(("app", "dns"), ("role", "dns")),), ("dns",)),
                AllowRule(everyone, (sel(("app", "ntp"), ("role", "ntp")),), ("ntp",)),
                AllowRule(
                    (sel(exclude=(("role", "batch"),)),),
                    (sel(("app", "ldap"), ("role", "ldap")),),
                    ("ldap", "ldaps"),
                ),
                AllowRule((sel(("role", "batch")),), (sel(("app", "ldap"), ("role", "ldap")),), ("ldaps",)),
            ),
        ),
        Ruleset(
            "global-backup",
            (),
            (
                AllowRule(
                    (sel(("app", "backup"), ("role", "backup")),), (sel(groups=("datastores",)),), ("backup-agent",)
                ),
            ),
        ),
        Ruleset(
            "global-bastion",
            (),
            (
                AllowRule((IPListSelector("office"),), (sel(("app", "bastion")),), ("ssh",)),
                AllowRule((sel(("app", "bastion")),), everyone, ("ssh", "ping")),
            ),
        ),
        Ruleset(
            "monitoring-prod",
            (sel(("app", "monitoring"), ("env", "prod")),),
            (
                AllowRule((sel(("role", "monitor")),), (sel(("role", "monitor")),), ("prometheus",)),
                AllowRule((sel(("app", "bastion")),), (sel(("role", "monitor")),), ("prometheus",), glob),
            ),
        ),
        Ruleset(
            "ldap-prod",
            (sel(("app", "ldap"), ("env", "prod")),),
            (AllowRule((sel(("role", "ldap")),), (sel(("role", "ldap")),), ("ldap-repl",)),),
        ),
    )


def _deny_rules() -> tuple[DenyRule, ...]:
    everyone: tuple[Selector, ...] = (ALL_WORKLOADS,)
    return (
        DenyRule("dev-to-prod", (sel(("env", "dev")),), (sel(("env", "prod")),), ("any",)),
        DenyRule("partners-to-datastores", (IPListSelector("partners"),), (sel(groups=("datastores",)),), ("any",)),
        DenyRule("no-smb", everyone, everyone, ("smb",), override=True),
        DenyRule("no-telnet", everyone, everyone, ("telnet",), override=True),
    )


@dataclass(frozen=True)
class App:
    name: str
    archetype: Archetype
    locs: tuple[str, str]


@dataclass(frozen=True)
class Estate:
    """A generated estate plus facts a benchmark needs to drive it."""

    spec: EstateSpec
    policy: Policy
    apps: tuple[App, ...]
    typical_host: str  # an app-tier host of a prod web app: a representative host policy
    infra_host: str  # a DNS server: its inbound peer set holds every workload

    @property
    def rule_total(self) -> int:
        return sum(len(rs.rules) for rs in self.policy.rulesets) + len(self.policy.deny_rules)


def _split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as possible (larger shares first)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _app_ruleset(app: App, env: str, budget: int, deps: list[App], office: bool) -> Ruleset:
    """The ruleset of one app+env: intra-scope rules, entry rules, then extra-scope consumers."""
    scope = sel(("app", app.name), ("env", env))
    entry = _ENTRY_ROLE[app.archetype]
    entry_services = _ENTRY_SERVICES[app.archetype]
    rules: list[AllowRule] = []
    if office:
        rules.append(AllowRule((IPListSelector("office"),), (sel(groups=("frontends",)),), ("https",)))
    else:
        rules.append(
            AllowRule((IPListSelector("partners"),), (sel(("role", entry), groups=("emea",)),), entry_services)
        )
    for consumers, providers, services in _INTRA[app.archetype]:
        rules.append(
            AllowRule(
                tuple(sel(("role", r)) for r in consumers),
                tuple(sel(("role", r)) for r in providers),
                services,
            )
        )
    rules = rules[: max(1, budget - min(len(deps), budget // 2))]
    for dep in deps:
        if len(rules) >= budget:
            break
        client = sel(("app", dep.name), ("env", env), ("role", _CLIENT_ROLE[dep.archetype]))
        rules.append(AllowRule((client,), (sel(("role", entry)),), entry_services, ConsumerScope.GLOBAL))
    while len(rules) < budget:  # more rules than templates: the app's hosts may ping its entry tier
        rules.append(AllowRule((ALL_WORKLOADS,), (sel(("role", entry)),), ("ping",)))
    return Ruleset(f"{app.name}-{env}", (scope,), tuple(rules))


class _Addresses:
    """Hands out v4/v6 pairs per location, in shuffled order, with gaps (other tenants)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._next = {loc: 1 for loc in LOCATIONS}

    def take(self, loc: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]:
        i = LOCATIONS.index(loc)
        n = self._next[loc]
        self._next[loc] = n + 1 + (1 if self._rng.random() < 0.2 else 0)
        v4 = ipaddress.IPv4Address(int(ipaddress.IPv4Address(f"10.{i * 32}.0.0")) + n)
        v6 = ipaddress.IPv6Address(int(ipaddress.IPv6Address(f"fd00:{i + 1}::")) + n)
        return v4, v6


def generate(spec: EstateSpec) -> Estate:
    """Build the estate of ``spec`` (deterministic for a given spec)."""
    rng = random.Random(spec.seed)
    infra_rulesets = _infra_rulesets()
    deny_rules = _deny_rules()
    infra_hosts = sum(n for _, _, n in INFRA_PER_LOC) * len(LOCATIONS)
    infra_rules = sum(len(rs.rules) for rs in infra_rulesets) + len(deny_rules)
    n_apps = (spec.rulesets - len(infra_rulesets)) // len(ENVS)
    if n_apps < 2 or spec.workloads - infra_hosts < n_apps * len(ENVS) or spec.rules - infra_rules < n_apps * 2:
        raise ValueError(f"estate {spec.name} too small for its fixed infrastructure part")

    archetypes = list(Archetype)
    apps: list[App] = []
    for i in range(n_apps):
        first = rng.randrange(len(LOCATIONS))
        second = (first + 1 + rng.randrange(len(LOCATIONS) - 1)) % len(LOCATIONS)
        apps.append(App(f"app{i:04d}", archetypes[i % len(archetypes)], (LOCATIONS[first], LOCATIONS[second])))

    # inventory: (name, labels, mode); addresses are assigned afterwards in shuffled order
    hosts: list[tuple[str, frozenset[Label], EnforcementMode, str]] = []
    for app_name, role, per_loc in INFRA_PER_LOC:
        for loc in LOCATIONS:
            for k in range(per_loc):
                labels = frozenset({lab("app", app_name), lab("env", "prod"), lab("loc", loc), lab("role", role)})
                hosts.append((f"{app_name}-{loc}-{k}", labels, EnforcementMode.FULL, loc))
    counts = _split(spec.workloads - infra_hosts, n_apps * len(ENVS))
    typical = ""
    for i, app in enumerate(apps):
        for j, env in enumerate(ENVS):
            roles = _ROLE_ORDER[app.archetype]
            for k in range(counts[i * len(ENVS) + j]):
                role = roles[k % len(roles)]
                loc = app.locs[k % 2]
                labels = frozenset({lab("app", app.name), lab("env", env), lab("loc", loc), lab("role", role)})
                if env == "prod":
                    mode = EnforcementMode.VISIBILITY if rng.random() < 0.02 else EnforcementMode.FULL
                else:
                    mode = EnforcementMode.SELECTIVE
                name = f"{app.name}-{env}-{role}-{k:02d}"
                hosts.append((name, labels, mode, loc))
                if not typical and app.archetype is Archetype.WEB and env == "prod" and role == "app":
                    typical = name

    addresses = _Addresses(rng)
    order = list(range(len(hosts)))
    rng.shuffle(order)
    assigned: dict[int, tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]] = {}
    for idx in order:
        assigned[idx] = addresses.take(hosts[idx][3])
    workloads = tuple(
        sorted(
            Workload(name, labels, (Interface("eth0", assigned[idx]),), mode)
            for idx, (name, labels, mode, _) in enumerate(hosts)
        )
    )

    budgets = _split(spec.rules - infra_rules, n_apps * len(ENVS))
    rulesets: list[Ruleset] = list(infra_rulesets)
    # every app consumes (and is consumed by) the same number of others: fixed offsets in a
    # shuffled ring, so no host's rule count grows with the number of apps
    ring = list(range(n_apps))
    rng.shuffle(ring)
    position = {a: p for p, a in enumerate(ring)}
    offsets = rng.sample(range(1, n_apps), min(DEPENDENCIES, n_apps - 1))
    for i, app in enumerate(apps):
        deps = [apps[ring[(position[i] + o) % n_apps]] for o in offsets]
        for j, env in enumerate(ENVS):
            office = app.archetype is not Archetype.SERVICE or env == "dev"
            rulesets.append(_app_ruleset(app, env, budgets[i * len(ENVS) + j], deps, office))

    policy = Policy(
        label_groups=_label_groups(),
        workloads=workloads,
        ip_lists=_ip_lists(),
        services=_services(),
        rulesets=tuple(rulesets),
        deny_rules=deny_rules,
    )
    return Estate(spec, policy, tuple(apps), typical, f"dns-{LOCATIONS[0]}-0")


def main() -> None:
    """Print the counts of every size and check the estates validate cleanly."""
    for spec in SIZES.values():
        estate = generate(spec)
        p = estate.policy
        issues = p.validate()
        print(
            f"{spec.name}: {len(p.workloads):,} workloads, {len(p.rulesets):,} rulesets, "
            f"{estate.rule_total:,} rules, {len({w.labels for w in p.workloads}):,} label sets, "
            f"{len(issues)} validation issues"
        )
        for issue in issues[:5]:
            print(f"  {issue}")


if __name__ == "__main__":
    main()
