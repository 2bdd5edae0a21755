"""The agent's first contact: the stored credential, or an enrolment with the activation code.

A credential from an earlier run is used as is (and, when it predates agent keys, a host key is
bound to it now, best effort). Otherwise the activation code enrols this host, retried with
backoff while the controller is unreachable; only the public half of the host key leaves.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from stockade.agent.backoff import Backoff, BackoffPolicy
from stockade.agent.host import HostReport
from stockade.agent.state import Credential, StateDir
from stockade.agent.transport import ControllerClient, ControllerUnreachableError
from stockade.agent_signature import new_private_key, public_key_text
from stockade.errors import AuthError, StockadeError

if TYPE_CHECKING:
    from stockade.agent.agent import ClientFactory

log = logging.getLogger("stockade.agent")


@dataclass(frozen=True)
class EnrolDeps:
    """What enrolment needs from the running agent."""

    client_factory: ClientFactory
    host_reader: Callable[[], HostReport]
    backoff: BackoffPolicy
    stop: threading.Event
    sleep: Callable[[float], bool]


def enrol_client(state: StateDir, controller: str | None, activation_code: str | None,
                 deps: EnrolDeps) -> tuple[ControllerClient, Credential] | None:
    """A client holding this agent's credential, or None when stopped before enrolment succeeded."""
    cred = state.load_credential()
    if cred is not None:
        client = deps.client_factory(cred.controller, state.load_ca())
        client.use_credential(cred, state.load_ca())
        if cred.key_file is None:
            cred = _bind_key(state, client, cred)
        return client, cred
    code = activation_code or state.load_activation_code()
    if not controller or not code:
        raise AuthError("not enrolled: --controller and an activation code (--activation-code-file or "
                        "STOCKADE_ACTIVATION_CODE) are needed the first time")
    public_key = public_key_text(state.load_or_create_key())  # made here; only its public half leaves
    client = deps.client_factory(controller, state.load_ca())
    backoff = Backoff(deps.backoff)
    while not deps.stop.is_set():
        try:
            enrollment = client.enroll(code, deps.host_reader(), public_key)
        except ControllerUnreachableError as exc:
            delay = backoff.next_delay()
            log.info("enrolment: controller unreachable (%s); retrying in %.2fs", exc, delay)
            deps.sleep(delay)
            continue
        except AuthError:
            client.close()
            raise
        except StockadeError as exc:  # e.g. the workload already has an agent: may be revoked later
            delay = deps.backoff.maximum
            log.error("enrolment refused (%s); retrying in %.1fs", exc, delay)
            deps.sleep(delay)
            continue
        if enrollment.ca_pem:
            state.save_ca(enrollment.ca_pem)
        cred = Credential(controller, enrollment.agent_id, enrollment.token, enrollment.workload, state.key_path)
        state.save_credential(cred)
        state.clear_activation_code()
        client.use_credential(cred, enrollment.ca_pem or state.load_ca())
        log.info("enrolled as agent %s for workload %s", cred.agent_id, cred.workload)
        return client, cred
    client.close()
    return None


def _bind_key(state: StateDir, client: ControllerClient, cred: Credential) -> Credential:
    """Enrolled before agent keys: bind one now, so a copied token stops being enough.
    Best effort: an unreachable controller leaves the token working alone until next start."""
    key = new_private_key()
    state.save_next_key(key)
    try:
        client.rotate_key(key)
    except StockadeError as exc:
        state.drop_next_key()
        log.warning("could not bind a key to this agent's credential (%s); will retry at next start", exc)
        return cred
    state.promote_next_key()
    bound = replace(cred, key_file=state.key_path)
    client.use_credential(bound, state.load_ca())
    log.info("bound a host key to agent %s: its requests are signed from now on", cred.agent_id)
    return bound
