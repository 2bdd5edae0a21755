"""Visibility: flow summaries, the application map, policy suggestions and impact preview.

Pure functions over the domain model and the reference evaluator (no I/O); the controller
stores flows and serves these through its API, the agent produces the flow records.
"""

from stockade.visibility.appmap import (
    DEFAULT_GROUP_KEYS,
    AppMap,
    EncryptionOracle,
    ExplainedConnection,
    Link,
    MapEdge,
    MapNode,
    NodeKind,
    VerdictMix,
    build_app_map,
    edge_connections,
    explain,
    group_id,
    links_of,
    map_of_links,
    node_id_of,
)
from stockade.visibility.flows import (
    Connection,
    Endpoint,
    EndpointKind,
    FlowKey,
    FlowRecord,
    Resolver,
    merge_sides,
    worst,
)
from stockade.visibility.impact import ChangeKind, Impact, ImpactItem, preview
from stockade.visibility.suggest import Accepted, Elsewhere, SuggestedRule, Suggestions, accept, suggest, with_accepted

__all__ = [
    "DEFAULT_GROUP_KEYS",
    "Accepted",
    "AppMap",
    "ChangeKind",
    "Connection",
    "Elsewhere",
    "EncryptionOracle",
    "Endpoint",
    "EndpointKind",
    "ExplainedConnection",
    "FlowKey",
    "FlowRecord",
    "Impact",
    "ImpactItem",
    "Link",
    "MapEdge",
    "MapNode",
    "NodeKind",
    "Resolver",
    "SuggestedRule",
    "Suggestions",
    "VerdictMix",
    "accept",
    "build_app_map",
    "edge_connections",
    "explain",
    "group_id",
    "links_of",
    "map_of_links",
    "merge_sides",
    "node_id_of",
    "preview",
    "suggest",
    "with_accepted",
    "worst",
]
