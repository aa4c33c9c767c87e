"""Sign in and sign out."""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from console import accounts
from console.security import Session
from console.web import Ctx, new_session, page

WRONG = "Wrong name or password."
LIMITED = "Too many failed sign-ins: try again later."


def _next(value: object) -> str:
    """Only a path of this site: never an address elsewhere (an open redirect)."""
    target = str(value or "/")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") \
            or "\\" in target:
        return "/"
    return target


@page(signed_in=False)
async def sign_in_form(request: Request, ctx: Ctx) -> Response:
    if ctx.operator is not None:
        return RedirectResponse(_next(request.query_params.get("next")), status_code=303)
    return ctx.render(request, "sign_in.html", next=_next(request.query_params.get("next")))


@page(signed_in=False)
async def sign_in(request: Request, ctx: Ctx) -> Response:
    form = await request.form()
    name, password = str(form.get("name") or ""), str(form.get("password") or "")
    target = _next(form.get("next"))
    address = request.client.host if request.client else "unknown"
    try:
        async with ctx.state.pool.acquire() as conn:
            operator = await accounts.sign_in(conn, name, password, address, ctx.state.policy)
    except accounts.TooManyFailures:
        return ctx.render(request, "sign_in.html", status_code=429, error=LIMITED, name=name,
                          next=target)
    if operator is None:
        return ctx.render(request, "sign_in.html", status_code=401, error=WRONG, name=name,
                          next=target)
    ctx.session = new_session(operator)
    return RedirectResponse(target, status_code=303)


@page(signed_in=False)
async def sign_out(request: Request, ctx: Ctx) -> Response:
    ctx.session = Session(changed=True)
    return RedirectResponse("/sign-in", status_code=303)


routes = [
    Route("/sign-in", sign_in_form, methods=["GET"]),
    Route("/sign-in", sign_in, methods=["POST"]),
    Route("/sign-out", sign_out, methods=["POST"]),
]
