"""Pending orders (WHMCS's List Pending Orders): filters, search, keyset pages, bulk actions.
The list refreshes itself (htmx polls its partial; ticked boxes are kept, hx-preserve). A
count that stopped early ("at least 206") is followed by the exact one (GET /orders/count,
fetched by the page itself once it is shown, and kept across the list's refreshes)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from console import order_list, queries
from console.actions import ACTIONS, BULK
from console.order_list import FilterError, OrderFilters
from console.web import Ctx, page

MAX_BULK = 200


def _int(value: object) -> int | None:
    text = str(value or "")
    return int(text) if text.isdigit() and len(text) < 19 else None


async def _list(request: Request, ctx: Ctx) -> dict[str, Any]:
    f = OrderFilters.of(request.query_params)
    after, before = _int(request.query_params.get("after")), _int(request.query_params.get("before"))
    try:
        async with ctx.state.pool.acquire() as conn:
            data = await order_list.order_list(conn, f, after=after, before=before)
            products = [r["slug"] for r in await conn.fetch("SELECT slug FROM products ORDER BY slug")]
        error = None
    except FilterError as exc:
        data, products, error = {"orders": [], "count": (0, False)}, [], str(exc)
    return {"f": f, "list": data, "products": products, "error": error,
            "statuses": order_list.STATUS_CHOICES, "screenings": order_list.SCREENING_CHOICES,
            "after": after, "before": before, "bulk": [ACTIONS[a] for a in BULK]}


@page()
async def orders(request: Request, ctx: Ctx) -> Response:
    return ctx.render(request, "orders.html", active="orders", **await _list(request, ctx))


@page()
async def orders_partial(request: Request, ctx: Ctx) -> Response:
    return ctx.render(request, "_order_list.html", **await _list(request, ctx))


@page()
async def order_count(request: Request, ctx: Ctx) -> Response:
    """The exact number of orders the filters match (a read: any operator), for the list's
    head: the plain count, stopped after order_list.EXACT_COUNT_SECONDS, when it says the
    budgeted count ("at least N") and how long it tried instead. A filter the list would
    refuse is refused the same way, in one line (400). Counts take turns, and one made in
    the last minute is said again, not made again (console/exact_counts.py); with too many
    waiting, the bound is said at once."""
    f = OrderFilters.of(request.query_params)
    counts, seconds = ctx.state.counts, order_list.EXACT_COUNT_SECONDS
    key = counts.key(f.query())
    view: dict[str, Any] = {"error": None, "exact": None, "count": None, "partial": False,
                            "seconds": seconds, "busy": False}
    try:
        if kept := counts.kept(key):
            view["exact"], view["at"] = kept
            return ctx.render(request, "_order_count.html", **view)
        async with counts.turn() as counting, ctx.state.pool.acquire() as conn:
            try:
                if not counting:
                    view["busy"] = True
                    raise order_list.CountStopped
                exact = await order_list.exact_count(conn, f, seconds)
                view["exact"], view["at"] = exact, counts.keep(key, exact)
            except order_list.CountStopped:
                view["count"], view["partial"] = await order_list.list_count(conn, f)
    except FilterError as exc:
        return ctx.render(request, "_order_count.html", status_code=400, error=str(exc))
    return ctx.render(request, "_order_count.html", **view)


@page(act=True)
async def bulk(request: Request, ctx: Ctx) -> Response:
    """First the confirmation (the orders and what will happen), then, confirmed, one review
    command per order and each one's answer."""
    form = await request.form()
    action = str(form.get("action") or "")
    ids = sorted({i for v in form.getlist("order_id") if (i := _int(v)) is not None})[:MAX_BULK]
    if action not in BULK or not ids:
        return ctx.render(request, "bulk.html", active="orders", status_code=400,
                          error="Choose an action and at least one order.", answers=None,
                          orders=[], action=None)
    async with ctx.state.pool.acquire() as conn:
        heads = await queries.order_heads(conn, ids)
    if form.get("confirm") != "yes":
        return ctx.render(request, "bulk.html", active="orders", orders=heads,
                          action=ACTIONS[action], answers=None, error=None)
    answers = {o["id"]: await ctx.review(o["id"], action) for o in heads}
    return ctx.render(request, "bulk.html", active="orders", orders=heads,
                      action=ACTIONS[action], answers=answers, error=None)


routes = [Route("/orders", orders, methods=["GET"]),
          Route("/orders/list", orders_partial, methods=["GET"]),
          Route("/orders/count", order_count, methods=["GET"]),
          Route("/orders/bulk", bulk, methods=["POST"])]
