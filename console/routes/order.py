"""One order: client, items and their setup, invoice, payments, Fraud Check Results, history,
notes; the actions, each confirmed, sent as a review command and answered."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from console import queries
from console.actions import ACTIONS, REPORT_TAGS, applicable
from console.web import Ctx, page
from shared.contracts import NOTE_MAX_LENGTH

ACCEPT_OPTIONS = (("run_module_create", "Run module create (set up the hosting accounts)"),
                  ("send_welcome_email", "Send the welcome email"),
                  ("register_domains", "Register the domains"))


def _not_found(order_id: int) -> Response:
    return PlainTextResponse(f"Order {order_id} does not exist.", status_code=404)


async def _render_order(request: Request, ctx: Ctx, order_id: int, status_code: int = 200,
                        **extra: Any) -> Response:
    async with ctx.state.pool.acquire() as conn:
        data = await queries.order_page(conn, order_id)
    if data is None:
        return _not_found(order_id)
    offered = applicable(data["status"], deleted=data["deleted"], parked=data["parked"],
                         screening=data["screening"])
    return ctx.render(request, "order.html", status_code=status_code, active="orders", o=data,
                      actions=[a for name, a in ACTIONS.items() if name in offered],
                      note_max=NOTE_MAX_LENGTH, **extra)


@page()
async def order(request: Request, ctx: Ctx) -> Response:
    return await _render_order(request, ctx, request.path_params["order_id"],
                               placed=request.query_params.get("placed") == "1")


@page(act=True)
async def confirm(request: Request, ctx: Ctx) -> Response:
    order_id, name = request.path_params["order_id"], request.path_params["action"]
    if name not in ACTIONS:
        return PlainTextResponse(f"Unknown action {name!r}.", status_code=404)
    async with ctx.state.pool.acquire() as conn:
        heads = await queries.order_heads(conn, [order_id])
    if not heads:
        return _not_found(order_id)
    return ctx.render(request, "confirm.html", active="orders", o=heads[0], action=ACTIONS[name],
                      accept_options=ACCEPT_OPTIONS, tags=REPORT_TAGS, note_max=NOTE_MAX_LENGTH)


@page(act=True)
async def act(request: Request, ctx: Ctx) -> Response:
    order_id, name = request.path_params["order_id"], request.path_params["action"]
    if name not in ACTIONS:
        return PlainTextResponse(f"Unknown action {name!r}.", status_code=404)
    form = await request.form()
    extra: dict[str, Any] = {}
    if name == "accept":
        extra["options"] = {key: form.get(key) == "on" for key, _ in ACCEPT_OPTIONS}
    if name == "report":
        extra["tag"] = str(form.get("tag") or "") or None
        extra["note"] = str(form.get("note") or "")[:NOTE_MAX_LENGTH] or None
    answer = await ctx.review(order_id, name, **extra)
    return await _render_order(request, ctx, order_id, answer=answer, done=ACTIONS[name])


@page(act=True)
async def add_note(request: Request, ctx: Ctx) -> Response:
    order_id = request.path_params["order_id"]
    form = await request.form()
    text = str(form.get("note") or "").strip()
    if not text or len(text) > NOTE_MAX_LENGTH:
        return await _render_order(request, ctx, order_id, status_code=400, answer={
            "ok": False, "error": f"A note needs 1 to {NOTE_MAX_LENGTH} characters."})
    answer = await ctx.review(order_id, "note", note=text)
    return await _render_order(request, ctx, order_id, answer=answer, noted=True)


routes = [
    Route("/orders/{order_id:int}", order, methods=["GET"]),
    Route("/orders/{order_id:int}/confirm/{action}", confirm, methods=["GET"]),
    Route("/orders/{order_id:int}/act/{action}", act, methods=["POST"]),
    Route("/orders/{order_id:int}/notes", add_note, methods=["POST"]),
]
