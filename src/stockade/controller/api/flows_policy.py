"""Visibility routes that read the draft: policy suggestions (and accepting them) and impact preview.

::

    GET  /flows/suggestions?group=app=shop,env=prod&keys=app,env&role_key=role&since=&until=&include_allowed=
    POST /flows/suggestions/accept {group, keys, role_key, since, until, include_allowed, rules}   (admin)
    GET  /policy/impact?since=&until=&limit=          recorded connections whose verdict the draft changes

Suggestions are computed against the draft (reusing its services and IP lists, skipping what it
already allows) over the last 24 hours by default; accepting recomputes them and creates the
chosen rules as a new ruleset with the services and IP lists they need. Impact replays the
recorded connections of ``FlowSettings.impact_window_hours`` through the reference evaluator;
:func:`provision_guard` is what ``POST /policy/provision`` calls first: it refuses (409) when
the draft would newly block recorded connections *or widen* (newly allow recorded connections,
an existing rule reaching more workloads, a rule of an all-workloads ruleset reaching any), unless
told to proceed. Impact texts are in words, rules numbered from 1 ("ruleset shop rule 1").
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy.orm import Session

from stockade.controller.api.dto.flows import (
    AcceptIn,
    AcceptOut,
    ImpactItemOut,
    ImpactOut,
    SuggestedRuleOut,
    SuggestionsOut,
    WideningOut,
)
from stockade.controller.api.flows import (
    DEFAULT_WINDOW,
    ERRORS,
    active_policy,
    as_time,
    draft_policy,
    flowstore,
    group_keys,
    merged_connections,
    observed,
    parse_labels,
    window,
)
from stockade.controller.context import Controller, controller_of, require
from stockade.controller.services import codec, scope
from stockade.controller.services.auth import Permission, Principal
from stockade.controller.storage import store
from stockade.controller.storage.flowstore import HOUR_MS, FlowFilter, FlowStore
from stockade.errors import ConflictError
from stockade.evaluator import Evaluation
from stockade.model.labels import Label
from stockade.model.rules import Ruleset
from stockade.visibility import ChangeKind, Impact, Suggestions, accept, preview, suggest
from stockade.visibility.impact import RuleWidening, widenings

router = APIRouter()


# ---- suggestions ------------------------------------------------------------------------------------


def _group(text: str) -> tuple[Label, ...]:
    return tuple(sorted(parse_labels(text, "group") or frozenset()))


def _suggest(ctl: Controller, fs: FlowStore, group: str, keys: str, role_key: str, since: dt.datetime | None,
             until: dt.datetime | None, include_allowed: bool) -> Suggestions:
    gk = group_keys(keys)
    draft = draft_policy(ctl)
    lo, hi = window(since, until, DEFAULT_WINDOW)
    conns = merged_connections(observed(fs, FlowFilter(since_ms=lo, until_ms=hi)))
    return suggest(draft, conns, _group(group), keys=gk, role_key=role_key, include_allowed=include_allowed)


@router.get("/flows/suggestions", tags=["Flows"], responses=ERRORS, operation_id="suggest-rules")
def suggestions(request: Request, principal: Annotated[Principal, Depends(require(Permission.READ))],
                group: Annotated[str, Query(max_length=512, description="e.g. app=shop,env=prod")],
                keys: Annotated[str, Query(max_length=200)] = "app,env",
                role_key: Annotated[str, Query(max_length=63)] = "role",
                since: dt.datetime | None = None, until: dt.datetime | None = None,
                include_allowed: bool = False) -> SuggestionsOut:
    """Label-level rules that would allow the app group's observed traffic (against the draft)."""
    s = _suggest(controller_of(request), flowstore(request), group, keys, role_key, since, until, include_allowed)
    rules = []
    for r in s.rules:
        body = codec.ruleset_to(Ruleset(s.ruleset, (s.scope,), (r.to_rule(),)))
        rb = body["rules"][0]
        rules.append(SuggestedRuleOut(id=r.id, consumers=rb["consumers"], providers=rb["providers"],
                                      consumers_scope=r.consumers_scope.value, service=r.service,
                                      ports=[str(e) for e in r.entries], connections=r.connections, count=r.count))
    scope = codec.ruleset_to(Ruleset(s.ruleset, (s.scope,), ()))["scope"][0]
    return SuggestionsOut(
        group=s.group, ruleset=s.ruleset, scope=scope, rules=rules,
        new_services=[codec.service_to(x) for x in s.services], new_ip_lists=[codec.ip_list_to(x) for x in s.ip_lists],
        considered=s.considered, already_allowed=s.already_allowed,
        elsewhere={e.group: e.connections for e in s.elsewhere},
    )


@router.post("/flows/suggestions/accept", tags=["Flows"], responses=ERRORS, status_code=201,
             operation_id="accept-suggestions")
def accept_suggestions(request: Request, body: AcceptIn,
                       principal: Annotated[Principal, Depends(require(Permission.WRITE))]) -> AcceptOut:
    """Create the chosen suggested rules in the draft (a new ruleset, plus services and IP lists)."""
    ctl = controller_of(request)
    s = _suggest(ctl, flowstore(request), body.group, body.keys, body.role_key, body.since, body.until,
                 body.include_allowed)
    acc = accept(s, body.rules)
    if not acc.ruleset.rules:
        raise ConflictError("nothing to accept: no suggested rules")
    def create(db: Session) -> None:
        for svc in acc.services:
            store.create_object(db, "service", codec.service_to(svc), principal.actor)
        for ipl in acc.ip_lists:
            store.create_object(db, "ip_list", codec.ip_list_to(ipl), principal.actor)
        store.create_object(db, "ruleset", codec.ruleset_to(acc.ruleset), principal.actor)

    with ctl.sessions.begin() as db:  # a scoped principal's accept is refused if it reaches outside
        scope.guard_draft_write(db, ctl.dist, principal, lambda: create(db))
    return AcceptOut(ruleset=acc.ruleset.name, services=[x.name for x in acc.services],
                     ip_lists=[x.name for x in acc.ip_lists], rules=len(acc.ruleset.rules))


# ---- impact ------------------------------------------------------------------------------------------


def _rules(ev: Evaluation) -> list[str]:
    return [f"{d.workload}:{d.action}:{d.rule_id}" for d in (ev.outbound, ev.inbound) if d is not None]


def _widening_out(w: RuleWidening) -> WideningOut:
    return WideningOut(ruleset=w.ruleset, rule=w.index + 1, rule_id=w.rule_id, added=list(w.added), reaches=w.reaches,
                       new_rule=w.new_rule, every_workload=w.every_workload, needs_confirmation=w.needs_confirmation,
                       sentence=w.sentence)


def _connections(n: int) -> str:
    return f"{n} recorded connection{'s' if n != 1 else ''}"


def confirmations(out: ImpactOut) -> list[str]:
    """What provisioning must be confirmed for, in words: narrowing and widening alike."""
    found = []
    if out.newly_blocked:
        found.append(f"it would newly block {_connections(out.newly_blocked)}")
    if out.newly_allowed:
        found.append(f"it would newly allow {_connections(out.newly_allowed)}")
    found.extend(w.sentence for w in out.widened if w.needs_confirmation)
    return found


def impact_of(ctl: Controller, fs: FlowStore, since_ms: int, until_ms: int | None, limit: int) -> ImpactOut:
    conns = merged_connections(observed(fs, FlowFilter(since_ms=since_ms, until_ms=until_ms)))
    active, draft = active_policy(ctl), draft_policy(ctl)
    imp: Impact = preview(active, draft, conns) if conns else Impact((), 0)
    items = [ImpactItemOut(change=i.change.value, src=str(i.connection.key.src), dst=str(i.connection.key.dst),
                           proto=i.connection.key.proto, port=i.connection.key.port,
                           service=i.connection.key.service_text(), count=i.connection.count,
                           reported=i.connection.verdict, before=i.before.verdict, after=i.after.verdict,
                           before_rules=_rules(i.before), after_rules=_rules(i.after), sentence=i.sentence)
             for i in imp.items[:limit]]
    out = ImpactOut(since=as_time(since_ms / 1000), until=as_time(until_ms / 1000) if until_ms else None,
                    evaluated=imp.evaluated, newly_blocked=imp.count(ChangeKind.NEWLY_BLOCKED),
                    newly_potentially_blocked=imp.count(ChangeKind.NEWLY_POTENTIALLY_BLOCKED),
                    newly_allowed=imp.count(ChangeKind.NEWLY_ALLOWED),
                    no_longer_blocked=imp.count(ChangeKind.NO_LONGER_BLOCKED), items=items,
                    widened=[_widening_out(w) for w in widenings(active, draft)])
    return out.model_copy(update={"confirm": confirmations(out)})


@router.get("/policy/impact", tags=["Policy"], responses=ERRORS, operation_id="policy-impact")
def policy_impact(request: Request, principal: Annotated[Principal, Depends(require(Permission.READ))],
                  since: dt.datetime | None = None, until: dt.datetime | None = None,
                  limit: Annotated[int, Query(ge=0, le=10000)] = 500) -> ImpactOut:
    """Recorded connections whose verdict the draft would change, newly blocked first."""
    fs = flowstore(request)
    lo, hi = window(since, until, dt.timedelta(hours=fs.settings.impact_window_hours))
    return impact_of(controller_of(request), fs, lo, hi, limit)


class ImpactRefusedError(ConflictError):
    """Provisioning would newly block or widen and was not told to proceed (HTTP 409).

    The message is in the user's terms (what would change); each client says how to confirm
    (the console with a dialog, the CLI with ``--proceed``, the API with ``?proceed=true``).
    """


def provision_guard(request: Request, proceed: bool) -> dict[str, Any]:
    """The impact summary of provisioning the draft now; refuses when it blocks or widens.

    Called by ``POST /policy/provision`` before it provisions (``?proceed=true`` overrides).
    """
    fs = flowstore(request)
    since = int(time.time() * 1000) - fs.settings.impact_window_hours * HOUR_MS
    out = impact_of(controller_of(request), fs, since, None, 20)
    summary = out.model_dump(mode="json")
    if out.confirm and not proceed:
        raise ImpactRefusedError("Provisioning needs confirmation: " + "; ".join(out.confirm) + ".")
    return summary
