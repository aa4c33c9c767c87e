"""Unapplied payments with their reason, and the dead letters with theirs (bodies with their
secrets redacted), each replayable from the console where the console may replay it.

Least privilege: the console replays only the dead letters of the routes it may send itself
(order.place, review.command: console/publisher.py CONSOLE_REPLAYS); the consumer believes
the console's replay header only there (shared/parties.py). A payment or an internal event
is replayed by an operator with `ordermill dead-letters --replay`."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cli.broker_ops import shown_body
from console import queries
from console.publisher import CONSOLE_REPLAYS, Unavailable
from console.web import Ctx, page
from shared.states import WaitingFor

DEAD_LETTERS_SHOWN = 100
WAITING = {WaitingFor.ORDER: "its order (applied when it is placed)",
           WaitingFor.REVIEW: "an operator to set its order back to Pending",
           None: "a person to look"}


def _int(value: object) -> int | None:
    text = str(value or "")
    return int(text) if text.isdigit() and len(text) < 19 else None


@page()
async def payments(request: Request, ctx: Ctx) -> Response:
    after = _int(request.query_params.get("after"))
    async with ctx.state.pool.acquire() as conn:
        data = await queries.unapplied_payments(conn, after=after)
    for p in data["payments"]:
        p["waiting"] = WAITING.get(p["waiting_for"], p["waiting_for"])
        p["dead_body"] = shown_body(p["dead_letter"].encode()) if p["dead_letter"] else None
    return ctx.render(request, "payments.html", active="payments", p=data, after=after)


def replayable(queue: str) -> bool:
    return any(queue.endswith(f".{service}.dead") for service in CONSOLE_REPLAYS)


async def _dead_letters(request: Request, ctx: Ctx, status_code: int = 200,
                        **extra: Any) -> Response:
    letters = await ctx.state.publisher.dead_letters(DEAD_LETTERS_SHOWN)
    for letter in letters or []:
        letter["replayable"] = bool(letter["routing_key"]) and replayable(letter["queue"])
    return ctx.render(request, "dead_letters.html", status_code=status_code,
                      active="dead", letters=letters, shown=DEAD_LETTERS_SHOWN,
                      console_replays=CONSOLE_REPLAYS, **extra)


@page()
async def dead_letters(request: Request, ctx: Ctx) -> Response:
    return await _dead_letters(request, ctx)


@page(act=True)
async def replay(request: Request, ctx: Ctx) -> Response:
    form = await request.form()
    queue, message_id = str(form.get("queue") or ""), str(form.get("message_id") or "")
    try:
        result = await ctx.state.publisher.replay(queue, message_id)
    except Unavailable as exc:
        return await _dead_letters(request, ctx, status_code=409, answer={
            "ok": False, "error": str(exc)})
    if result.replayed:
        answer = {"ok": True, "text": f"Replayed {message_id}."}
    elif result.discarded:
        answer = {"ok": True, "text": f"{message_id} had expired: its sender was told it expired"
                  " unapplied, so it was removed, not carried out late."}
    elif result.failed:
        answer = {"ok": False, "error": f"not replayed: {result.failed[0][1]}"}
    else:
        answer = {"ok": False, "error": f"{message_id} is no longer in {queue}."}
    return await _dead_letters(request, ctx, answer=answer)


routes = [
    Route("/payments", payments, methods=["GET"]),
    Route("/dead-letters", dead_letters, methods=["GET"]),
    Route("/dead-letters/replay", replay, methods=["POST"]),
]
