"""The dashboard: what needs an operator now, and the queues. Its body refreshes itself."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from console import queries
from console.web import Ctx, page


async def _data(ctx: Ctx) -> dict[str, Any]:
    async with ctx.state.pool.acquire() as conn:
        data = await queries.dashboard(conn)
    queues = await ctx.state.publisher.queue_depths()
    data["queues"] = queues
    data["dead_letters"] = None if queues is None else sum(
        q["messages"] or 0 for q in queues if q["queue"].endswith(".dead"))
    return data


@page()
async def dashboard(request: Request, ctx: Ctx) -> Response:
    return ctx.render(request, "dashboard.html", active="dashboard", **await _data(ctx))


@page()
async def dashboard_body(request: Request, ctx: Ctx) -> Response:
    return ctx.render(request, "_dashboard_body.html", **await _data(ctx))


routes = [Route("/", dashboard, methods=["GET"]),
          Route("/dashboard/body", dashboard_body, methods=["GET"])]
