"""`flowhand start` as a service: signals, waiting for the API, the backend, the worker.

- The first SIGTERM/SIGINT at any time, start-up included, is a clean stop (exit 0): claiming
  stops and `[shutdown]` decides about runs in flight. A second one forces the exit (130).
- An unreachable API is said within a second ("waiting for the Prefect API at URL: reason;
  retrying"), then again with backoff; with --run-once it ends the command (exit 1).
- Configuration mistakes found on the way (refused credentials, a pool of another type, a
  missing queue, an unknown or unloadable backend) leave as one ConfigError (exit 2), never as
  a traceback.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import anyio
import anyio.abc
import structlog

from flowhand.api.client import PrefectClient
from flowhand.api.retry import backoff_seconds
from flowhand.api.tls import CertificateError, tls_settings
from flowhand.backends import load_backend
from flowhand.config import Config, create_backend
from flowhand.early_signals import EarlySignals
from flowhand.errors import (
    APIError,
    APIUnreachable,
    AuthError,
    ConfigError,
    FlowhandError,
    NotFound,
)
from flowhand.pool_template import missing_pool
from flowhand.prefect_health import PollHealth, serve_health, shares_http_port
from flowhand.service_loop import Backoff, retry_until
from flowhand.worker import Worker

log = structlog.get_logger("flowhand.service")

#: Seconds without an answer after which "waiting for the Prefect API" is said anyway.
FIRST_WORD_SECONDS = 1.0
#: How long the first read of a pool that must exist may take before start-up goes on without
#: it (a busy server answers a GET well within this; a silent host is then waited for as usual).
MISSING_POOL_CHECK_SECONDS = 10.0
#: How long `--run-once` waits for an unreachable API before it exits 1: a one-shot should
#: fail fast, yet ride out a server that is just starting.
RUN_ONCE_API_SECONDS = 6.0


def client_for(config: Config, **kwargs: Any) -> PrefectClient:
    """The API client every command uses, with the configured credentials, TLS and CSRF."""
    if config.api.tls_insecure_skip_verify:
        log.warning("api.tls_insecure", api_url=config.api.url,
                    message="PREFECT_API_TLS_INSECURE_SKIP_VERIFY is set: the API's TLS "
                    "certificate is not verified; use PREFECT_API_SSL_CERT_FILE instead")
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
        tls=tls_settings(config.api.ssl_cert_file, config.api.tls_insecure_skip_verify),
        csrf=config.api.csrf_support,
        **kwargs,
    )


def refused(config: Config, exc: AuthError) -> ConfigError:
    """A 401/403 said as what the server said: a CSRF refusal is not a credentials problem."""
    if "CSRF" in exc.detail:
        return ConfigError(
            f"the Prefect API at {config.api.url} refused a write ({exc.method} {exc.path} "
            f"answered {exc.status_code}: {exc.detail}): its CSRF "
            "protection is on; leave PREFECT_CLIENT_CSRF_SUPPORT_ENABLED (api.csrf_support) "
            "on so that flowhand sends the token")
    what = "the credentials" if exc.status_code == 401 else "the request"
    return ConfigError(
        f"the Prefect API at {config.api.url} refused {what} ({exc.status_code}): "
        f"the server said {exc.detail!r} to {exc.method} {exc.path}; "
        "check PREFECT_API_KEY / PREFECT_API_AUTH_STRING (api.key / api.auth_string, or the "
        "Prefect profile; `flowhand config` shows which is used)")


async def probe_api(client: PrefectClient, retries: int = 0) -> None:
    """GET /health; APIError when the API cannot be reached, ConfigError when the URL is not
    a Prefect API's."""
    try:
        await client.request("GET", "/health", retries=retries)
    except NotFound:
        raise ConfigError(
            f"{client.api_url} is not a Prefect API URL (GET /health answered 404); it usually "
            "ends in /api, e.g. http://127.0.0.1:4200/api") from None


async def wait_for_api(
    client: PrefectClient, stop: anyio.Event, give_up_after: float | None = None
) -> bool:
    """True once the API answers; False when stopped first. With `give_up_after` (seconds),
    the last failure is raised once that time has passed (a hung connection included)."""
    answered = anyio.Event()
    attempts: int | None = None
    failure: FlowhandError | None = None
    async with anyio.create_task_group() as tg:

        async def until_stopped() -> None:
            await stop.wait()
            tg.cancel_scope.cancel()

        async def first_word() -> None:
            # A host that swallows packets gives no error for a long while: say so anyway.
            with anyio.move_on_after(FIRST_WORD_SECONDS):
                await answered.wait()
            if not answered.is_set():
                log.warning("api.waiting", message=f"waiting for the Prefect API at "
                            f"{client.api_url}: no answer within {FIRST_WORD_SECONDS:g} s; "
                            "still trying")

        tg.start_soon(until_stopped)
        tg.start_soon(first_word)
        try:
            attempts = await _probe_until_up(client, answered, give_up_after)
        except FlowhandError as exc:
            failure = exc  # raised below, not wrapped in the task group's exception group
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if attempts is None:
        return False
    if attempts > 1:
        log.info("api.reachable", api_url=client.api_url, after_attempts=attempts)
    return True


async def _probe_until_up(
    client: PrefectClient, answered: anyio.Event, give_up_after: float | None
) -> int:
    """Probe until the API answers (how many tries it took); raise the last failure once
    `give_up_after` seconds have passed."""
    deadline = None if give_up_after is None else time.monotonic() + give_up_after
    attempt = 0
    while True:
        try:
            with anyio.fail_after(None if deadline is None
                                  else max(0.1, deadline - time.monotonic())):
                await probe_api(client)
            return attempt + 1
        except AuthError:
            raise  # a proxy in front of the API wants credentials: a configuration matter
        except CertificateError as exc:
            # Not an outage: waiting would not make the certificate trusted.
            raise ConfigError(str(exc)) from None
        except (APIError, TimeoutError) as exc:
            answered.set()
            attempt += 1
            delay = backoff_seconds(attempt - 1, 1.0, 60.0)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise (exc if isinstance(exc, APIError) else APIUnreachable(
                    f"GET /health: no answer within {give_up_after:g} s")) from None
            log.warning("api.waiting", message=f"waiting for the Prefect API at "
                        f"{client.api_url}: {exc}; retrying",
                        retry_in_seconds=round(delay, 1), attempt=attempt)
            await anyio.sleep(delay)


async def backend_type(
    client: PrefectClient, config: Config, stop: anyio.Event, run_once: bool
) -> str | None:
    """The configured backend, else the existing pool's type, else process; None if stopped.

    Reading the pool waits out an unreachable API (as a service); set `type` to start
    without it.
    """
    if config.type:
        return config.type
    pool = config.pool
    assert pool

    async def read() -> str:
        try:
            return (await client.read_work_pool(pool)).type
        except NotFound:
            return "process"
        except AuthError as exc:
            raise refused(config, exc) from None

    def report(exc: Exception, delay: float, failures: int) -> None:
        log.error("worker.startup_failed", error=str(exc), api_url=config.api.url,
                  retry_in_seconds=round(delay, 1))

    # As a service an unreachable API is waited out; --run-once fails at once.
    return await retry_until(read, retry_on=() if run_once else (APIError,),
                             backoff=Backoff(1.0, 60.0), on_failure=report, stop=stop)


def _poll_health(config: Config) -> tuple[PollHealth | None, Config]:
    """The `--healthcheck` state, if asked for, and the config the worker then runs with."""
    if not config.healthcheck.enabled:
        return None, config
    health = PollHealth(config.poll_interval_seconds, serves_http=shares_http_port(config))
    if health.serves_http:
        # One listener for both; the worker must not bind the same port again.
        config = config.model_copy(update={
            "http": config.http.model_copy(update={"enabled": False})})
    return health, config


async def start(config: Config, run_once: bool, early: EarlySignals) -> int:
    """Serve the pool until stopped; the exit status."""
    exit_code = 0
    stop = anyio.Event()
    holder: dict[str, Worker] = {}
    health, config = _poll_health(config)

    async with client_for(config) as client, anyio.create_task_group() as tg:

        async def on_signals(task_status: anyio.abc.TaskStatus[None]) -> None:
            nonlocal exit_code
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                task_status.started()
                count = early.count
                async for signum in signals:
                    count += 1
                    name = signal.Signals(signum).name
                    if count == 1:
                        log.info("worker.signal", signal=name,
                                 action="stop claiming, wait for runs in flight; "
                                 "signal again to force")
                        stop.set()
                        if "worker" in holder:
                            holder["worker"].stop()
                    else:
                        log.warning("worker.signal", signal=name, action="forced exit")
                        exit_code = 130
                        tg.cancel_scope.cancel()
                        return

        await tg.start(on_signals)
        await _missing_pool_first(client, config)
        log.info("worker.starting", pool=config.pool, api_url=config.api.url, name=config.name,
                 run_once=run_once)
        if early.count:
            log.info("worker.signal", action="stopped during start-up")
            stop.set()
        if health is not None:
            await tg.start(serve_health, config, health)
        exit_code = await _serve(client, config, run_once, stop, holder, health)
        tg.cancel_scope.cancel()
    return exit_code


async def _missing_pool_first(client: PrefectClient, config: Config) -> None:
    """A pool that must exist and does not is said before anything else (one try: an API
    that refuses the connection or does not answer soon is waited for as usual)."""
    if config.create_pool or not config.pool:
        return
    with anyio.move_on_after(MISSING_POOL_CHECK_SECONDS):
        try:
            await client.request("GET", f"/work_pools/{config.pool}", retries=0)
        except NotFound:
            raise ConfigError(missing_pool(config.pool, config.type or "process")) from None
        except APIError:
            return


async def _serve(
    client: PrefectClient, config: Config, run_once: bool, stop: anyio.Event,
    holder: dict[str, Worker], health: PollHealth | None,
) -> int:
    try:
        if not await wait_for_api(client, stop,
                                  give_up_after=RUN_ONCE_API_SECONDS if run_once else None):
            return 0
        kind = await backend_type(client, config, stop, run_once)
    except APIError as exc:
        log.error("worker.api_unreachable", error=str(exc), api_url=config.api.url)
        return 1
    if kind is None:
        return 0
    backend_cls = load_backend(kind)
    worker = Worker(config, client, create_backend(backend_cls, config))
    holder["worker"] = worker
    if health is not None:
        health.worker = worker
    if stop.is_set():
        worker.stop()
    try:
        await worker.run(run_once=run_once)
    except BaseException as exc:
        found = find_error(exc, (ConfigError, AuthError, APIError))
        if isinstance(found, APIError) and not isinstance(found, AuthError):
            log.error("worker.api_unreachable", error=str(found), api_url=config.api.url)
            return 1
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await worker.backend.aclose()
    return 0


def find_error(
    exc: BaseException, types: tuple[type[BaseException], ...]
) -> BaseException | None:
    """The first exception of `types` in `exc`, looking inside exception groups."""
    if isinstance(exc, types):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_error(inner, types)
            if found is not None:
                return found
    return None


def operator_error(exc: BaseException, config: Config) -> ConfigError | None:
    """The configuration mistake behind `exc`, if that is what it is."""
    found = find_error(exc, (ConfigError,)) or find_error(exc, (AuthError,))
    if isinstance(found, AuthError):
        return refused(config, found)
    return found if isinstance(found, ConfigError) else None
