"""How the ``stockade`` command fails: one line (plus a hint), a documented exit code, never a traceback.

Exit codes (also in ``stockade --help`` and the README):

====  ==========================================================================================
code  meaning
====  ==========================================================================================
0     success (``policy diff``: no difference; ``explain --exit-code``: allowed)
1     a finding: invalid policy files, ``policy diff`` found a difference, ``explain --exit-code``
      verdict blocked (or potentially blocked)
2     usage error (unknown option, missing argument)
3     ``policy impact``: provisioning would newly block recorded connections
4     the controller could not be reached (connection refused, name not resolved, timeout)
5     TLS: the controller's certificate is not trusted (wrong or missing ``--ca-cert``)
6     the controller refused the credential (401) or the permission (403)
7     the controller refused the request (another 4xx: invalid input, conflict, guard)
8     the controller failed (5xx) or answered something that is not the API
9     an internal error in this command (a bug: ``STOCKADE_DEBUG=1`` shows the traceback)
====  ==========================================================================================

:class:`StockadeGroup` is the top-level click group: it turns transport errors from httpx and any
unexpected exception into one line on stderr and the exit code above. Commands raise
:class:`CliError` (or call :func:`fail_response`) for their own failures.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import sys
from typing import Any, NoReturn

import click
import httpx

EXIT_FINDING = 1
EXIT_USAGE = 2
EXIT_IMPACT = 3
EXIT_UNREACHABLE = 4
EXIT_TLS = 5
EXIT_AUTH = 6
EXIT_REFUSED = 7
EXIT_SERVER = 8
EXIT_INTERNAL = 9

EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 finding (invalid files, diff found, explain --exit-code blocked); 2 usage; "
    "3 impact would newly block; 4 controller unreachable; 5 TLS certificate not trusted; "
    "6 credential or permission refused; 7 request refused; 8 controller error; 9 internal error."
)


class CliError(click.ClickException):
    """A failure with its exit code and an optional hint line."""

    def __init__(self, message: str, exit_code: int, hint: str | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click declares it on the class
        self.hint = hint

    def show(self, file: Any = None) -> None:
        click.echo(f"stockade: error: {self.format_message()}", err=True)
        if self.hint:
            click.echo(f"hint: {self.hint}", err=True)


def _status_exit(status: int) -> tuple[int, str | None]:
    if status in (401, 403):
        hint = ("check --api-key / STOCKADE_API_KEY, or run `stockade login`" if status == 401
                else "this credential's role or label scope does not allow it")
        return EXIT_AUTH, hint
    if 400 <= status < 500:
        return EXIT_REFUSED, None
    return EXIT_SERVER, "the controller's log has the details"


def fail_response(response: httpx.Response) -> NoReturn:
    """Raise the :class:`CliError` for a controller answer that is not the expected success."""
    code, hint = _status_exit(response.status_code)
    try:
        body = response.json()
    except ValueError:
        text = " ".join(response.text.split())[:300]
        raise CliError(f"controller answered {response.status_code}: {text or '(empty)'}", EXIT_SERVER,
                       "is --controller the Stockade controller's URL?") from None
    if not isinstance(body, dict):
        raise CliError(f"controller answered {response.status_code} with an unexpected body", EXIT_SERVER)
    message = f"{body.get('message') or body.get('error') or response.reason_phrase} ({response.status_code})"
    details = [f"  {i.get('field', '')}: {i.get('message', '')}" for i in body.get("issues", [])
               if isinstance(i, dict)]
    if details:
        message += "\n" + "\n".join(details)
    raise CliError(message, code, hint)


def _is_tls_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLCertVerificationError | ssl.SSLError):
            return True
        if "CERTIFICATE_VERIFY_FAILED" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def translate(exc: BaseException) -> CliError | None:
    """The one-line error for an exception escaping a command, or None to let click handle it."""
    if isinstance(exc, click.exceptions.ClickException | click.exceptions.Exit | click.exceptions.Abort):
        return None
    if isinstance(exc, httpx.TransportError):
        url = ""
        with contextlib.suppress(RuntimeError):
            url = str(exc.request.url.copy_with(path="/", query=None))
        where = f" at {url}" if url else ""
        if _is_tls_failure(exc):
            return CliError(f"TLS: the controller{where} presented a certificate this CA does not trust",
                            EXIT_TLS, "pass the controller's CA with --ca-cert or STOCKADE_CA_CERT "
                            "(the controller prints its path and fingerprint at start)")
        if isinstance(exc, httpx.TimeoutException):
            return CliError(f"the controller{where} did not answer in time", EXIT_UNREACHABLE,
                            "is it running and reachable? (--controller / STOCKADE_CONTROLLER)")
        reason = str(exc).split("] ")[-1] or type(exc).__name__
        return CliError(f"cannot reach the controller{where}: {reason}", EXIT_UNREACHABLE,
                        "is it running? check --controller / STOCKADE_CONTROLLER")
    if isinstance(exc, httpx.HTTPError | httpx.InvalidURL):
        return CliError(f"bad controller URL: {exc}", EXIT_USAGE, "for example https://127.0.0.1:8443")
    if isinstance(exc, OSError) and exc.filename:
        return CliError(f"{exc.filename}: {exc.strerror or exc}", EXIT_REFUSED)
    if isinstance(exc, KeyboardInterrupt):
        return CliError("interrupted", 130)
    return CliError(f"internal error: {type(exc).__name__}: {exc}", EXIT_INTERNAL,
                    "this is a bug; STOCKADE_DEBUG=1 shows the traceback")


class StockadeGroup(click.Group):
    """The top-level group: every escaping exception becomes one line and a documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (SystemExit, click.exceptions.Exit):
            raise
        except BaseException as exc:
            err = translate(exc)
            if err is None or os.environ.get("STOCKADE_DEBUG"):
                raise
            err.show()
            sys.exit(err.exit_code)
