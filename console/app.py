"""The console's ASGI app (Starlette) and its resources.

`open_state(settings)` opens what a console process holds: a small read-only pool and one
broker connection; `create_app(state)` builds the app on them (tests build it so, around
their own database and broker). `build_app(settings)` does both inside the app's lifespan,
for uvicorn."""

from __future__ import annotations

import contextlib
import gc
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
from jinja2 import Environment
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from console.publisher import AmqpPublisher, Publisher
from console.routes import auth, client, dashboard, module_queue, new_order, order, orders, payments
from console.security import SecurityHeaders, SessionCodec
from console.warm_up import WarmUp
from console.web import HERE, ConsoleState, compiled_templates
from shared import db
from shared.errors import ConfigurationError
from shared.settings import Settings
from shared.settings_parts import ConsoleSettings

log = logging.getLogger("ordermill.console")

# Every page family's routes; a new family adds its module here (and its NAV entry).
PAGE_FAMILIES = (auth, dashboard, new_order, orders, order, client, module_queue, payments)
POOL_SIZE = 5
OnConnect = Callable[[asyncpg.Connection], Awaitable[None]]


def secret_key(settings: ConsoleSettings) -> str:
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value()
    log.warning("CONSOLE_SECRET_KEY is not set: sessions are signed with a random key of this"
                " process, and end when it stops (set it for sessions that survive a restart,"
                " and the same for every console process)")
    return secrets.token_urlsafe(48)


def describe_identity(settings: ConsoleSettings) -> None:
    """Say once whose name history will carry for the console's actions (docs/contract.md,
    section 8): the operator signed in only when the console's user is a console user."""
    user = settings.user
    if user in settings.console_users and user not in settings.operator_users:
        return
    log.warning("the console's RabbitMQ user %r is not a console user only (CONSOLE_USERS,"
                " not OPERATOR_USERS): the review service will record that user, not the"
                " operator signed in, in each order's history", user,
                extra={"user": user})


async def read_only_pool(settings: Settings, on_connect: OnConnect | None = None):  # -> asyncpg.Pool
    """The console's pool, read-only by default (`on_connect`: the warm-up's hook, each new
    connection). Asked for when each connection starts; behind
    PgBouncer (DB_PGBOUNCER), which passes no such start-up parameter on and shares server
    sessions, it must be the database role's own default: checked, or the console refuses to
    start (its role, then, is not the workers')."""
    if not settings.db_pgbouncer:
        return await db.create_pool(settings.database_url, max_size=POOL_SIZE,
                                    attempts=settings.startup_attempts, on_connect=on_connect,
                                    server_settings={"default_transaction_read_only": "on"})
    pool = await db.create_pool(settings.database_url, max_size=POOL_SIZE,
                                attempts=settings.startup_attempts, statement_cache_size=0,
                                on_connect=on_connect)
    async with pool.acquire() as conn:
        read_only = await conn.fetchval("SELECT current_setting('default_transaction_read_only')")
        user = await conn.fetchval("SELECT current_user")
    if read_only != "on":
        await pool.close()
        raise ConfigurationError(
            f"behind PgBouncer the console's read-only default must be its database role's:"
            f" ALTER ROLE {user} SET default_transaction_read_only = on (a role of the"
            " console's own: the workers write)")
    return pool


async def open_state(settings: Settings, *, publisher: Publisher | None = None,
                     warm_up: WarmUp | None = None,
                     env: Environment | None = None) -> ConsoleState:
    """`warm_up`: the console's own by default (CONSOLE_WARM_UP); a test may hand one in.
    `env`: the templates, compiled by build_app; compiled as first rendered if not given."""
    part = settings.console
    # Read-only by default: the console reads orders; only its own sign-in bookkeeping
    # writes, in transactions that ask for it (console/accounts.py).
    # Warms the dashboard and the list's first page in the background, once the schema is
    # checked, and again when the pool reaches a server it has not warmed (console/warm_up.py).
    if warm_up is None:
        warm_up = WarmUp(enabled=part.warm_up)
    pool = await read_only_pool(settings, warm_up.connected)
    try:
        await db.ensure_schema(pool, migrate_on_start=False)
        if publisher is None:
            amqp = AmqpPublisher(settings.amqp_url, settings.namespace, part.user,
                                 part.service_users)
            await amqp.start(settings.startup_attempts)
            publisher = amqp
    except BaseException:
        await pool.close()
        raise
    describe_identity(part)
    warm_up.start(pool)
    return ConsoleState(settings=part, pool=pool, publisher=publisher,
                        codec=SessionCodec(secret_key(part), part.session_hours * 3600),
                        warm_up=warm_up, **({"env": env} if env else {}))


async def close_state(state: ConsoleState) -> None:
    await state.warm_up.close()
    await state.publisher.close()
    await state.pool.close()


async def _not_found(request: Request, exc: Exception) -> Response:
    return PlainTextResponse("Not found.", status_code=404)


def create_app(state: ConsoleState | None = None, *,
               lifespan: contextlib.AbstractAsyncContextManager | None = None) -> Starlette:
    routes = [route for family in PAGE_FAMILIES for route in family.routes]
    routes.append(Mount("/static", StaticFiles(directory=HERE / "static"), name="static"))
    app = Starlette(routes=routes, exception_handlers={404: _not_found}, lifespan=lifespan)
    app.add_middleware(SecurityHeaders)
    if state is not None:
        app.state.console = state
    return app


def settle_heap() -> None:
    """Move everything alive now (the imported modules, templates, routes: what lives as long
    as the process) out of the garbage collector's sight. Python's full collections walk every
    tracked object; on a page with a few hundred rows one request in about fifty triggered one
    and paid 35-50 ms for walking these (bench/console_pages.py at 1M orders: list pages p99
    48-63 ms with, 11-15 ms without). Called once, when the server starts."""
    gc.collect()
    gc.freeze()


def build_app(settings: Settings) -> Starlette:
    env = compiled_templates()  # now, not at each page's first visit (console/web.py)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.console = await open_state(settings, env=env)
        try:
            yield
        finally:
            await close_state(app.state.console)

    return create_app(lifespan=lifespan)
