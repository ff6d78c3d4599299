"""`flowhand start --pool NAME ...` and `flowhand --version`.

Exit status: 0 after a clean stop, 1 when the worker could not run (API unreachable with
--run-once), 2 for bad configuration (one line saying what to fix), 130 after a forced stop.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import Any

import anyio
import structlog

from flowhand import __version__, status
from flowhand.api.client import PrefectClient, backoff_seconds
from flowhand.backends import available_backends, load_backend
from flowhand.config import Config, create_backend, load_config
from flowhand.errors import APIError, AuthError, ConfigError, NotFound
from flowhand.logs import configure_logging
from flowhand.worker import Worker

log = structlog.get_logger("flowhand.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowhand", description="A lean, crash-aware worker for Prefect 3 work pools."
    )
    parser.add_argument("--version", action="version", version=f"flowhand {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    start = commands.add_parser("start", help="poll a work pool and run its flow runs")
    start.add_argument("--pool", "-p", help="work pool name (config: pool)")
    start.add_argument("--config", "-c",
                       help="TOML file (default: $FLOWHAND_CONFIG, else ./worker.toml)")
    start.add_argument("--work-queue", "-q", action="append", dest="work_queues",
                       help="only poll this queue; repeat for several (config: work_queues)")
    start.add_argument("--limit", "-l", type=int,
                       help="most runs in flight at once (config: limit)")
    start.add_argument("--name", "-n", help="stable worker name (config: name)")
    start.add_argument("--type", "-t", dest="type",
                       help=f"backend: {', '.join(available_backends())} (config: type; default: "
                       "the pool's type, else process)")
    start.add_argument("--run-once", action="store_true",
                       help="poll once, run what was claimed to the end, and exit")
    status = commands.add_parser("status", help="show a pool's runs in flight and just finished")
    status.add_argument("--pool", "-p", help="work pool name (config: pool)")
    status.add_argument("--config", "-c", help="TOML file, for the API settings and pool")
    status.add_argument("--json", action="store_true", help="JSON instead of a table")
    status.add_argument("--recent-minutes", type=float, default=60,
                        help="finished runs from this many minutes back (default 60)")
    status.add_argument("--limit", type=int, default=200, help="most rows of each kind")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "pool": args.pool,
        "work_queues": args.work_queues,
        "limit": args.limit,
        "name": args.name,
        "type": args.type,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in ("start", "status"):
        parser.print_help()
        return 2
    try:
        if args.command == "status":
            config = load_config(args.config, {"pool": args.pool})
            if not config.pool:
                raise ConfigError("no work pool: pass --pool NAME or set `pool` in the config")
            return anyio.run(_status, config, args)
        config = load_config(args.config, _overrides(args))
        if not config.pool:
            raise ConfigError("no work pool: pass --pool NAME or set `pool` in the config file")
        configure_logging(config.logging.format, config.logging.level)
        return anyio.run(_start, config, args.run_once)
    except ConfigError as exc:
        print(f"flowhand: configuration error: {exc}", file=sys.stderr)
        return 2


def _client(config: Config, **kwargs: Any) -> PrefectClient:
    return PrefectClient(
        config.api.url,
        api_key=config.api.key.get_secret_value() if config.api.key else None,
        auth_string=config.api.auth_string.get_secret_value() if config.api.auth_string else None,
        worker_name=config.name,
        timeout_seconds=config.api.timeout_seconds,
        max_retries=config.api.max_retries,
        max_connections=config.api.max_connections,
        retry_base_seconds=config.api.retry_base_seconds,
        retry_max_seconds=config.api.retry_max_seconds,
        **kwargs,
    )


async def _status(config: Config, args: argparse.Namespace) -> int:
    assert config.pool
    async with _client(config) as client:
        try:
            rows = await status.collect(client, config.pool, args.recent_minutes, args.limit)
        except APIError as exc:
            print(f"flowhand: cannot read runs of pool {config.pool!r}: {exc}", file=sys.stderr)
            return 1
    print(status.render(rows, as_json=args.json))
    return 0


async def _backend_type(client: PrefectClient, config: Config, run_once: bool) -> str:
    """The configured backend, else the existing pool's type, else process.

    Reading the pool waits out an unreachable API (as a service); set `type` to start without
    it.
    """
    if config.type:
        return config.type
    assert config.pool
    attempt = 0
    while True:
        try:
            return (await client.read_work_pool(config.pool)).type
        except NotFound:
            return "process"
        except APIError as exc:
            if run_once or isinstance(exc, AuthError):
                raise
            delay = backoff_seconds(attempt, 1.0, 60.0)
            log.error("worker.startup_failed", error=str(exc), api_url=config.api.url,
                      retry_in_seconds=round(delay, 1))
            attempt += 1
            await anyio.sleep(delay)


async def _start(config: Config, run_once: bool) -> int:
    client = _client(config)
    exit_code = 0
    async with client, anyio.create_task_group() as tg:
        holder: dict[str, Worker] = {}

        async def on_signals() -> None:
            nonlocal exit_code
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                count = 0
                async for signum in signals:
                    count += 1
                    worker = holder.get("worker")
                    if count == 1 and worker is not None:
                        log.info("worker.signal", signal=signal.Signals(signum).name,
                                 action="stop claiming, wait for runs in flight; "
                                 "signal again to force")
                        worker.stop()
                    else:
                        log.warning("worker.signal", signal=signal.Signals(signum).name,
                                    action="forced exit")
                        exit_code = 130
                        tg.cancel_scope.cancel()
                        return

        tg.start_soon(on_signals)
        try:
            backend_cls = load_backend(await _backend_type(client, config, run_once))
            worker = Worker(config, client, create_backend(backend_cls, config))
            holder["worker"] = worker
            try:
                await worker.run(run_once=run_once)
            finally:
                await worker.backend.aclose()
        except AuthError as exc:
            raise ConfigError(
                f"the Prefect API at {config.api.url} refused the credentials ({exc.status_code}): "
                "check PREFECT_API_KEY / PREFECT_API_AUTH_STRING (api.key / api.auth_string)"
            ) from None
        except APIError as exc:
            log.error("worker.api_unreachable", error=str(exc), api_url=config.api.url)
            exit_code = 1
        tg.cancel_scope.cancel()
    return exit_code
