"""Visibility commands against a running controller: ``flows``, ``suggest`` and ``policy impact``.

* ``stockade flows [--src-workload W] [--dst-labels role=db] [--port 5432] [--verdict blocked]
  [--since 1h] [--csv]`` - the Explorer: recorded flows as a table, or every match as CSV;
* ``stockade suggest --app shop --env prod [--accept [--rule ID]...]`` - rules that would allow
  the app group's observed traffic, and accepting them into the draft;
* ``stockade policy impact [--since 7d]`` - the recorded connections whose verdict the draft
  would change, newly blocked first.

Connection options are the policy commands' (``--controller``, ``--api-key``, ``--ca-cert`` or
the ``STOCKADE_*`` variables). Times are ISO 8601, unix seconds, or a duration back from now
(``90s``, ``15m``, ``24h``, ``7d``).
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from pathlib import Path
from typing import Any

import click

from stockade.cli import main
from stockade.cli.controller_cmds import _client, _fail, client_options, policy_group
from stockade.model.rule_ids import rule_title

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def when(text: str | None) -> str | None:
    """``24h`` -> the ISO time 24 hours ago; ISO and unix seconds pass through."""
    if not text:
        return None
    m = _DURATION.match(text.strip())
    if m:
        back = dt.timedelta(seconds=int(m.group(1)) * _UNIT[m.group(2)])
        return (dt.datetime.now(dt.UTC) - back).isoformat()
    try:
        float(text)
        return text
    except ValueError:
        pass
    try:
        dt.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected ISO 8601, unix seconds or a duration like 24h") from None
    return text


def _end(e: dict[str, Any]) -> str:
    if e.get("workload"):
        return str(e["workload"])
    return f"{e['ip']} ({e['ip_list']})" if e.get("ip_list") else str(e["ip"])


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


_FILTERS = ("src_labels", "dst_labels", "labels", "src_workload", "dst_workload", "workload", "src_ip", "dst_ip",
            "ip", "port", "proto", "side")


@main.command("flows")
@click.option("--src-labels", help="key=value,... of the source workload")
@click.option("--dst-labels", help="key=value,... of the destination workload")
@click.option("--labels", help="key=value,... of either end")
@click.option("--src-workload")
@click.option("--dst-workload")
@click.option("--workload", help="either end")
@click.option("--src-ip")
@click.option("--dst-ip")
@click.option("--ip", help="either end")
@click.option("--port", type=int)
@click.option("--proto", type=click.Choice(["tcp", "udp", "icmp", "icmpv6", "any"]))
@click.option("--side", type=click.Choice(["in", "out"]), help="reported by the destination (in) or source (out)")
@click.option("--verdict", multiple=True, type=click.Choice(["allowed", "potentially-blocked", "blocked"]))
@click.option("--since", help="ISO time, unix seconds or a duration back (24h)")
@click.option("--until")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--csv", "as_csv", is_flag=True, help="every matching flow as CSV on stdout")
@client_options
def flows(as_csv: bool, limit: int, since: str | None, until: str | None, verdict: tuple[str, ...],
          controller_url: str | None, api_key: str | None, ca_cert: Path | None, **filters: Any) -> None:
    """Recorded flows (the Explorer), newest first."""
    params: dict[str, Any] = {k: v for k, v in filters.items() if k in _FILTERS and v is not None}
    params.update({k: v for k, v in (("since", when(since)), ("until", when(until))) if v})
    if verdict:
        params["verdict"] = list(verdict)
    with _client(controller_url, api_key, ca_cert) as client:
        if as_csv:
            with client.stream("GET", "/flows/export", params=params) as r:
                if r.status_code != 200:
                    r.read()
                    _fail(r)
                for chunk in r.iter_text():
                    sys.stdout.write(chunk)
            return
        r = client.get("/flows", params={**params, "limit": limit})
    if r.status_code != 200:
        _fail(r)
    page = r.json()
    rows = [["LAST SEEN", "SOURCE", "DESTINATION", "SERVICE", "SIDE", "VERDICT", "RULE", "COUNT"]]
    for f in page["items"]:
        rows.append([f["last_seen"][:19].replace("T", " "), _end(f["src"]), _end(f["dst"]), f["service"],
                     f["side"], f["verdict"], rule_title(f["rule_id"]), str(f["count"])])
    click.echo(_table(rows) if len(rows) > 1 else "no flows")
    if page.get("next_cursor"):
        click.echo("(more: raise --limit or use --csv for all)")


def _selector(sel: dict[str, Any]) -> str:
    if "ip_list" in sel:
        return f"iplist:{sel['ip_list']}"
    if sel.get("all"):
        return "all"
    parts = [f"{k}={v}" for k, v in sel.get("labels", {}).items()]
    for k, v in sel.get("exclude", {}).items():
        parts += [f"!{k}={x}" for x in (v if isinstance(v, list) else [v])]
    return "{" + ",".join(parts) + "}"


@main.command("suggest")
@click.option("--app", help="the app group's app label")
@click.option("--env", help="the app group's env label")
@click.option("--label", "labels", multiple=True, help="other grouping labels, key=value (with --keys)")
@click.option("--keys", default="app,env", show_default=True, help="grouping label keys")
@click.option("--role-key", default="role", show_default=True)
@click.option("--since", default="24h", show_default=True)
@click.option("--until")
@click.option("--include-allowed", is_flag=True, help="also flows the draft already allows")
@click.option("--accept", is_flag=True, help="create the suggested rules in the draft")
@click.option("--rule", "rules", multiple=True, help="with --accept: only these rule ids")
@client_options
def suggest_cmd(app: str | None, env: str | None, labels: tuple[str, ...], keys: str, role_key: str, since: str,
                until: str | None, include_allowed: bool, accept: bool, rules: tuple[str, ...],
                controller_url: str | None, api_key: str | None, ca_cert: Path | None) -> None:
    """Rules that would allow an app group's observed traffic (and, with --accept, create them)."""
    group = [f"{k}={v}" for k, v in (("app", app), ("env", env)) if v] + list(labels)
    if not group:
        raise click.UsageError("name the group: --app/--env or --label key=value")
    query = {"group": ",".join(group), "keys": keys, "role_key": role_key, "since": when(since),
             "include_allowed": str(include_allowed).lower()}
    if until:
        query["until"] = when(until)
    with _client(controller_url, api_key, ca_cert) as client:
        r = client.get("/flows/suggestions", params=query)
        if r.status_code != 200:
            _fail(r)
        s = r.json()
        click.echo(f"{s['group']}: {s['considered']} connection(s) observed, {s['already_allowed']} already "
                   f"allowed by the draft; {len(s['rules'])} rule(s) for ruleset {s['ruleset']}")
        for n, rule in enumerate(s["rules"], start=1):  # numbered from 1, as the accepted ruleset's rules
            cons = " | ".join(_selector(x) for x in rule["consumers"])
            provs = " | ".join(_selector(x) for x in rule["providers"])
            scope = " (extra-scope)" if rule["consumers_scope"] == "global" else ""
            click.echo(f"  rule {n} [id {rule['id']}] {cons} -> {provs} on {rule['service']} "
                       f"({', '.join(rule['ports'])}){scope}: {rule['connections']} connection(s), "
                       f"seen {rule['count']}x")
        for svc in s["new_services"]:
            click.echo(f"  new service {svc['name']}: {', '.join(svc['ports'])}")
        for ipl in s["new_ip_lists"]:
            click.echo(f"  new IP list {ipl['name']}: {', '.join(ipl['include'])}")
        for other, n in s["elsewhere"].items():
            click.echo(f"  {n} connection(s) to {other}: suggest for that group")
        if not accept:
            return
        body: dict[str, Any] = {"group": query["group"], "keys": keys, "role_key": role_key,
                                "since": query["since"], "include_allowed": include_allowed,
                                "rules": list(rules) or None}
        if until:
            body["until"] = query["until"]
        r = client.post("/flows/suggestions/accept", json=body)
    if r.status_code != 201:
        _fail(r)
    out = r.json()
    click.echo(f"accepted {out['rules']} rule(s) into the draft as ruleset {out['ruleset']}"
               + (f"; services {', '.join(out['services'])}" if out["services"] else "")
               + (f"; IP lists {', '.join(out['ip_lists'])}" if out["ip_lists"] else ""))


@policy_group.command("impact")
@click.option("--since", default=None, help="window start (default: the controller's impact window)")
@click.option("--until")
@click.option("--limit", type=click.IntRange(0, 10000), default=50, show_default=True)
@client_options
def policy_impact(since: str | None, until: str | None, limit: int, controller_url: str | None, api_key: str | None,
                  ca_cert: Path | None) -> None:
    """Recorded connections whose verdict provisioning the draft would change (newly blocked first)."""
    params: dict[str, Any] = {"limit": limit}
    params.update({k: v for k, v in (("since", when(since)), ("until", when(until))) if v})
    with _client(controller_url, api_key, ca_cert) as client:
        r = client.get("/policy/impact", params=params)
    if r.status_code != 200:
        _fail(r)
    imp = r.json()
    click.echo(f"{imp['evaluated']} recorded connection(s) replayed: {imp['newly_blocked']} newly blocked, "
               f"{imp['newly_potentially_blocked']} newly potentially blocked, {imp['newly_allowed']} newly allowed, "
               f"{imp['no_longer_blocked']} no longer blocked")
    for i in imp["items"]:
        click.echo(f"  {i['change']}: {i['src']} -> {i['dst']} {i['service']} (seen {i['count']}x, was {i['before']}): "
                   f"{i['sentence']}")
    for w in imp.get("widened", []):
        click.echo(f"  widened: {w['sentence']}")
    if imp.get("confirm"):
        click.echo("provisioning this draft needs --proceed: " + "; ".join(imp["confirm"]))
    if imp["newly_blocked"]:
        sys.exit(3)
