"""What every page shares: the console's state, who is signed in, CSRF on every POST, roles,
rendering (Jinja2, autoescaped) and publishing a review command as the operator.

A page is `@page()` (any operator signed in) or `@page(act=True)` (a reviewer: a viewer gets
403); every POST must carry the session's CSRF token (one from a session that has expired
is sent to sign in). Pages take (request, ctx)."""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import asyncpg
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from console import accounts, filters
from console.accounts import Operator, SignInPolicy
from console.exact_counts import ExactCounts
from console.publisher import Publisher, Reply, Unavailable
from console.security import COOKIE, CSRF_FIELD, CSRF_HEADER, Session, SessionCodec
from console.warm_up import WarmUp
from shared.settings_parts import ConsoleSettings

log = logging.getLogger("ordermill.console")
HERE = Path(__file__).resolve().parent


@dataclass
class NavItem:
    label: str
    path: str
    key: str
    act: bool = False  # only for an operator who may act (a viewer is not shown it)


# The menu, in order. A page family adds its entry here when it registers its routes.
NAV: list[NavItem] = [NavItem("Dashboard", "/", "dashboard"),
                      NavItem("Pending orders", "/orders", "orders"),
                      NavItem("Add New Order", "/orders/new", "new", act=True),
                      NavItem("Module queue", "/module-queue", "modules"),
                      NavItem("Payments", "/payments", "payments"),
                      NavItem("Dead letters", "/dead-letters", "dead")]


def templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      trim_blocks=True, lstrip_blocks=True)
    filters.install(env)
    return env


def compile_all(env: Environment) -> int:
    """Compile every page's template now, when the console's app is built (before its
    server starts and its heap is settled), rather than at its first render, which the first
    operator to open that page after each restart paid (order.html: about 50 ms on 2 cores;
    docs/performance.md, "First visits that were the templates'"). Only `.html` files: an
    editor's backup left beside them is not a template. Jinja's cache (400) keeps them all.
    Returns how many."""
    names = env.list_templates(extensions=["html"])
    for name in names:
        env.get_template(name)
    return len(names)


def compiled_templates() -> Environment:
    env = templates()
    compile_all(env)
    return env


@dataclass
class ConsoleState:
    """A console process's resources: handed to every page through `request.app.state`."""

    settings: ConsoleSettings
    pool: asyncpg.Pool  # read-only: default_transaction_read_only
    publisher: Publisher
    codec: SessionCodec
    env: Environment = field(default_factory=templates)
    counts: ExactCounts = field(default_factory=ExactCounts)  # GET /orders/count's turns
    warm_up: WarmUp = field(default_factory=lambda: WarmUp(enabled=False))

    @property
    def policy(self) -> SignInPolicy:
        return SignInPolicy(self.settings.signin_max_failures, self.settings.signin_window_minutes)


@dataclass
class Ctx:
    """One request's context: the session, the operator signed in, and the state."""

    state: ConsoleState
    session: Session
    operator: Operator | None

    def render(self, request: Request, template_name: str, status_code: int = 200,
               **context: Any) -> HTMLResponse:
        template = self.state.env.get_template(template_name)
        html = template.render(request=request, operator=self.operator, csrf=self.session.csrf,
                               nav=NAV, **context)
        response = HTMLResponse(html, status_code=status_code)
        response.headers["cache-control"] = "no-store"
        return response

    async def review(self, order_id: int, action: str, **extra: Any) -> Reply:
        """One review command as the operator signed in; the review service's answer, or
        one as it would say it (`ok` false) when there is none."""
        assert self.operator is not None
        body = {"order_id": order_id, "action": action, "operator": self.operator.name,
                **{k: v for k, v in extra.items() if v is not None}}
        timeout = self.state.settings.review_timeout
        try:
            reply = await self.state.publisher.review(body, wait_seconds=timeout)
        except Unavailable as exc:
            return {"ok": False, "order_id": order_id, "error": str(exc)}
        if reply is None:
            return {"ok": False, "order_id": order_id, "error":
                    f"no answer from the review service within {timeout:g} s (is it running?);"
                    " the command expired unapplied"}
        log.info("console action", extra={"order_id": order_id, "action": action,
                                          "operator": self.operator.name, "ok": reply.get("ok")})
        return reply


def state_of(request: Request) -> ConsoleState:
    return request.app.state.console


def write_session(response: Response, request: Request, ctx: Ctx) -> None:
    state = ctx.state
    secure = state.settings.secure_cookies or request.url.scheme == "https"
    response.set_cookie(COOKIE, state.codec.dumps(ctx.session), max_age=state.codec.max_age,
                        httponly=True, samesite="lax", secure=secure, path="/")


async def load(request: Request) -> Ctx:
    state = state_of(request)
    session = state.codec.loads(request.cookies.get(COOKIE))
    operator = None
    if session is None:
        session = Session(changed=True)
    elif session.operator_id is not None:
        async with state.pool.acquire() as conn:
            operator = await accounts.by_id(conn, session.operator_id)
        # Removed, disabled, or its password changed since: signed out.
        if operator is None or operator.password_changed_at.timestamp() != session.password_epoch:
            operator, session = None, Session(changed=True)
    return Ctx(state, session, operator)


def forbidden(message: str) -> Response:
    return PlainTextResponse(message, status_code=403)


Page = Callable[[Request, Ctx], Awaitable[Response]]


Endpoint = Callable[[Request], Awaitable[Response]]


def page(*, act: bool = False, signed_in: bool = True) -> Callable[[Page], Endpoint]:
    def decorate(fn: Page) -> Endpoint:
        @functools.wraps(fn)
        async def endpoint(request: Request) -> Response:
            ctx = await load(request)
            if request.method == "POST":
                given = request.headers.get(CSRF_HEADER)
                if given is None:
                    form = await request.form()
                    value = form.get(CSRF_FIELD)
                    given = value if isinstance(value, str) else None
                if not ctx.session.csrf_ok(given):
                    if signed_in and ctx.operator is None:  # expired: its token went with it
                        return sign_in_redirect(request)
                    return forbidden("Refused: the form's security token is missing or wrong."
                                     " Reload the page and try again.")
            if signed_in and ctx.operator is None:
                response = sign_in_redirect(request)
            elif act and not (ctx.operator and ctx.operator.may_act):
                return forbidden("Refused: a viewer cannot act on orders.")
            else:
                response = await fn(request, ctx)
            if ctx.session.changed:
                write_session(response, request, ctx)
            return response
        return endpoint
    return decorate


def sign_in_redirect(request: Request) -> Response:
    """To sign in, then back to the page the operator was on: for htmx (a list refreshing
    itself, a search) the page it was sent from (HX-Current-URL), not the fragment it asked
    for; for a refused POST the page its form was on."""
    target = _page_of(request)
    location = "/sign-in" + (f"?next={quote(target)}" if target != "/" else "")
    if request.headers.get("hx-request"):
        return Response(status_code=204, headers={"HX-Redirect": location})
    return RedirectResponse(location, status_code=303)


def _page_of(request: Request) -> str:
    """The path and query of the page a request was made from, if on this site; else "/"."""
    if request.headers.get("hx-request"):
        given = request.headers.get("hx-current-url") or ""
    elif request.method != "GET":
        given = request.headers.get("referer") or ""
    else:
        return request.url.path + (f"?{request.url.query}" if request.url.query else "")
    parts = urlsplit(given)
    if parts.netloc != request.url.netloc or not parts.path.startswith("/"):
        return "/"
    return parts.path + (f"?{parts.query}" if parts.query else "")


def new_session(operator: Operator) -> Session:
    """A fresh session at sign-in (a new CSRF token too: no fixation)."""
    return Session(csrf=secrets.token_urlsafe(32), operator_id=operator.id,
                   password_epoch=operator.password_changed_at.timestamp(), changed=True)
