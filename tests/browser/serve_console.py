"""Run a controller for the browser tests and benchmarks: plain HTTP on 127.0.0.1, SQLite.

The same app ``stockade controller --insecure-http`` serves (``create_app``: API and console),
started without the whole CLI so that it only imports the controller. Prints the first-run
owner credential in the CLI's words, then serves until killed. Generous login rate limits and
a cheap argon2 cost keep the tests fast.

    python tests/browser/serve_console.py --data DIR --port PORT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn

from stockade.controller.app import create_app
from stockade.controller.context import ControllerSettings
from stockade.controller.services.auth import Argon2Params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--port", required=True, type=int)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--login-limit", type=int, default=1000, help="login attempts per client per minute")
    args = ap.parse_args()
    settings = ControllerSettings.for_data_dir(
        args.data,
        secure_cookies=False,
        login_limit=(args.login_limit, 60.0),
        argon2=Argon2Params(time_cost=1, memory_kib=8192, parallelism=1),
    )
    app = create_app(settings)
    cred = app.state.controller.first_run_credential
    if cred is not None:
        print(f"First run: owner account {cred[0]!r} with password {cred[1]}", flush=True)
    print(f"Console:  http://{args.host}:{args.port}/", flush=True)
    sys.stdout.flush()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=1)


if __name__ == "__main__":
    main()
