"""A stand-in for `prefect flow-run execute` that tests use as a job command.

It talks to the API the way the Prefect engine does (RUNNING, then a final state), with the
environment the worker gave it, so tests measure the worker and not Prefect's start-up time.

    engine.py [--state COMPLETED|FAILED|none] [--exit N] [--sleep S] [--mark DIR] [--print TEXT]
              [--kill-self SIGNAL] [--crash-once DIR] [--control ignore|drop]

--control opens the attempt-control session as Prefect's engine does, then misbehaves: `ignore`
never answers an intent, `drop` closes the connection at once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import sys
import time
import urllib.request
import uuid


def _tls() -> ssl.SSLContext | None:
    """TLS as the worker passed it on (PREFECT_API_SSL_CERT_FILE, ..._TLS_INSECURE_SKIP_VERIFY)."""
    if os.environ.get("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", "").lower() == "true":
        return ssl._create_unverified_context()
    return ssl.create_default_context(cafile=os.environ.get("PREFECT_API_SSL_CERT_FILE") or None)


_CSRF: dict[str, str] = {}


def _csrf_headers(api: str) -> dict[str, str]:
    """Prefect's CSRF headers, fetched once per process when the server asks for them."""
    if not _CSRF:
        client = str(uuid.uuid4())
        with urllib.request.urlopen(f"{api}/csrf-token?client={client}", timeout=30,
                                    context=_tls()) as response:
            _CSRF.update({"Prefect-Csrf-Token": json.load(response)["token"],
                          "Prefect-Csrf-Client": client})
    return _CSRF


def set_state(api: str, run_id: str, state_type: str) -> dict:
    body = json.dumps({
        "state": {"type": state_type, "state_details": {"transition_id": str(uuid.uuid4())}},
        "force": False,
    }).encode()
    csrf: dict[str, str] = {}
    for attempt in range(20):
        request = urllib.request.Request(
            f"{api}/flow_runs/{run_id}/set_state", data=body, method="POST",
            headers={"Content-Type": "application/json", **csrf},
        )
        try:
            with urllib.request.urlopen(request, timeout=30, context=_tls()) as response:
                result = json.load(response)
            if result["status"] == "WAIT":
                time.sleep(result["details"].get("delay_seconds", 1))
                continue
            return result
        except urllib.error.HTTPError as exc:  # SQLite under load answers 503
            if exc.code == 403 and b"CSRF" in exc.read():
                if csrf:  # refused again: the server forgot it (restarted)
                    _CSRF.clear()
                csrf = _csrf_headers(api)
                continue
            if exc.code not in (429, 502, 503):
                raise
            time.sleep(float(exc.headers.get("Retry-After") or 0.2 * (attempt + 1)))
    raise SystemExit("engine: could not set state")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", default="COMPLETED")
    parser.add_argument("--exit", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--mark", help="directory to record this execution in (one file per run)")
    parser.add_argument("--print", dest="text")
    parser.add_argument("--kill-self")
    parser.add_argument("--crash-once", help="directory: exit 3 the first time for each run")
    parser.add_argument("--control", choices=["ignore", "drop"])
    args = parser.parse_args()
    control = None
    if args.control:
        control = socket.create_connection(
            ("127.0.0.1", int(os.environ["PREFECT__CONTROL_PORT"])), timeout=10)
        control.sendall(os.environ["PREFECT__CONTROL_TOKEN"].encode() + b"\n")
        if args.control == "drop":
            control.close()
    api = os.environ["PREFECT_API_URL"]
    run_id = os.environ["PREFECT__FLOW_RUN_ID"]
    if args.mark:
        with open(os.path.join(args.mark, f"{run_id}.{os.getpid()}"), "w") as fh:
            fh.write(json.dumps({"cwd": os.getcwd(), "env": dict(os.environ)}))
    if args.crash_once:
        first = os.path.join(args.crash_once, run_id)
        if not os.path.exists(first):
            open(first, "w").close()
            print("crashing on the first attempt", flush=True)
            return 3
    if args.text:
        print(args.text, flush=True)
    set_state(api, run_id, "RUNNING")
    if args.sleep:
        time.sleep(args.sleep)
    if args.kill_self:
        os.kill(os.getpid(), getattr(signal, args.kill_self))
    if args.state != "none":
        set_state(api, run_id, args.state)
    sys.stdout.flush()
    return args.exit


if __name__ == "__main__":
    raise SystemExit(main())
