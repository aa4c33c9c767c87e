"""`ordermill`: the operator's tool (docs/contract.md, section 5). Read commands take --json."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import aiormq
import asyncpg
import typer
from aio_pika.exceptions import PublishError
from pydantic import ValidationError
from rich.console import Console, RenderableType
from rich.live import Live
from rich.text import Text

from cli import broker_ops, tables, views
from cli.catalog import CatalogError, catalog_view, load_catalog, read_catalog
from cli.fraud import fraud_app
from cli.notify import app as notify_app
from cli.sandbox import sandbox_app
from cli.webhooks import app as webhooks_app
from shared import broker, db, logs
from shared.contracts import BIGINT_MAX, PlaceOrder
from shared.errors import ConfigurationError
from shared.orders import ORDER_STATUSES, add_history
from shared.parties import Party, Publishers, amqp_user
from shared.runtime import Runtime, describe_validation_error
from shared.runtime.supervisor import PROCESS_ENV, Supervisor, ready_pipe
from shared.settings import Settings
from shared.settings_parts import amqp_urls, hide_password
from shared.topology import Names, declare_topology

app = typer.Typer(help="Ordermill: the order back office for hosting providers.",
                  no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, add_completion=False)
catalog_app = typer.Typer(help="Load and show the catalog.", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")
broker_app = typer.Typer(help="Least-privilege RabbitMQ users for each party.",
                         no_args_is_help=True)
app.add_typer(broker_app, name="broker")
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(fraud_app, name="fraud")
app.add_typer(webhooks_app, name="webhooks")
app.add_typer(notify_app, name="notify")

out = Console()
T = TypeVar("T")
JsonOpt = typer.Option(False, "--json", help="Print JSON only.")
OrderIdArg = typer.Argument(..., min=1, max=BIGINT_MAX, show_default=False)


class UserError(Exception):
    """A mistake or a missing precondition: printed as one line, exit code 1."""


def _hide_password(url: str) -> str:
    return hide_password(url)


def settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc, prefix="invalid setting ", env_names=True)) from None


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    # uvloop roughly halves the CPU the event loop spends per socket round trip, which is
    # what limits a worker; where it is not available the standard loop does the same job.
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _amqp_user(s: Settings) -> str | None:
    """The RabbitMQ user the CLI logs in as: what the broker checks a message's user_id
    against."""
    return amqp_user(s.amqp_url)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    s = settings()
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(coro)
    except UserError:
        raise
    except asyncpg.InvalidCatalogNameError:
        raise UserError(f"database missing at {_hide_password(s.database_url)}: "
                        "run `ordermill migrate`") from None
    except asyncpg.UndefinedTableError:
        raise UserError("the database has no Ordermill schema: run `ordermill migrate`") from None
    except aiormq.exceptions.ChannelAccessRefused as exc:
        # A permission the broker does not give this user: to publish to the exchange (or
        # with this routing key, topic permissions), to declare or read a queue.
        what = _first_line(exc).removeprefix("ACCESS_REFUSED - ")
        raise UserError(f"RabbitMQ refused user {_amqp_user(s) or 'guest'!r}: {what} (the"
                        " user's permissions: `rabbitmqctl list_user_permissions` and"
                        " `list_user_topic_permissions`)") from None
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        missing = _first_line(exc).split(" - ", 1)[-1].removeprefix("no ")
        raise UserError(f"RabbitMQ has no {missing} (namespace {s.namespace!r}):"
                        " run `ordermill migrate`") from None
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        if "inequivalent arg" not in str(exc):  # a message refused (its user_id), not a queue
            raise UserError(f"RabbitMQ refused: {_first_line(exc)}") from None
        raise UserError(f"RabbitMQ refused a queue as declared: {_first_line(exc)} (a queue's"
                        " arguments, QUEUE_DELIVERY_LIMIT among them, are fixed when it is first"
                        " declared)") from None
    except aiormq.exceptions.InvalidFrameError:
        # A refused virtual host: the broker closes the connection where aiormq waits for
        # Connection.OpenOk, and aiormq keeps not the broker's reason.
        vhost = unquote(urlsplit(amqp_urls(s.amqp_url)[0]).path.lstrip("/")) or "/"
        raise UserError(f"RabbitMQ at {_hide_password(s.amqp_url)} refused to open virtual host"
                        f" {vhost!r}: is it there, and may user {_amqp_user(s) or 'guest'!r}"
                        " use it?") from None
    except aiormq.exceptions.AMQPConnectionError as exc:
        if isinstance(exc, aiormq.exceptions.AuthenticationError | aiormq.exceptions.
                      ProbableAuthenticationError) or "ACCESS_REFUSED" in _first_line(exc):
            raise UserError(f"RabbitMQ at {_hide_password(s.amqp_url)} refused the login of user"
                            f" {_amqp_user(s) or 'guest'!r}: check the user and password in"
                            " AMQP_URL") from None
        # Checked first: aiormq's connection errors are OSErrors too.
        raise UserError(f"cannot reach RabbitMQ at {_hide_password(s.amqp_url)}: "
                        f"{_first_line(exc)}") from None
    except (OSError, asyncpg.PostgresConnectionError) as exc:
        raise UserError(f"cannot reach PostgreSQL at {_hide_password(s.database_url)}: "
                        f"{_first_line(exc)}") from None
    except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError) as exc:
        raise UserError(f"PostgreSQL refused the login at {_hide_password(s.database_url)}: "
                        f"{_first_line(exc)}") from None
    except asyncpg.exceptions.DataError as exc:  # a value PostgreSQL cannot take (an id too big)
        raise UserError(f"invalid value: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc.args[-1] if isinstance(exc, aiormq.exceptions.AMQPConnectionError) and exc.args
               else exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


@asynccontextmanager
async def database(s: Settings):  # -> AsyncIterator[asyncpg.Connection]
    conn = await asyncpg.connect(s.database_url, statement_cache_size=s.statement_cache_size)
    await db.init_connection(conn)
    try:
        yield conn
    finally:
        await conn.close()


def emit_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def table(title: str, columns: list[str], rows: list[list[object]]) -> RenderableType:
    """A table as wide as the terminal allows, or records when its columns would not fit
    (cli/tables.py): never headings cut to "stat…" in 80 columns."""
    return tables.table(out, title, columns, rows)


# -- setup ---------------------------------------------------------------------------------

@app.command()
def migrate() -> None:
    """Create the database if missing, apply migrations, declare the broker topology."""
    s = settings()
    # It waits for a database or broker still starting (compose's one-shot migrate): one line
    # per retry says so; aiormq's own report of each refused connection would double it.
    logs.configure("WARNING", "text")
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)

    async def go() -> tuple[bool, list[str]]:
        created = await db.ensure_database(s.direct_url, attempts=s.startup_attempts,
                                           statement_cache_size=s.statement_cache_size)
        pool = await db.create_pool(s.database_url, max_size=2, attempts=s.startup_attempts,
                                    statement_cache_size=s.statement_cache_size)
        try:
            applied = await db.migrate(pool)
        except db.MigrationFailed as exc:
            raise UserError(str(exc)) from None
        finally:
            await pool.close()
        connection = await broker.connect(s.amqp_url, attempts=s.startup_attempts)
        async with connection:
            await declare_topology(connection, Names(s.namespace),
                                   delivery_limit=s.queue_delivery_limit,
                                   replicas=s.queue_replicas)
        return created, applied

    created, applied = run_async(go())
    name = urlsplit(s.database_url).path.lstrip("/")
    _say(f"database {name}: {'created, ' if created else ''}"
         f"{len(applied)} migration(s) applied; topology declared in namespace {s.namespace}")


@catalog_app.command("load")
def catalog_load(file: Path) -> None:
    """Load products, TLDs, servers and promotions from a TOML file."""
    s = settings()
    try:
        catalog = read_catalog(file)
    except CatalogError as exc:
        raise UserError(str(exc)) from None

    async def go() -> dict[str, int]:
        async with database(s) as conn:
            return await load_catalog(conn, catalog)

    counts = run_async(go())
    _say("catalog loaded: " + ", ".join(f"{n} {k}" for k, n in counts.items()))


@catalog_app.command("show")
def catalog_show(as_json: bool = JsonOpt) -> None:
    """The catalog: products with their auto-setup option and prices, TLDs, promotions."""
    s = settings()

    async def go() -> dict[str, Any]:
        async with database(s) as conn:
            return await catalog_view(conn)

    data = run_async(go())
    if as_json:
        return emit_json(data)
    out.print(table("Products", ["slug", "type", "module", "server", "auto_setup", "prices"], [
        [p["slug"], p["type"], p["module"], p["server"], p["auto_setup"],
         ", ".join(f"{x['price']} {x['currency']} {x['billing_cycle']}" for x in p["prices"])]
        for p in data["products"]]))
    out.print(table("TLDs", ["tld", "registrar", "auto_register", "currency", "register",
                             "transfer", "renew"],
                    [[t["tld"], t["registrar"], t["auto_register"], t["currency"], t["register"],
                      t["transfer"], t["renew"]] for t in data["tlds"]]))
    out.print(table("Promotions", ["code", "kind", "value", "products", "uses", "expires"],
                    [[p["code"], p["kind"], p["value"], ", ".join(p["products"]) or "all",
                      p["uses"], p["expires_at"]] for p in data["promotions"]]))


# -- broker users ----------------------------------------------------------------------------



@broker_app.command("users")
def broker_users(
    storefront: list[str] = typer.Option([], "--storefront", help="A storefront's user name."),
    gateway: list[str] = typer.Option([], "--gateway", help="A payment gateway's user name."),
    operator: list[str] = typer.Option([], "--operator", help="An operator's user name."),
    console: list[str] = typer.Option([], "--console", help="The web console's user name."),
    admin: str = typer.Option(None, "--admin", help="A user for `ordermill migrate` only:"
                              " declares the namespace's queues and exchanges."),
    prefix: str = typer.Option(None, help="Service users are PREFIX-SERVICE (default: the"
                               " namespace)."),
    vhost: str = typer.Option("/", help="The virtual host Ordermill uses."),
    out_file: Path = typer.Option(Path("ordermill-broker-definitions.json"), "--out",
                                  help="Where to write the definitions."),
    secrets_dir: Path = typer.Option(Path("ordermill-broker-secrets"), "--secrets-dir",
                                     help="Each user's password goes to NAME.password here"
                                     " (mode 0600)."),
    as_json: bool = JsonOpt,
) -> None:
    """Write RabbitMQ definitions giving each party exactly the rights it needs; import them
    with `rabbitmqctl import_definitions FILE`."""
    import secrets as random

    from cli import broker_users as bu

    s = settings()
    names = Names(s.namespace)
    split = {key: [n.strip() for v in values for n in v.split(",") if n.strip()]
             for key, values in (("storefronts", storefront), ("gateways", gateway),
                                 ("operators", operator), ("consoles", console))}
    users = bu.plan_users(names, prefix=prefix or s.namespace, admin=admin, **split)
    seen: set[str] = set()
    for user in users:
        if user.name in seen:
            raise UserError(f"user {user.name!r} is named twice: each party needs its own user")
        if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,100}", user.name):
            raise UserError(f"user name {user.name!r}: use letters, digits and _ . @ - only")
        seen.add(user.name)
    passwords = {user.name: random.token_urlsafe(24) for user in users}
    try:
        bu.write_secrets(secrets_dir, passwords)
        out_file.write_text(json.dumps(bu.definitions(users, passwords, vhost=vhost,
                                                      exchange=names.exchange), indent=2))
    except OSError as exc:
        raise UserError(f"cannot write {exc.filename}: {exc.strerror}") from None
    env = bu.settings_for(users)
    if as_json:
        emit_json({"definitions": str(out_file), "secrets_dir": str(secrets_dir),
                   "users": [{"name": u.name, "party": u.party.value if u.party else "admin",
                              "service": u.service} for u in users], "settings": env})
        return
    out.print(table("Broker users", ["user", "party", "may publish"],
                    [[u.name, f"service ({u.service})" if u.service
                      else u.party.value if u.party else "admin (migrate)",
                      bu.readable_keys(u.topic_write)] for u in users]))
    out.print(f"definitions written to {out_file}; passwords in {secrets_dir}/NAME.password")
    # The broker reads the file itself: an absolute path, readable by its system user.
    out.print(f"import them: rabbitmqctl import_definitions {out_file.resolve()}")
    out.print("then give every worker these settings (and each its own user in AMQP_URL):")
    for key, value in env.items():
        out.print(f"  {key}={value}", markup=False, soft_wrap=True)


# -- workers -------------------------------------------------------------------------------

CONSOLE = "console"  # `ordermill run ... console`: the web console in the same process


@app.command()
def run(services: list[str] = typer.Argument(
        None, help="Services to run (default: every worker); `console` adds the web console."),
        processes: str = typer.Option(
            None, "--processes",
            help="How the workers are laid out in processes: auto (three on two or more cores),"
                 " 1 (one process), or groups such as 'placement,fraud / provisioning,review /"
                 " notify,webhooks,alerts' (default: WORKER_PROCESSES, else auto).")) -> None:
    """Run workers (all of them, plus the outbox relay; on two or more cores in three
    processes: the order path, provisioning, the rest), and the web console too when
    `console` is named (in the supervising process)."""
    from services import layout
    from services.registry import WORKERS

    s = settings()
    spec = processes if processes is not None else s.worker_processes
    unknown = [name for name in services or [] if name not in WORKERS and name != CONSOLE]
    if unknown:
        raise UserError(f"unknown service {unknown[0]!r}; known: {', '.join(WORKERS)}, {CONSOLE}")
    with_console = CONSOLE in (services or [])
    # Named services, else every worker (`ordermill run console`: the console alone).
    chosen = [name for name in services if name != CONSOLE] if services else list(WORKERS)
    try:
        groups = layout.plan(chosen, spec, list(WORKERS)) if chosen else []
    except layout.LayoutError as exc:
        raise UserError(f"{exc} (--processes, WORKER_PROCESSES)") from None
    logs.configure(s.log_level, s.log_format, group=os.environ.get(PROCESS_ENV))

    async def go() -> None:
        from console.server import ConsoleServer

        runtime = Runtime(s)
        try:
            workers = [WORKERS[name](s) for name in chosen]
            runtime.check_publishers(workers)  # closed by default: one line, before connecting
        except ConfigurationError as exc:
            raise UserError(str(exc)) from None
        server = ConsoleServer(s) if with_console else None
        supervisor = Supervisor(s.supervisor, groups) if len(groups) > 1 else None

        async def supervised(supervisor: Supervisor) -> int:
            # The servers answer and the schema is current before any worker process starts.
            if not await runtime.prepare(workers):
                return 0
            return await supervisor.serve()

        def stop() -> None:
            runtime.stop()
            if supervisor is not None:
                supervisor.stop()
            if server is not None:
                server.stop()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        tasks = [asyncio.create_task(server.serve())] if server is not None else []
        if supervisor is not None:
            tasks.append(asyncio.create_task(supervised(supervisor)))
        elif chosen:
            tasks.append(asyncio.create_task(runtime.serve(workers, ready=ready_pipe(
                lambda: runtime.metrics_server.port if runtime.metrics_server else None))))
        code = 0
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED
                                         if supervisor is not None else asyncio.FIRST_EXCEPTION)
            for task in done:
                code = task.result() or code
        except ConfigurationError as exc:  # a schema this worker may not migrate, and such
            raise UserError(str(exc)) from None
        except SystemExit as exc:  # the console could not start
            raise UserError(str(exc.code)) from None
        finally:
            stop()
            await asyncio.gather(*tasks, return_exceptions=True)
        if code:
            raise typer.Exit(code)  # a worker process ended by itself: it said why in its log

    run_async(go())


@app.command()
def exporter(
    host: str = typer.Option(None, help="Address to listen on (default: METRICS_HOST, 127.0.0.1)."),
    port: int = typer.Option(None, min=0, max=65535,
                             help="Port (default: METRICS_PORT, else 9108; 0: any free one)."),
) -> None:
    """Serve Prometheus metrics of queues (depth, consumers, dead letters) and of what waits
    for operators (review, flagged screenings, parked setups, unapplied payments)."""
    from cli import exporter as ex

    s = settings()
    logs.configure(s.log_level, s.log_format)
    listen = (host or s.metrics_host,
              ex.DEFAULT_PORT if port is None and s.metrics_port is None
              else port if port is not None else s.metrics_port)

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await ex.serve(database_url=s.database_url, amqp_url=s.amqp_url,
                           namespace=s.namespace, host=listen[0], port=int(listen[1]),
                           cache_seconds=s.metrics_cache_seconds,
                           startup_attempts=s.startup_attempts, stop=stop,
                           statement_cache_size=s.statement_cache_size)
        except ex.ListenError as exc:
            raise UserError(str(exc)) from None

    run_async(go())


# -- orders --------------------------------------------------------------------------------

def _with_db(fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    s = settings()

    async def go() -> T:
        async with database(s) as conn:
            return await fn(conn)

    return run_async(go())


def _orders_table(title: str, orders: list[dict[str, Any]]) -> RenderableType:
    return table(title, ["id", "ref", "status", "screening", "score", "client", "total",
                         "placed"],
                 [[o["id"], o["order_ref"], o["status"], _screening_cell(o), o["score"], o["email"],
                   f"{o['total']} {o['currency']}", o["created_at"][:19]] for o in orders])


def _screening_cell(order: dict[str, Any]) -> str:
    if order.get("needs_review"):
        return "NEEDS REVIEW" + (f" ({', '.join(order['review_reasons'])})"
                                 if order.get("review_reasons") else "")
    return order["screening"] + (" (!)" if order.get("flagged") else "")


@app.command()
def orders(
    status: str = typer.Option(None, help="Pending, Active, Cancelled or Fraud."),
    client: str = typer.Option(None, help="A client id or email address."),
    since: str = typer.Option(None, help="Placed on or after (ISO date or time, UTC)."),
    until: str = typer.Option(None, help="Placed before (ISO date or time, UTC)."),
    limit: int = typer.Option(50, min=1, max=1000),
    page: int = typer.Option(1, min=1),
    as_json: bool = JsonOpt,
) -> None:
    """List orders, newest first."""
    if status is not None:
        status = status.capitalize()
        if status not in ORDER_STATUSES:
            raise UserError(f"unknown status {status!r}; use {', '.join(ORDER_STATUSES)}")
    start, end = _moment(since, "--since"), _moment(until, "--until")
    rows = _with_db(lambda c: views.list_orders(c, status=status, client=client, since=start,
                                                until=end, limit=limit,
                                                offset=(page - 1) * limit))
    if as_json:
        return emit_json(rows)
    out.print(_orders_table(f"Orders{f' ({status})' if status else ''}", rows))


def _moment(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise UserError(f"{option} {value!r} is not an ISO date or time (2026-11-26)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@app.command()
def pending(
    limit: int = typer.Option(200, min=1, max=5000),
    page: int = typer.Option(1, min=1),
    as_json: bool = JsonOpt,
) -> None:
    """Pending orders waiting for review: those that need review (review band, a rule, the
    provider) first, then oldest first (screening errors flagged); orders still queued apart."""
    data = _with_db(lambda c: views.pending_orders(c, limit=limit, offset=(page - 1) * limit))
    if as_json:
        return emit_json(data)
    out.print(_orders_table("Pending review", data["pending"]))
    if data["queued"]:
        out.print(_orders_table("Still being screened", data["queued"]))
    if data["more"]:
        _say(f"{data['more']} more pending order(s): --page {page + 1} or a larger --limit")


@app.command()
def show(order_id: int = OrderIdArg, as_json: bool = JsonOpt) -> None:
    """One order: items, invoice, payments, fraud check result, history."""
    data = _with_db(lambda c: views.show_order(c, order_id))
    if data is None:
        raise UserError(f"order {order_id} does not exist")
    if as_json:
        return emit_json(data)
    c = data["client"]
    out.print(Text.assemble(
        (f"Order {data['id']}", "bold"), f"  ref {views.printable(data['order_ref'])}  "
        f"number {data['order_number']}  status ", (views.printable(data["status"]), "bold"),
        f"  screening {views.printable(data['screening'])}"
        f"{' (override)' if data['screening_override'] else ''}"
        f"{'  NEEDS REVIEW' if data['needs_review'] else ''}"
        f"{'  [deleted]' if data['deleted'] else ''}"))
    # What the client typed is text, not markup: "[/b]" in an address must not break `show`.
    _say(f"Client {c['id']}: {c['first_name']} {c['last_name']} <{c['email']}> "
         f"{c['country'] or ''}  IP {data['ip_address'] or '-'}  "
         f"total {data['total']} {data['currency']}")
    address = ", ".join(c[f] for f in ("address1", "address2", "city", "state", "postcode") if c[f])
    if address or c["phone"]:
        _say("  ".join(filter(None, [address and f"Address: {address}",
                                     c["phone"] and f"phone {c['phone']}"])))
    out.print(table("Items", ["id", "type", "status", "product", "domain", "cycle/action",
                              "amount", "setup", "attempts", "last error"],
                    [[i["id"], i["type"], i["status"], i["product"], i["domain"],
                      i["billing_cycle"] or i["action"], i["amount"],
                      i["setup"] and f"{i['setup']['job']} {i['setup']['status']}",
                      i["setup"] and i["setup"]["attempts"], i["setup"] and i["setup"]["last_error"]]
                     for i in data["items"]]))
    if data["invoice"]:
        inv = data["invoice"]
        out.print(table(f"Invoice {inv['id']}: {inv['status']}, total {inv['total']} "
                        f"{inv['currency']}", ["line", "amount"],
                        [[ln["description"], ln["amount"]] for ln in inv["lines"]]))
    if data["payments"]:
        out.print(_payments_table("Payments", data["payments"]))
    fraud = data["fraud"]
    if fraud:
        _say(f"Fraud check ({fraud['provider']}): {fraud['result']}, score "
             f"{fraud['score'] or '-'} / threshold {fraud['threshold']}"
             f"{'  error: ' + fraud['error'] if fraud['error'] else ''}")
        for reason in fraud["reasons"]:
            _say(f"  - {reason.get('code')}: {reason.get('description')}")
        for rule in fraud["rules"]:
            _say(f"  rule {rule.get('name')} ({rule.get('action')}"
                 f"{' +' + rule['points'] if rule.get('action') == 'score' else ''}):"
                 f" {rule.get('detail')}")
        for reason in fraud["review_reasons"]:
            _say(f"  needs review: {reason.get('code')}: {reason.get('description')}")
        if fraud.get("maxmind"):
            _print_maxmind(fraud["maxmind"])
        if fraud.get("fraudlabspro"):
            flp = fraud["fraudlabspro"]
            _say(f"  FraudLabs Pro: status {flp['status']}, score {flp['score']}, IP country"
                 f" {flp['ip_country'] or '-'}, transaction {flp['transaction_id']}")
    if len(data["screenings"]) > 1:
        out.print(table("Screenings (latest first)", ["at", "provider", "result", "score",
                                                      "rules", "needs review", "error"],
                        [[c["checked_at"][:19], c["provider"], c["result"], c["score"],
                          ", ".join(r["name"] for r in c["rules"]),
                          ", ".join(r["code"] for r in c["review_reasons"]), c["error"]]
                         for c in data["screenings"]]))
    out.print(table("History", ["at", "actor", "action", "from", "to"],
                    [[h["at"][:19], h["actor"], h["action"], h["from"], h["to"]]
                     for h in data["history"]]))


def _say(text: str) -> None:
    """Print a line: what comes from outside (a provider, a client, a server) as plain text,
    never as markup, its control characters shown escaped (views.printable)."""
    out.print(Text(views.printable(text)))


def _print_maxmind(mm: dict[str, Any]) -> None:
    disposition = mm["disposition"] or {}
    _say(f"  minFraud {mm['service']}: risk score {mm['risk_score']}, IP risk {mm['ip_risk']}"
         f"{' (' + mm['ip_country'] + ')' if mm['ip_country'] else ''}, disposition "
         f"{disposition.get('action', '-')}"
         f"{' (' + disposition['reason'] + ')' if disposition.get('reason') else ''}"
         f", transaction {mm['transaction_id']}")
    if mm["ip_risk_reasons"]:
        _say(f"  IP risk reasons: {', '.join(mm['ip_risk_reasons'])}")
    for reason in mm["risk_reasons"]:
        _say(f"  risk reason x{reason['multiplier']}: {reason['code']}: {reason['reason']}")
    for warning in mm["warnings"]:
        _say(f"  warning {warning['code']} at {warning['input']}: {warning['warning']}")


def _payments_table(title: str, payments: list[dict[str, Any]]) -> RenderableType:
    return table(title, ["id", "status", "amount", "gateway", "transaction", "invoice",
                         "order ref", "reason"],
                 [[p["id"], p["status"], f"{p['amount']} {p['currency'] or ''}", p["gateway"],
                   p["transaction_id"], p["invoice_id"] or p["requested_invoice_id"],
                   p["order_ref"], p["reason"]] for p in payments])


# `failures` prints this many of each section unless told (--limit N, --all); --json lists
# them all unless --limit is given, as it always did.
FAILURES_SHOWN = 50


@app.command()
def failures(
    limit: int = typer.Option(None, "--limit", min=1, show_default=False,
                              help=f"At most N of each section (default {FAILURES_SHOWN};"
                              " with --json, all)."),
    show_all: bool = typer.Option(False, "--all", help="Every row of each section."),
    as_json: bool = JsonOpt,
) -> None:
    """What needs an operator: parked setups, unapplied payments, screening errors."""
    s = settings()
    if show_all and limit is not None:
        raise UserError("give --limit N or --all, not both")
    shown = None if show_all or (as_json and limit is None) else (limit or FAILURES_SHOWN)
    data = _with_db(lambda c: views.failures(c, stuck_seconds=s.screening_stuck_seconds,
                                             limit=shown))
    if as_json:
        return emit_json(data)
    more = data.get("more", {})

    def left(section: str) -> None:
        if more.get(section):
            out.print(f"{more[section]:,} more — use --limit N or --all to list them")

    out.print(table("Could not be screened", ["order", "ref", "status", "screening", "error", "at"],
                    [[f["order_id"], f["order_ref"], f["status"], f["screening"], f["error"],
                      f["at"][:19]] for f in data["screening_errors"]]))
    left("screening_errors")
    out.print(table("Stuck in screening", ["order", "ref", "re-drives", "since"],
                    [[f["order_id"], f["order_ref"], f["redrives"], f["queued_since"][:19]]
                     for f in data["stuck_in_screening"]]))
    left("stuck_in_screening")
    out.print(table("Parked setups (the module queue: `ordermill retry ORDER_ID` runs them again)",
                    ["job", "order", "ref", "what", "attempts", "error"],
                    [[f["job_id"], f["order_id"], f["order_ref"], f"{f['job']} {f['item']}",
                      f["attempts"], f["error"]] for f in data["parked_setups"]]))
    left("parked_setups")
    out.print(_payments_table("Unapplied payments", data["unapplied_payments"]))
    left("unapplied_payments")
    out.print(table("Parked emails", ["email", "order", "template", "to", "attempts", "error"],
                    [[e["email_id"], e["order_id"], e["template"], e["recipient"],
                      e["attempts"], e["error"]] for e in data["parked_emails"]]))
    left("parked_emails")


# -- broker --------------------------------------------------------------------------------

def _with_broker(fn: Callable[[Any, Names], Awaitable[T]]) -> T:
    s = settings()

    async def go() -> T:
        connection = await broker.connect(s.amqp_url, attempts=2)
        async with connection:
            return await fn(connection, Names(s.namespace))

    return run_async(go())


def _queues_table(rows: list[dict[str, Any]]) -> RenderableType:
    return table("Queues", ["queue", "messages", "consumers"],
                 [[r["queue"], "missing (run migrate)" if r.get("missing") else r["messages"],
                   r["consumers"]] for r in rows])


@app.command()
def queues(
    watch: bool = typer.Option(False, "--watch", help="Refresh every second."),
    as_json: bool = JsonOpt,
) -> None:
    """Depth and consumers of every work queue and dead-letter queue."""
    if not watch:
        rows = _with_broker(broker_ops.queue_depths)
        return emit_json(rows) if as_json else out.print(_queues_table(rows))
    s = settings()

    async def go() -> None:
        connection = await broker.connect(s.amqp_url, attempts=2)
        async with connection:
            if as_json:  # one line per refresh, for a script to read as it comes
                while True:
                    rows = await broker_ops.queue_depths(connection, Names(s.namespace))
                    try:
                        sys.stdout.write(json.dumps({"at": datetime.now(UTC).isoformat(),
                                                     "queues": rows}, default=str) + "\n")
                        sys.stdout.flush()
                    except BrokenPipeError:  # the reader has had enough (`| head -1`)
                        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                        return
                    await asyncio.sleep(1)
            with Live(console=out, auto_refresh=False) as live:
                while True:
                    rows = await broker_ops.queue_depths(connection, Names(s.namespace))
                    live.update(_queues_table(rows), refresh=True)
                    await asyncio.sleep(1)

    try:
        run_async(go())
    except KeyboardInterrupt:
        pass


@app.command("dead-letters")
def dead_letters(
    queue: str = typer.Argument(None, help="A service or queue name (default: all)."),
    replay: bool = typer.Option(False, "--replay", help="Publish them back to be processed."),
    limit: int = typer.Option(100, min=1),
    as_json: bool = JsonOpt,
) -> None:
    """Inspect dead letters with their reasons, or replay them."""
    s = settings()
    try:
        if replay:
            result = _with_broker(
                lambda c, n: broker_ops.replay_dead_letters(
                    c, n, queue, limit=limit, user_id=_amqp_user(s),
                    service_users=Publishers.from_settings(s.publishers).users[Party.SERVICE]))
            if as_json:
                emit_json({"replayed": result.replayed, "discarded": result.discarded, "failed": [
                    {"message_id": message_id, "error": error} for message_id, error in result.failed]})
            else:
                _say(f"replayed {result.replayed} dead letter(s)")
                if result.discarded:
                    _say(f"discarded {len(result.discarded)} expired command(s): their senders"
                         " were told they expired unapplied")
                for message_id, error in result.failed:
                    print(views.printable(f"error: not replayed, left in its queue: "
                                          f"{message_id}: {error}"), file=sys.stderr)
            if result.failed:
                raise typer.Exit(1)
            return
        rows = _with_broker(lambda c, n: broker_ops.dead_letters(c, n, queue, limit=limit))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        return emit_json(rows)
    out.print(table("Dead letters", ["queue", "routing key", "message id", "reason", "at"],
                    [[r["queue"], r["routing_key"], r["message_id"], r["reason"],
                      (r["dead_at"] or "")[:19]] for r in rows]))


# -- operator actions ------------------------------------------------------------------------

TimeoutOpt = typer.Option(10.0, "--timeout", min=0.5, help="Seconds to wait for the answer.")


async def _send_review(s: Settings, action: str, order_ids: list[int], *, wait_seconds: float,
                       options: dict[str, bool] | None = None) -> dict[int, dict[str, Any] | None]:
    """Publish one review command per order and collect the answers (None: unanswered)."""
    connection = await broker.connect(s.amqp_url, attempts=2)
    async with connection:
        channel = await broker.open_publisher(connection)
        exchange = await channel.get_exchange(Names(s.namespace).exchange)
        replies = await broker.declare_reply_queue(channel)
        operator = _amqp_user(s)
        waiting: dict[str, int] = {}
        for order_id in order_ids:
            body: dict[str, Any] = {"order_id": order_id, "action": action,
                                    "operator": operator or "operator"}
            if options is not None:
                body["options"] = options
            correlation = str(uuid.uuid4())
            message = broker.json_message(
                body, routing_key="review.command", correlation_id=correlation,
                reply_to=replies.name,
                # The broker checks it: history names the operator's own RabbitMQ user.
                user_id=operator or None,
                # Unanswered in time, the command expires instead of surprising anyone later.
                expiration=wait_seconds)
            try:
                await broker.publish(exchange, "review.command", message)
            except PublishError:
                raise UserError("no queue takes review.command: run `ordermill migrate`") from None
            waiting[correlation] = order_id
        answers: dict[int, dict[str, Any] | None] = dict.fromkeys(order_ids)
        try:
            async with replies.iterator(timeout=wait_seconds) as incoming:
                async for reply in incoming:
                    await reply.ack()
                    order_id = waiting.pop(reply.correlation_id or "", None)
                    if order_id is not None:
                        answers[order_id] = json.loads(reply.body)
                    if not waiting:
                        break
        except TimeoutError:
            pass
        return answers


def _unanswered(timeout: float) -> str:
    return (f"no answer from the review service within {timeout:g} s (is `ordermill run` "
            "running?); the command expired unapplied")


def review(action: str, order_id: int, *, timeout: float,
           options: dict[str, bool] | None = None) -> None:
    """Send a review command and print the review service's answer."""
    s = settings()
    answer = run_async(_send_review(s, action, [order_id], wait_seconds=timeout,
                                    options=options))[order_id]
    if answer is None:
        raise UserError(_unanswered(timeout))
    if not answer.get("ok"):
        raise UserError(answer.get("error", "refused"))
    _say(f"order {order_id}: {answer['status']}")


@app.command()
def accept(
    order_id: int = OrderIdArg,
    no_module_create: bool = typer.Option(False, "--no-module-create",
                                          help="Do not set up the services not yet set up."),
    no_welcome_email: bool = typer.Option(False, "--no-welcome-email"),
    no_register: bool = typer.Option(False, "--no-register", help="Do not register domains."),
    timeout: float = TimeoutOpt,
) -> None:
    """Accept a Pending order (screening finished): it becomes Active."""
    review("accept", order_id, timeout=timeout, options={
        "run_module_create": not no_module_create, "send_welcome_email": not no_welcome_email,
        "register_domains": not no_register})


def _action_command(name: str, action: str, help_text: str) -> None:
    def command(order_id: int = OrderIdArg, timeout: float = TimeoutOpt) -> None:
        review(action, order_id, timeout=timeout)

    command.__doc__ = help_text
    app.command(name)(command)


for _name, _action, _help in (
    ("deny", "deny", "Deny a Pending order: it becomes Cancelled."),
    ("cancel", "cancel", "Cancel a Pending or Active order; live accounts are terminated."),
    # `ordermill fraud ORDER_ID`: the `fraud` group (cli/fraud.py) keeps it.
    ("set-pending", "pending", "Set a Cancelled or Fraud order back to Pending."),
    ("delete", "delete", "Hide a Cancelled or Fraud order (its record is kept)."),
    ("retry", "retry", "Run the order's parked setups again."),
):
    _action_command(_name, _action, _help)


@app.command()
def rescreen(
    order_id: int = typer.Argument(None, min=1, max=BIGINT_MAX,
                                   help="The order (or --status, --all-errors)."),
    all_errors: bool = typer.Option(
        False, "--all-errors",
        help="Every Pending order whose screening could not complete (after a MaxMind outage)."),
    status: str = typer.Option(None, "--status",
                               help="Every order in this status (Pending: the one screened)."),
    screening: str = typer.Option(None, "--screening",
                                  help="Only orders whose screening is this (review, error, ...)."),
    since: str = typer.Option(None, help="Placed on or after (ISO date or time, UTC)."),
    until: str = typer.Option(None, help="Placed before (ISO date or time, UTC)."),
    timeout: float = TimeoutOpt,
) -> None:
    """Screen a Pending order for fraud again, or every one in a state (after a rule change).
    Every screening is kept: `ordermill show` lists them, the latest first."""
    from cli.fraud import rescreen_filter

    chosen = rescreen_filter(order_id=order_id, all_errors=all_errors, status=status,
                             screening=screening, since=_moment(since, "--since"),
                             until=_moment(until, "--until"), error=UserError)
    if chosen is None:
        return review("rescreen", order_id, timeout=timeout)
    s = settings()

    async def held() -> list[int]:
        async with database(s) as conn:
            return await chosen.order_ids(conn)

    order_ids = run_async(held())
    if not order_ids:
        _say(chosen.none_found())
        return
    answers: dict[int, dict[str, Any] | None] = {}
    for start in range(0, len(order_ids), 500):  # a bounded number of replies in flight
        answers |= run_async(_send_review(s, "rescreen", order_ids[start:start + 500],
                                          wait_seconds=timeout))
    refused = 0
    for oid, answer in answers.items():
        if answer is None or not answer.get("ok"):
            refused += 1
            _say(f"order {oid}: {_unanswered(timeout) if answer is None else answer.get('error')}")
        else:
            _say(f"order {oid}: screening again")
    if refused:
        raise UserError(f"{refused} of {len(order_ids)} order(s) not re-screened")


@app.command()
def place(
    client_id: int = typer.Option(None, "--client-id", min=1, max=BIGINT_MAX,
                                  help="An existing client."),
    email: str = typer.Option(None, "--email", help="A new client's email (or an existing one)."),
    first_name: str = typer.Option("", "--first-name"),
    last_name: str = typer.Option("", "--last-name"),
    country: str = typer.Option(None, "--country"),
    company: str = typer.Option(None, "--company"),
    address1: str = typer.Option(None, "--address1", help="A new client's billing address."),
    address2: str = typer.Option(None, "--address2"),
    city: str = typer.Option(None, "--city"),
    state: str = typer.Option(None, "--state", help="State or region."),
    postcode: str = typer.Option(None, "--postcode"),
    phone: str = typer.Option(None, "--phone", help="As the client gave it, e.g. +44 20 7946 0000"),
    product: list[str] = typer.Option(
        [], "--product", help="SLUG[:CYCLE][@DOMAIN], e.g. starter:annually@ann.example"),
    domain: list[str] = typer.Option(
        [], "--domain", help="NAME[:register|transfer][:YEARS], e.g. ann.com:register:2"),
    epp_code: list[str] = typer.Option([], "--epp-code", help="DOMAIN=CODE for a transfer."),
    payment_method: str = typer.Option(None, "--payment-method"),
    promo: str = typer.Option(None, "--promo"),
    currency: str = typer.Option(None, "--currency"),
    no_confirmation: bool = typer.Option(False, "--no-confirmation"),
    no_invoice: bool = typer.Option(False, "--no-invoice"),
    ref: str = typer.Option(None, "--ref", help="The order's ref (default: a new one)."),
    timeout: float = TimeoutOpt,
) -> None:
    """Add New Order: place an order for a client, as an operator."""
    if (client_id is None) == (email is None):
        raise UserError("give either --client-id or --email")
    details = {"first_name": first_name, "last_name": last_name, "country": country,
               "company": company, "address1": address1, "address2": address2, "city": city,
               "state": state, "postcode": postcode, "phone": phone}
    given = [name.replace("_", "-") for name, value in details.items() if value not in (None, "")]
    if client_id is not None and given:
        raise UserError(f"--{given[0]} is a new client's detail: give it with --email, "
                        "not --client-id")
    codes = dict(code.split("=", 1) for code in epp_code if "=" in code)
    items: list[dict[str, Any]] = []
    for spec in product:
        slug_cycle, _, on_domain = spec.partition("@")
        slug, _, cycle = slug_cycle.partition(":")
        items.append({"type": "product", "product": slug, "billing_cycle": cycle or "monthly",
                      "domain": on_domain or None})
    for spec in domain:
        name, _, rest = spec.partition(":")
        action, _, years = rest.partition(":")
        if years and not years.isdigit():
            raise UserError(f"--domain {spec!r}: years {years!r} is not a number")
        items.append({"type": "domain", "domain": name, "action": action or "register",
                      "years": int(years or 1), "epp_code": codes.get(name)})
    body = {
        "order_ref": ref or f"operator-{uuid.uuid4().hex[:12]}",
        "client": {"id": client_id} if client_id is not None else {"email": email, **details},
        "items": items, "currency": currency, "payment_method": payment_method,
        "promo_code": promo, "send_confirmation": not no_confirmation,
        "generate_invoice": not no_invoice,
    }
    try:
        PlaceOrder.model_validate(body)  # a mistake is told here, not by a dead letter
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc, prefix="")) from None
    s = settings()

    async def go() -> tuple[str, dict[str, Any]]:
        connection = await broker.connect(s.amqp_url, attempts=2)
        async with connection:
            channel = await broker.open_publisher(connection)
            names = Names(s.namespace)
            exchange = await channel.get_exchange(names.exchange)
            answers = await channel.declare_queue(exclusive=True, auto_delete=True)
            for key in ("order.placed", "order.rejected"):
                await answers.bind(names.exchange, routing_key=key)
            await broker.publish(exchange, "order.place", broker.json_message(
                body, routing_key="order.place", user_id=_amqp_user(s)))
            try:
                async with answers.iterator(timeout=timeout) as events:
                    async for event in events:
                        await event.ack()
                        data = json.loads(event.body)
                        if data.get("order_ref") == body["order_ref"]:
                            return event.routing_key or "", data
            except TimeoutError:
                pass
            raise UserError(f"order {body['order_ref']} published, but not placed within "
                            f"{timeout:g} s: is `ordermill run` running?")
        raise AssertionError("unreachable")

    key, data = run_async(go())
    if key == "order.rejected":
        raise UserError(f"order {body['order_ref']} refused: {data['reason']}")
    _say(f"order {data['order_id']} placed: ref {data['order_ref']}, number "
         f"{data['order_number']}, total {data['total']} {data['currency']}"
         + (f", invoice {data['invoice_id']}" if data["invoice_id"] else ", no invoice"))


@app.command()
def pay(
    invoice_id: int = typer.Argument(..., min=1, max=BIGINT_MAX),
    amount: str = typer.Option(..., "--amount", help="A decimal amount, e.g. 12.95."),
    transaction_id: str = typer.Option(..., "--transaction-id"),
    gateway: str = typer.Option("manual", "--gateway"),
    currency: str = typer.Option(None, "--currency", help="Default: the invoice's."),
) -> None:
    """Record a payment: publishes payment.received, as a gateway would."""
    try:
        value = Decimal(amount)
    except InvalidOperation:
        raise UserError(f"amount {amount!r} is not a number") from None
    if value.is_finite() and value >= 10**10:  # what an invoice can total (numeric(12,2))
        raise UserError(f"amount {amount!r} is too large")
    if not value.is_finite() or value <= 0 or value != round(value, 2):
        raise UserError(f"amount {amount!r} must be positive with at most two decimals")
    s = settings()

    async def go() -> str:
        async with database(s) as conn:
            chosen = currency or await conn.fetchval(
                "SELECT coalesce((SELECT currency FROM invoices WHERE id = $1),"
                " (SELECT value FROM catalog_meta WHERE key = 'default_currency'))", invoice_id)
        connection = await broker.connect(s.amqp_url, attempts=2)
        async with connection:
            channel = await broker.open_publisher(connection)
            exchange = await channel.get_exchange(Names(s.namespace).exchange)
            message = broker.json_message(
                {"invoice_id": invoice_id, "amount": str(value), "currency": chosen,
                 "gateway": gateway, "transaction_id": transaction_id},
                routing_key="payment.received",
                # The broker checks it; with PAYMENT_PUBLISHERS set, only named users' count.
                user_id=_amqp_user(s))
            try:
                await broker.publish(exchange, "payment.received", message)
            except PublishError:
                raise UserError("no queue takes payment.received: run `ordermill migrate`") from None
            return message.message_id

    message_id = run_async(go())
    _say(f"payment of {value} for invoice {invoice_id} published (message {message_id})")


class ReportTag(StrEnum):
    chargeback = "chargeback"
    not_fraud = "not_fraud"
    suspected_fraud = "suspected_fraud"
    spam_or_abuse = "spam_or_abuse"


class ReportProvider(StrEnum):
    maxmind = "maxmind"
    fraudlabspro = "fraudlabspro"


@app.command("fraud-report")
def fraud_report(
    order_id: int = OrderIdArg,
    tag: ReportTag = typer.Option(..., "--tag", help="What the order turned out to be."),
    notes: str | None = typer.Option(None, help="A note for the provider."),
    provider: ReportProvider = typer.Option(
        None, "--provider", help="Default: the provider that screened the order last."),
) -> None:
    """Report an order's outcome to the fraud provider, to train its scoring: MaxMind
    (minFraud report transactions) or FraudLabs Pro (feedback: not_fraud is APPROVE,
    chargeback and suspected_fraud REJECT, spam_or_abuse REJECT_BLACKLIST)."""
    from cli.fraud import FLP_FEEDBACK, report_row
    from services.fraud.providers.base import ProviderError
    from services.fraud.providers.fraudlabspro import FraudLabsProProvider, Misconfigured
    from services.fraud.providers.maxmind import report

    s = settings()

    async def go() -> tuple[str, str | None]:
        async with database(s) as conn:
            row = await report_row(conn, order_id)
            if row is None:
                raise UserError(f"order {order_id} does not exist")
            chosen = provider or row["provider"] or (
                s.fraud_provider if s.fraud_provider != "rules" else "maxmind")
            try:
                if chosen == "fraudlabspro":
                    if row["flp_id"] is None:
                        raise UserError(f"order {order_id} has no FraudLabs Pro transaction"
                                        " to give feedback on")
                    try:
                        flp = FraudLabsProProvider(s.fraudlabspro)
                    except Misconfigured as exc:
                        raise UserError(f"fraud-report needs {str(exc).split()[-1]}") from None
                    try:
                        await flp.feedback(row["flp_id"], FLP_FEEDBACK[tag.value], notes)
                    finally:
                        await flp.close()
                    detail = {"tag": tag.value, "provider": chosen,
                              "action": FLP_FEEDBACK[tag.value], "fraudlabspro_id": row["flp_id"]}
                    transaction = row["flp_id"]
                else:
                    if s.maxmind_account_id is None or s.maxmind_license_key is None:
                        raise UserError("fraud-report needs MAXMIND_ACCOUNT_ID and"
                                        " MAXMIND_LICENSE_KEY")
                    await report(s.maxmind, tag=tag.value,
                                 transaction_id=str(row["order_number"]),
                                 ip_address=str(row["ip_address"]) if row["ip_address"] else None,
                                 minfraud_id=row["minfraud_id"], notes=notes)
                    detail = {"tag": tag.value, "minfraud_id": row["minfraud_id"]}
                    transaction = row["minfraud_id"]
            except ProviderError as exc:
                raise UserError(str(exc)) from None
            await add_history(conn, order_id, actor=_amqp_user(s) or "cli",
                              action="fraud_reported", detail=detail)
            return chosen, transaction

    chosen, transaction = run_async(go())
    if chosen == "fraudlabspro":
        _say(f"order {order_id} reported to FraudLabs Pro as {FLP_FEEDBACK[tag.value]}"
             f" ({tag.value}, transaction {transaction})")
    else:
        _say(f"order {order_id} reported to MaxMind as {tag.value}"
             + (f" (minFraud transaction {transaction})" if transaction else ""))


# -- clients -------------------------------------------------------------------------------

clients_app = typer.Typer(help="Which storefronts may use a client.", no_args_is_help=True)
app.add_typer(clients_app, name="clients")
ClientIdArg = typer.Argument(..., min=1, max=BIGINT_MAX, show_default=False)
StorefrontArg = typer.Argument(..., help='The storefront\'s RabbitMQ user ("" for none).')


@clients_app.command("link")
def clients_link(client_id: int = ClientIdArg, storefront: str = StorefrontArg) -> None:
    """Let a storefront place orders for an existing client (by email or by id)."""
    from cli.clients import LinkError, link

    s = settings()
    operator = _amqp_user(s) or os.environ.get("USER") or "operator"
    try:
        added = _with_db(lambda c: link(c, client_id, storefront, operator))
    except LinkError as exc:
        raise UserError(str(exc)) from None
    out.print(Text(f"client {client_id} {'linked' if added else 'was already linked'}"
                   f" to storefront {storefront!r}"))


@clients_app.command("unlink")
def clients_unlink(client_id: int = ClientIdArg, storefront: str = StorefrontArg) -> None:
    """Stop a storefront using a client it did not create (its orders stay)."""
    from cli.clients import LinkError, unlink

    try:
        removed = _with_db(lambda c: unlink(c, client_id, storefront))
    except LinkError as exc:
        raise UserError(str(exc)) from None
    out.print(Text(f"client {client_id} {'unlinked from' if removed else 'was not linked to'}"
                   f" storefront {storefront!r}"))


@app.command()
def demo(
    orders: int = typer.Option(200, min=1, help="How many orders to publish."),
    rate: float = typer.Option(20.0, min=0.1, help="Orders per second."),
    timeout: float = typer.Option(60.0, min=1, help="Seconds to wait for screening."),
    cancel: int = typer.Option(3, min=0, help="Orders with an account to cancel at the end, "
                                              "as an operator (their accounts are terminated)."),
) -> None:
    """A storefront simulator: publishes orders (some fraudulent) and shows them flow."""
    from cli.demo import run_demo

    s = settings()
    run_async(run_demo(s, out, orders=orders, rate=rate, wait_seconds=timeout, cancel=cancel))


@app.command()
def contract(
    out_dir: Path = typer.Option(None, "--out", file_okay=False,
                                 help="Write asyncapi.json and schemas/<routing-key>.json here."),
    yaml: bool = typer.Option(False, "--yaml", help="AsyncAPI as YAML (needs PyYAML)."),
    namespace: str = typer.Option("ordermill", envvar="ORDERMILL_NAMESPACE",
                                  help="The exchange's name (the namespace)."),
) -> None:
    """The message contract as AsyncAPI 3.0 (stdout) and JSON Schemas (docs/contract.md)."""
    from cli import contract as spec

    try:
        if out_dir is None:
            sys.stdout.write(spec.render(spec.asyncapi(namespace), yaml=yaml))
            return
        for path in spec.write(out_dir, namespace, yaml=yaml):
            print(path)
    except (RuntimeError, OSError) as exc:
        raise UserError(str(exc)) from None


# -- the web console ---------------------------------------------------------------------------

def _register_console() -> None:
    from cli.console import console
    from cli.operators import operators_app

    app.command("console")(console)
    app.add_typer(operators_app, name="operator")


_register_console()


# Click's exceptions, whether typer vendors click or uses the package.
_click_errors = sys.modules[typer.BadParameter.__module__]


def main() -> None:
    # Library logs (aiormq's connection errors, retry notices) would print around a command's
    # own one-line error: silent unless a command sets logging up (`run`, `migrate`).
    logging.getLogger().addHandler(logging.NullHandler())
    try:
        code = app(standalone_mode=False)
    except _click_errors.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help())
        raise SystemExit(0) from None
    except _click_errors.UsageError as exc:
        # One line, as every other mistake: the message and where to read more.
        command = exc.ctx.command_path if exc.ctx else "ordermill"
        message = " ".join(exc.format_message().split())  # click may list choices on lines
        print(f"error: {views.printable(message)} (see `{command} --help`)", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except _click_errors.ClickException as exc:
        print(f"error: {views.printable(' '.join(exc.format_message().split()))}",
              file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        raise SystemExit(1) from None
    except UserError as exc:
        # Plain print: one line, never wrapped to the terminal's width.
        print(f"error: {views.printable(exc)}", file=sys.stderr)
        raise SystemExit(1) from None
    # A command's own Exit (and --help) come back as an exit code.
    raise SystemExit(code if isinstance(code, int) else 0)
if __name__ == "__main__":  # how a supervisor starts its worker processes (python -m cli.main)
    main()
