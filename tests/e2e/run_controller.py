"""Start a controller for the end-to-end tests: SQLite in ``--data`` (or ``--database-url``, e.g. one
PostgreSQL database shared by several replicas), HTTPS on ``--host:--port``.

TLS uses the controller's own CA (:func:`stockade.controller.tls.ensure_tls`, files under
``<data>/tls``; agents pin ``ca.pem``); ``--insecure-http`` serves plain HTTP instead.

Run as a script (``python tests/e2e/run_controller.py ...``) so a test can SIGKILL it and start
it again on the same database. The first-run owner credential is written as JSON to
``--credential-file`` (``{}`` on later starts); then uvicorn serves until killed.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import signal
from pathlib import Path

import uvicorn

from stockade.controller.app import create_app
from stockade.controller.context import ControllerSettings
from stockade.controller.services.auth import Argon2Params
from stockade.controller.tls import ensure_tls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--credential-file", required=True, type=Path)
    ap.add_argument("--insecure-http", action="store_true")
    ap.add_argument("--database-url", default=None, help="PostgreSQL (replicas) instead of SQLite in --data")
    args = ap.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` dumps every thread's stack
    settings = ControllerSettings.for_data_dir(args.data)  # makes the directory
    settings = ControllerSettings(
        database_url=args.database_url or settings.database_url,
        secure_cookies=False,
        login_limit=(1000, 60.0),
        enroll_limit=(1000, 60.0),
        argon2=Argon2Params(time_cost=1, memory_kib=8192, parallelism=1),
        flush_interval=0.5,
        offline_after=10.0,
    )
    app = create_app(settings)
    cred = app.state.controller.first_run_credential
    args.credential_file.write_text(json.dumps({"user": cred[0], "password": cred[1]} if cred else {}))
    certfile = keyfile = None
    if not args.insecure_http:
        files = ensure_tls(args.data / "tls", (args.host,))
        certfile, keyfile = str(files.server_cert), str(files.server_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=1,
                ssl_certfile=certfile, ssl_keyfile=keyfile)


if __name__ == "__main__":
    main()
