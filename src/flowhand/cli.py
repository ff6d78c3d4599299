"""`flowhand start|status|config` and `flowhand --version`.

`flowhand start` takes every flag of `prefect worker start`, with Prefect's meaning, so that
switching is changing one word. Exit status: 0 after a clean stop, 1 when the worker could not
run (API unreachable with --run-once), 2 for bad configuration (one line saying what to fix),
130 after a forced stop. Logs go to stderr; stdout holds only a command's output.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import anyio
import structlog

from flowhand import __version__, config_report, status
from flowhand.backends import available_backends, load_backend
from flowhand.config import Config, load_config
from flowhand.early_signals import EarlySignals
from flowhand.errors import APIError, AuthError, ConfigError, NotFound
from flowhand.logs import configure_logging
from flowhand.pool_template import load_base_job_template
from flowhand.service import (
    client_for,
    operator_error,
    probe_api,
    refused,
    start,
)
from flowhand.state_dir import WorkerStateDir

log = structlog.get_logger("flowhand.cli")

INSTALL_POLICIES = ("always", "if-not-present", "never", "prompt")


def _add_worker_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that set configuration keys: `prefect worker start`'s, plus --config."""
    parser.add_argument("--pool", "-p", help="work pool name (config: pool)")
    parser.add_argument("--config", "-c",
                        help="TOML file (default: $FLOWHAND_CONFIG, else ./worker.toml)")
    parser.add_argument("--work-queue", "-q", action="append", dest="work_queues",
                        help="only poll this queue; repeat for several (config: work_queues)")
    parser.add_argument("--limit", "-l", type=int,
                        help="most runs in flight at once (config: limit)")
    parser.add_argument("--name", "-n", help="stable worker name (config: name)")
    parser.add_argument("--type", "-t", dest="type",
                        help=f"backend: {', '.join(available_backends())} (config: type; "
                        "default: the pool's type, else process)")
    parser.add_argument("--prefetch-seconds", type=float,
                        help="claim runs scheduled this many seconds ahead (config: "
                        "prefetch_seconds; PREFECT_WORKER_PREFETCH_SECONDS)")
    parser.add_argument("--with-healthcheck", action=argparse.BooleanOptionalAction,
                        help="serve Prefect's GET /health on PREFECT_WORKER_WEBSERVER_HOST:"
                        "PORT (config: healthcheck.enabled)")
    parser.add_argument("--base-job-template", metavar="PATH",
                        help="JSON base job template for a pool flowhand creates (config: "
                        "base_job_template)")
    parser.add_argument("--create-pool-if-not-found", dest="create_pool",
                        action=argparse.BooleanOptionalAction,
                        help="create the pool when it does not exist (config: create_pool; "
                        "default: yes)")
    parser.add_argument("--warm-start", action=argparse.BooleanOptionalAction,
                        help="process pools: fork runs of proven Prefect releases from a helper "
                        "that has imported Prefect (config: process.warm_start; default: yes)")


def _add_prefect_cli_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    """`prefect`'s own options, before or after the command: `--profile` selects a Prefect
    profile, whose settings then win over PREFECT_* environment variables; `--prompt` is
    accepted and does nothing (flowhand never prompts)."""
    # Below the top level the defaults are suppressed, so `flowhand --profile x start` holds.
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--profile", default=default,
                        help="use this Prefect profile, as `prefect --profile` does")
    parser.add_argument("--prompt", action=argparse.BooleanOptionalAction, default=default,
                        help="accepted for compatibility: flowhand never prompts")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowhand", description="A lean, crash-aware worker for Prefect 3 work pools.")
    parser.add_argument("--version", action="version", version=f"flowhand {__version__}")
    _add_prefect_cli_flags(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    start_cmd = commands.add_parser("start", help="poll a work pool and run its flow runs")
    _add_worker_flags(start_cmd)
    _add_prefect_cli_flags(start_cmd, top=False)
    start_cmd.add_argument("--empty-work-queue", action="store_true",
                           help="accepted for compatibility and ignored")
    start_cmd.add_argument("--run-once", action=argparse.BooleanOptionalAction, default=False,
                           help="poll once, run what was claimed to the end, and exit")
    start_cmd.add_argument("--install-policy", choices=INSTALL_POLICIES,
                           help="accepted for compatibility: flowhand installs nothing")
    start_cmd.add_argument("--show-config", action="store_true",
                           help="print the effective configuration with sources, and exit")
    show = commands.add_parser(
        "config", help="print the effective configuration, each value with its source")
    _add_worker_flags(show)
    _add_prefect_cli_flags(show, top=False)
    show.add_argument("--json", action="store_true", help="JSON instead of text")
    status_cmd = commands.add_parser(
        "status", help="show a pool's runs in flight and just finished")
    status_cmd.add_argument("--pool", "-p", help="work pool name (config: pool)")
    status_cmd.add_argument("--config", "-c", help="TOML file, for the API settings and pool")
    _add_prefect_cli_flags(status_cmd, top=False)
    status_cmd.add_argument("--json", action="store_true", help="JSON instead of a table")
    status_cmd.add_argument("--recent-minutes", type=float, default=60,
                            help="finished runs from this many minutes back (default 60)")
    status_cmd.add_argument("--limit", type=int, default=200, help="most rows of each kind")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "pool": args.pool,
        "work_queues": args.work_queues,
        "limit": args.limit,
        "name": args.name,
        "type": args.type,
        "prefetch_seconds": args.prefetch_seconds,
        "base_job_template": args.base_job_template,
        "create_pool": args.create_pool,
        "healthcheck": {"enabled": args.with_healthcheck},
        "process": {"warm_start": args.warm_start},
    }


def main(argv: Sequence[str] | None = None, early: EarlySignals | None = None) -> int:
    """`early`: the signal counter the console script installed before importing us."""
    # A stop during start-up is a clean stop, not a traceback: count signals from here on.
    early = early or EarlySignals().install()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "start":
        early.uninstall()
        if early.count:
            return 130
    if args.command not in ("start", "status", "config"):
        parser.print_help(sys.stderr)
        return 2
    config: Config | None = None
    try:
        if args.command == "status":
            config = load_config(args.config, {"pool": args.pool}, profile=args.profile)
            configure_logging(config.logging.format, config.logging.level)
            return anyio.run(_status, config, args)
        config = load_config(args.config, _overrides(args), profile=args.profile)
        configure_logging(config.logging.format, config.logging.level)
        if args.command == "config" or args.show_config:
            print(config_report.render(config, as_json=getattr(args, "json", False)))
            return 0
        _check_before_start(config, args)
        return anyio.run(start, config, args.run_once, early)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        problem = operator_error(exc, config) if config is not None else (
            exc if isinstance(exc, ConfigError) else None)
        if problem is None:
            raise
        print(f"flowhand: configuration error: {problem}", file=sys.stderr)
        return 2


def _check_before_start(config: Config, args: argparse.Namespace) -> None:
    """Mistakes that need no API are reported before anything starts."""
    if not config.pool:
        raise ConfigError("no work pool: pass --pool NAME or set `pool` in the config file")
    if config.type:
        load_backend(config.type)
    if config.base_job_template is not None:
        load_base_job_template(config.base_job_template)
    # Read-only, not writable, not creatable, or held by a worker of the same name: said now,
    # in one line, not when a run arrives (Worker.run takes the lock for good).
    state_dir = WorkerStateDir(config.state_dir, config.name)
    state_dir.acquire()
    state_dir.release()
    if args.install_policy:
        log.info("cli.install_policy", install_policy=args.install_policy,
                 note="accepted for compatibility; flowhand installs nothing: its backends "
                 "come with it (the docker backend with flowhand[docker])")


async def _status(config: Config, args: argparse.Namespace) -> int:
    if not config.pool:
        raise ConfigError("no work pool: pass --pool NAME or set `pool` in the config")
    async with client_for(config) as client:
        try:
            await probe_api(client, retries=1)
            await client.read_work_pool(config.pool)
        except AuthError as exc:
            raise refused(config, exc) from None
        except NotFound:
            raise ConfigError(f"work pool {config.pool!r} does not exist at {config.api.url} "
                              "(`prefect work-pool ls` lists the pools)") from None
        except APIError as exc:
            print(f"flowhand: cannot reach the Prefect API at {config.api.url}: {exc}",
                  file=sys.stderr)
            return 1
        try:
            rows = await status.collect(client, config.pool, args.recent_minutes, args.limit)
        except APIError as exc:
            print(f"flowhand: cannot read runs of pool {config.pool!r}: {exc}", file=sys.stderr)
            return 1
    print(status.render(rows, as_json=args.json))
    return 0
