"""Visibility routes: flow ingestion from agents, the Explorer and the application map.

Agent side::

    POST /api/v1/agents/{id}/flows   (agent token)  body: stockade.visibility.wire  -> 202 {accepted}

Operator side (every role may read)::

    GET  /flows?src_labels=&dst_labels=&labels=&src_workload=&dst_workload=&workload=&src_ip=&dst_ip=&ip=
               &port=&proto=&verdict=&side=&since=&until=&limit=&cursor=      one page, newest hour first
    GET  /flows/export?...same filters...                                     CSV (Explorer export)
    GET  /flows/{flow_id}/explain                                             the active policy's decision
    GET  /flows/stats                                                         per-agent uploads and drops
    GET  /flows/map?keys=app,env&since=&until=                                nodes and edges
    GET  /flows/map/edge?src=NODE&dst=NODE&since=&until=                      the connections behind an edge

Suggestions and impact preview, which read the draft, are in :mod:`stockade.controller.api.flows_policy`.

Labels in ``*_labels`` are ``key=value,...`` and match the labels a workload had when the flow
was recorded; unmanaged ends carry the IP list they were in then. ``since``/``until`` take ISO
8601 or unix seconds. The map reads the hourly ``flow_links`` rollup (whole hours, the last 24
by default); its edges count distinct (endpoint pair, service) links, each with the worst
verdict reported, and the drill-down lists the address-level connections behind an edge.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import ipaddress
import json
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from stockade.compiler.ir import Direction
from stockade.controller.api.dto.flows import (
    AgentFlowStats,
    DecisionOut,
    EdgeOut,
    EndpointOut,
    ExplainOut,
    FlowKeyOut,
    FlowOut,
    FlowPage,
    MapOut,
    NodeOut,
    UploadOut,
)
from stockade.controller.api.schemas import ErrorOut
from stockade.controller.context import Controller, controller_of, require
from stockade.controller.services.auth import ForbiddenError, Permission, Principal
from stockade.controller.storage import store
from stockade.controller.storage.flowstore import (
    SIDE_CODE,
    VERDICT_OF_CODE,
    FlowFilter,
    FlowStore,
    StoredFlow,
)
from stockade.errors import Issue, NotFoundError, ValidationError
from stockade.evaluator import Evaluation, Evaluator, SideDecision, Verdict
from stockade.model.labels import Label
from stockade.model.policy import Policy
from stockade.model.services import Proto
from stockade.visibility import (
    Connection,
    EncryptionOracle,
    Endpoint,
    EndpointKind,
    FlowKey,
    Link,
    Resolver,
    map_of_links,
    node_id_of,
)
from stockade.visibility.flows import INTERNET, VERDICT_SEVERITY

router = APIRouter()
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 422)}
MAX_INT = 2**31 - 1
DEFAULT_WINDOW = dt.timedelta(hours=24)
_ANY4 = ipaddress.IPv4Address(0)
_LOCK = threading.Lock()
UPLOAD_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["records"], "properties": {
        "sent_at": {"type": "number"}, "dropped": {"type": "integer", "minimum": 0},
        "records": {"type": "array", "maxItems": 10000, "items": {"type": "array", "minItems": 10, "maxItems": 10}},
    }}}}}}


# ---- shared plumbing -----------------------------------------------------------------------


def flowstore(request: Request) -> FlowStore:
    """The app's flow store (made on first use; ``app.state.flow_settings`` may tune it)."""
    state = request.app.state
    fs: FlowStore | None = getattr(state, "flowstore", None)
    if fs is None:
        with _LOCK:
            fs = getattr(state, "flowstore", None)
            if fs is None:
                fs = FlowStore(controller_of(request).engine, getattr(state, "flow_settings", None))
                state.flowstore = fs
    return fs


def active_policy(ctl: Controller) -> Policy:
    with ctl.dist.lock:
        return ctl.dist.compiler.policy


def draft_policy(ctl: Controller) -> Policy:
    with ctl.session() as db:
        objects = store.draft_objects(db)
    with ctl.dist.lock:
        return ctl.dist.assemble(objects)


def _ms(t: dt.datetime | None) -> int | None:
    if t is None:
        return None
    return int((t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp() * 1000)


def window(since: dt.datetime | None, until: dt.datetime | None, default: dt.timedelta) -> tuple[int, int | None]:
    start = since or dt.datetime.now(dt.UTC) - default
    return _ms(start) or 0, _ms(until)


def parse_labels(text: str | None, field: str) -> frozenset[Label] | None:
    if not text:
        return None
    try:
        return frozenset(store.parse_label_filter(text))
    except ValidationError:
        raise ValidationError([Issue("api", 0, field, f"expected key=value[,key=value...], got {text!r}")]) from None


def _eps(fs: FlowStore, labels: frozenset[Label] | None, workload: str | None) -> frozenset[int] | None:
    if labels is None and workload is None:
        return None
    return fs.endpoints_matching(labels or frozenset(), workload)


def _ip(text: str | None, field: str) -> str | None:
    if not text:
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValidationError([Issue("api", 0, field, f"not an IP address: {text!r}")]) from None


def _query(
    src_labels: Annotated[str | None, Query(max_length=512)] = None,
    dst_labels: Annotated[str | None, Query(max_length=512)] = None,
    labels: Annotated[str | None, Query(max_length=512, description="either end")] = None,
    src_workload: Annotated[str | None, Query(max_length=64)] = None,
    dst_workload: Annotated[str | None, Query(max_length=64)] = None,
    workload: Annotated[str | None, Query(max_length=64, description="either end")] = None,
    src_ip: Annotated[str | None, Query(max_length=64)] = None,
    dst_ip: Annotated[str | None, Query(max_length=64)] = None,
    ip: Annotated[str | None, Query(max_length=64, description="either end")] = None,
    port: Annotated[int | None, Query(ge=0, le=65535)] = None,
    proto: Proto | None = None,
    verdict: Annotated[list[Verdict] | None, Query()] = None,
    side: Direction | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> FlowQuery:
    return FlowQuery(src_labels=src_labels, dst_labels=dst_labels, labels=labels, src_workload=src_workload,
                     dst_workload=dst_workload, workload=workload, src_ip=src_ip, dst_ip=dst_ip, ip=ip, port=port,
                     proto=proto, verdict=verdict, side=side, since=since, until=until)


# ---- ingestion ---------------------------------------------------------------------------------



class FlowQuery(BaseModel):
    src_labels: str | None = None
    dst_labels: str | None = None
    labels: str | None = Field(None, description="either end")
    src_workload: str | None = None
    dst_workload: str | None = None
    workload: str | None = Field(None, description="either end")
    src_ip: str | None = None
    dst_ip: str | None = None
    ip: str | None = Field(None, description="either end")
    port: Annotated[int, Field(ge=0, le=65535)] | None = None
    proto: Proto | None = None
    verdict: list[Verdict] | None = None
    side: Direction | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    def to_filter(self, fs: FlowStore) -> FlowFilter:
        return FlowFilter(
            since_ms=_ms(self.since), until_ms=_ms(self.until),
            src_ip=_ip(self.src_ip, "src_ip"), dst_ip=_ip(self.dst_ip, "dst_ip"), any_ip=_ip(self.ip, "ip"),
            src_eps=_eps(fs, parse_labels(self.src_labels, "src_labels"), self.src_workload),
            dst_eps=_eps(fs, parse_labels(self.dst_labels, "dst_labels"), self.dst_workload),
            any_eps=_eps(fs, parse_labels(self.labels, "labels"), self.workload),
            port=self.port, proto=self.proto.value if self.proto else None,
            verdicts=frozenset(VERDICT_SEVERITY[v] for v in self.verdict) if self.verdict else None,
            sides=frozenset({SIDE_CODE[self.side]}) if self.side else None,
        )

@router.post("/agents/{agent_id}/flows", tags=["Agent protocol"], responses=ERRORS, status_code=202,
             operation_id="upload-flows", openapi_extra=UPLOAD_BODY)
async def upload_flows(request: Request, agent_id: str,
                       principal: Annotated[Principal, Depends(require(Permission.AGENT))]) -> UploadOut:
    """Flow summaries from an agent; each is resolved to workloads and labels as it is stored."""
    if principal.agent_id != agent_id:
        raise ForbiddenError("an agent may only act for itself")
    raw = await request.body()
    fs = flowstore(request)
    policy = active_policy(controller_of(request))

    def ingest() -> int:  # parsing too runs off the event loop
        try:
            body = json.loads(raw)
        except ValueError:
            raise ValidationError([Issue("api", 0, "body", "not JSON")]) from None
        return fs.ingest(agent_id, principal.workload, body, policy, time.time())

    accepted = await run_in_threadpool(ingest)
    controller_of(request).metrics.flow_records.inc(accepted)
    return UploadOut(accepted=accepted)


# ---- the Explorer --------------------------------------------------------------------------------


def _endpoint_out(fs: FlowStore, res: Resolver, addr: Any, ep: int) -> EndpointOut:
    """An end as resolved at ingest: the workload and its labels then, or the IP list then."""
    info = fs.endpoints.get(ep)
    if info is not None and info.managed:
        return EndpointOut(ip=str(addr), workload=info.workload, labels={x.key: x.value for x in info.labels},
                           ip_list=None)
    if info is not None:
        return EndpointOut(ip=str(addr), ip_list=info.ip_list)
    e = res.endpoint(addr)
    return EndpointOut(ip=str(addr), ip_list=e.name if e.kind is EndpointKind.IP_LIST else None)


def as_time(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def _flow_out(fs: FlowStore, res: Resolver, f: StoredFlow) -> FlowOut:
    k = f.key
    return FlowOut(id=f.cursor, first_seen=as_time(f.first_seen), last_seen=as_time(f.last_seen),
                   src=_endpoint_out(fs, res, k.src, f.src_ep), dst=_endpoint_out(fs, res, k.dst, f.dst_ep),
                   proto=k.proto, port=k.port, service=k.service_text(), side=f.side, reporter=f.reporter,
                   verdict=f.verdict, rule_id=f.rule_id, count=f.count)


@router.get("/flows", tags=["Flows"], responses=ERRORS, operation_id="list-flows")
def list_flows(request: Request, principal: Annotated[Principal, Depends(require(Permission.READ))],
               q: Annotated[FlowQuery, Depends(_query)],
               limit: Annotated[int, Query(ge=1, le=1000)] = 100,
               cursor: Annotated[str | None, Query(max_length=64)] = None) -> FlowPage:
    fs = flowstore(request)
    res = Resolver(active_policy(controller_of(request)))
    rows, nxt = fs.query(q.to_filter(fs), cursor=cursor, limit=limit, now=time.time())
    return FlowPage(items=[_flow_out(fs, res, r) for r in rows], next_cursor=nxt)


CSV_COLUMNS = ("first_seen", "last_seen", "src_ip", "src_workload", "src_labels", "src_ip_list", "dst_ip",
               "dst_workload", "dst_labels", "dst_ip_list", "proto", "port", "side", "reporter", "verdict", "rule_id",
               "count")


@router.get("/flows/export", tags=["Flows"], responses={200: {"content": {"text/csv": {}}}, **ERRORS},
            operation_id="export-flows", response_class=StreamingResponse)
def export_flows(request: Request, principal: Annotated[Principal, Depends(require(Permission.READ))],
                 q: Annotated[FlowQuery, Depends(_query)]) -> StreamingResponse:
    fs = flowstore(request)
    res = Resolver(active_policy(controller_of(request)))
    f = q.to_filter(fs)
    now = time.time()

    def lines() -> Iterator[str]:
        buf = io.StringIO()
        out = csv.writer(buf)
        out.writerow(CSV_COLUMNS)
        for n, row in enumerate(fs.iterate(f, now)):
            fo = _flow_out(fs, res, row)
            out.writerow([fo.first_seen.isoformat(), fo.last_seen.isoformat(),
                          *_csv_end(fo.src), *_csv_end(fo.dst), fo.proto.value, "" if fo.port is None else fo.port,
                          fo.side.name.lower(), fo.reporter, fo.verdict.value, fo.rule_id, fo.count])
            if n % 500 == 0:
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
        yield buf.getvalue()

    return StreamingResponse(lines(), media_type="text/csv",
                             headers={"Content-Disposition": 'attachment; filename="flows.csv"'})


def _csv_end(e: EndpointOut) -> list[str]:
    return [e.ip, e.workload or "", ",".join(f"{k}={v}" for k, v in sorted(e.labels.items())), e.ip_list or ""]


def _decision(d: SideDecision | None) -> DecisionOut | None:
    return DecisionOut(workload=d.workload, action=d.action, rule_id=d.rule_id, encrypted=d.encrypted) if d else None


def _explain_out(key_out: FlowKeyOut, ev: Evaluation, c: Connection | None) -> ExplainOut:
    return ExplainOut(flow=key_out, verdict=ev.verdict, reported=c.verdict if c else None,
                      outbound=_decision(ev.outbound), inbound=_decision(ev.inbound),
                      reported_outbound_rule=c.outbound_rule if c else None,
                      reported_inbound_rule=c.inbound_rule if c else None, count=c.count if c else 0,
                      encrypted=ev.encrypted, encrypted_by=ev.encrypted_by or None)


@router.get("/flows/{flow_id}/explain", tags=["Flows"], responses=ERRORS, operation_id="explain-flow")
def explain_flow(request: Request, flow_id: Annotated[str, Path(max_length=40)],
                 principal: Annotated[Principal, Depends(require(Permission.READ))]) -> ExplainOut:
    """The rule that decides a recorded flow under the active policy, beside what was reported."""
    fs = flowstore(request)
    b_text, _, h_text = flow_id.partition(".")
    if not (b_text.isdigit() and h_text.isdigit()) or len(flow_id) > 40:
        raise NotFoundError(f"no flow {flow_id!r}")
    fs.compact(wait=True)
    row = fs.get(int(b_text), int(h_text))
    if row is None:
        raise NotFoundError(f"no flow {flow_id!r}")
    policy = active_policy(controller_of(request))
    res = Resolver(policy)
    k = row.key
    ev = Evaluator(policy).evaluate(k.src, k.dst, k.proto, k.port)
    key_out = FlowKeyOut(src=_endpoint_out(fs, res, k.src, row.src_ep), dst=_endpoint_out(fs, res, k.dst, row.dst_ep),
                         proto=k.proto, port=k.port, service=k.service_text())
    rule = row.rule_id
    c = Connection(k, row.verdict, row.count, row.first_seen, row.last_seen,
                   rule if row.side is Direction.OUTBOUND else None, rule if row.side is Direction.INBOUND else None)
    return _explain_out(key_out, ev, c)


@router.get("/flows/stats", tags=["Flows"], responses=ERRORS, operation_id="flow-upload-stats")
def flow_stats(request: Request,
               principal: Annotated[Principal, Depends(require(Permission.READ))]) -> list[AgentFlowStats]:
    fs = flowstore(request)
    return [AgentFlowStats(agent_id=s["agent_id"], workload=s["workload"], records=s["records"], batches=s["batches"],
                           dropped=s["dropped"], last_upload=as_time(s["last_upload"] / 1000))
            for s in fs.agent_stats()]


# ---- connections out of stored flows -------------------------------------------------------------


def observed(fs: FlowStore, f: FlowFilter) -> list[tuple[Connection, int, int]]:
    """Recorded connections (both sides merged), each with its ingest-time endpoint ids."""
    rows = fs.aggregate(f, time.time())
    acc: dict[tuple[Any, ...], list[Any]] = {}
    for src, dst, sep, dep, proto, port, side, verdict, count, first, last in rows:
        key = (src, dst, int(sep), int(dep), proto, port)
        a = acc.get(key)
        if a is None:
            a = acc[key] = [int(verdict), 0, 0, first, last]
        else:
            a[0] = max(a[0], int(verdict))
            a[3], a[4] = min(a[3], first), max(a[4], last)
        a[1 + int(side)] += int(count)
    out = []
    for (src, dst, sep, dep, proto, port), (verdict, n_out, n_in, first, last) in acc.items():
        k = FlowKey(ipaddress.ip_address(src), ipaddress.ip_address(dst), Proto(proto), port)
        out.append((Connection(k, VERDICT_OF_CODE[verdict], max(n_out, n_in), first / 1000, last / 1000), sep, dep))
    out.sort(key=lambda t: t[0].key.sort_key())
    return out


def merged_connections(items: list[tuple[Connection, int, int]]) -> list[Connection]:
    """IP-level connections (endpoint ids dropped, duplicates merged)."""
    acc: dict[FlowKey, Connection] = {}
    for c, _s, _d in items:
        prev = acc.get(c.key)
        if prev is None:
            acc[c.key] = c
        else:
            worse = prev.verdict if VERDICT_SEVERITY[prev.verdict] >= VERDICT_SEVERITY[c.verdict] else c.verdict
            acc[c.key] = Connection(c.key, worse, prev.count + c.count, min(prev.first_seen, c.first_seen),
                                    max(prev.last_seen, c.last_seen))
    return list(acc.values())


def _endpoint(fs: FlowStore, res: Resolver | None, addr: Any, ep: int) -> Endpoint:
    info = fs.endpoints.get(ep)
    if info is not None and info.managed:
        return Endpoint(addr, EndpointKind.WORKLOAD, info.workload, info.labels)
    if info is not None and info.ip_list:
        return Endpoint(addr, EndpointKind.IP_LIST, info.ip_list)
    if info is not None or res is None or addr is None:
        return Endpoint(addr, EndpointKind.INTERNET, INTERNET)
    return res.endpoint(addr)


def node_endpoints(fs: FlowStore, node: str, keys: tuple[str, ...]) -> frozenset[int]:
    """The endpoint ids that make up a map node (an app group, an IP list, the internet)."""
    return frozenset(e.id for e in list(fs.endpoints.values())
                     if node_id_of(_endpoint(fs, None, None, e.id), keys) == node)


# ---- the application map ----------------------------------------------------------------------------


def group_keys(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    if not keys or len(keys) > 8:
        raise ValidationError([Issue("api", 0, "keys", "one to eight label keys, comma separated")])
    return keys


@router.get("/flows/map", tags=["Flows"], responses=ERRORS, operation_id="application-map")
def application_map(request: Request, principal: Annotated[Principal, Depends(require(Permission.READ))],
                    keys: Annotated[str, Query(max_length=200)] = "app,env",
                    since: dt.datetime | None = None, until: dt.datetime | None = None) -> MapOut:
    """App groups (workloads grouped by ``keys``) and unmanaged peers, with the observed traffic."""
    gk = group_keys(keys)
    fs = flowstore(request)
    policy = active_policy(controller_of(request))
    lo, hi = window(since, until, DEFAULT_WINDOW)
    encrypts = EncryptionOracle(policy)
    links = []
    for s, d, proto, port, v, seen in fs.map_rows(lo, hi, time.time()):
        src, dst = _endpoint(fs, None, None, s), _endpoint(fs, None, None, d)
        links.append(Link(src, dst, FlowKey(_ANY4, _ANY4, Proto(proto), port).service_text(), VERDICT_OF_CODE[v],
                          seen, encrypted=encrypts(src, dst, Proto(proto), port)))
    m = map_of_links(policy, links, gk)
    return MapOut(
        group_keys=list(gk), since=as_time(lo / 1000), until=as_time(hi / 1000) if hi else None,
        nodes=[NodeOut(id=n.id, kind=n.kind.value, name=n.name, labels={x.key: x.value for x in n.labels},
                       workloads=list(n.workloads)) for n in m.nodes],
        edges=[EdgeOut(src=e.src, dst=e.dst, connections=e.connections, count=e.count, allowed=e.mix.allowed,
                       potentially_blocked=e.mix.potentially_blocked, blocked=e.mix.blocked,
                       services=list(e.services), encrypted=e.encrypted) for e in m.edges],
    )


@router.get("/flows/map/edge", tags=["Flows"], responses=ERRORS, operation_id="application-map-edge")
def map_edge(request: Request, principal: Annotated[Principal, Depends(require(Permission.READ))],
             src: Annotated[str, Query(max_length=600)], dst: Annotated[str, Query(max_length=600)],
             keys: Annotated[str, Query(max_length=200)] = "app,env",
             since: dt.datetime | None = None, until: dt.datetime | None = None,
             limit: Annotated[int, Query(ge=1, le=5000)] = 500) -> list[ExplainOut]:
    """Drill-down: the connections between two map nodes and the rule deciding each now."""
    gk = group_keys(keys)
    fs = flowstore(request)
    policy = active_policy(controller_of(request))
    res = Resolver(policy)
    ev = Evaluator(policy)
    lo, hi = window(since, until, DEFAULT_WINDOW)
    out: list[ExplainOut] = []
    ends = FlowFilter(since_ms=lo, until_ms=hi, src_eps=node_endpoints(fs, src, gk),
                      dst_eps=node_endpoints(fs, dst, gk))
    for c, s, d in observed(fs, ends):
        se, de = _endpoint(fs, res, c.key.src, s), _endpoint(fs, res, c.key.dst, d)
        if node_id_of(se, gk) != src or node_id_of(de, gk) != dst:
            continue
        k = c.key
        key_out = FlowKeyOut(src=_endpoint_out(fs, res, k.src, s), dst=_endpoint_out(fs, res, k.dst, d),
                             proto=k.proto, port=k.port, service=k.service_text())
        out.append(_explain_out(key_out, ev.evaluate(k.src, k.dst, k.proto, k.port), c))
        if len(out) >= limit:
            break
    return out
