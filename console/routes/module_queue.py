"""The module queue (WHMCS's Utilities > Module Queue): parked setups with their error; retry
one, retry all, mark one resolved. Each goes to the review service as a review command
(`retry` with the job, `retry` per order, `resolve` with the job): the console never writes."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from console import queries
from console.web import Ctx, page

RETRY_ALL_MAX = 200  # orders per "Retry all" (the rest stay for the next press)


def _int(value: object) -> int | None:
    text = str(value or "")
    return int(text) if text.isdigit() and len(text) < 19 else None


async def _render(request: Request, ctx: Ctx, status_code: int = 200, **extra: Any) -> Response:
    after = _int(request.query_params.get("after"))
    async with ctx.state.pool.acquire() as conn:
        data = await queries.parked_jobs(conn, after=after)
    return ctx.render(request, "module_queue.html", status_code=status_code,
                      active="modules", q=data, after=after, **extra)


@page()
async def module_queue(request: Request, ctx: Ctx) -> Response:
    return await _render(request, ctx)


async def _job(ctx: Ctx, job_id: int) -> dict[str, Any] | None:
    async with ctx.state.pool.acquire() as conn:
        return await queries.job(conn, job_id)


@page(act=True)
async def retry_one(request: Request, ctx: Ctx) -> Response:
    job = await _job(ctx, request.path_params["job_id"])
    if job is None:
        return PlainTextResponse("No such job.", status_code=404)
    answer = await ctx.review(job["order_id"], "retry", job_id=job["id"])
    return await _render(request, ctx, answers=[(job, "Retry", answer)])


@page(act=True)
async def resolve_confirm(request: Request, ctx: Ctx) -> Response:
    job = await _job(ctx, request.path_params["job_id"])
    if job is None:
        return PlainTextResponse("No such job.", status_code=404)
    return ctx.render(request, "resolve.html", active="modules", job=job)


@page(act=True)
async def resolve(request: Request, ctx: Ctx) -> Response:
    job = await _job(ctx, request.path_params["job_id"])
    if job is None:
        return PlainTextResponse("No such job.", status_code=404)
    answer = await ctx.review(job["order_id"], "resolve", job_id=job["id"])
    return await _render(request, ctx, answers=[(job, "Mark resolved", answer)])


@page(act=True)
async def retry_all(request: Request, ctx: Ctx) -> Response:
    """One `retry` per order with parked setups (oldest first), each answered."""
    async with ctx.state.pool.acquire() as conn:
        orders = await queries.orders_with_parked(conn, limit=RETRY_ALL_MAX)
    answers = [(o, "Retry", await ctx.review(o["order_id"], "retry")) for o in orders]
    return await _render(request, ctx, answers=answers)


routes = [
    Route("/module-queue", module_queue, methods=["GET"]),
    Route("/module-queue/retry-all", retry_all, methods=["POST"]),
    Route("/module-queue/{job_id:int}/retry", retry_one, methods=["POST"]),
    Route("/module-queue/{job_id:int}/resolve", resolve_confirm, methods=["GET"]),
    Route("/module-queue/{job_id:int}/resolve", resolve, methods=["POST"]),
]
