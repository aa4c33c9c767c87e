"""Add New Order (WHMCS's Orders > Add New Order): choose the client (search, or a new one
with its address), products and domains from the catalog, a promotion, the options; the
console publishes `order.place` as its own RabbitMQ user and opens the order once placement
answers (PlaceReply on the console's reply queue).

The order's ref is made when the form is first shown and travels with it: submitting twice
(a double click, a reload) places one order. An EPP code is a secret: it goes to placement
in the message and nowhere else (never back into the page, never into a log)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from console import catalog, clients
from console.publisher import Unavailable
from console.web import Ctx, page
from shared.contracts import PlaceOrder
from shared.runtime.text import describe_validation_error

log = logging.getLogger("ordermill.console")

PRODUCT_ROWS = 3
DOMAIN_ROWS = 3
NEW_CLIENT_FIELDS = ("email", "first_name", "last_name", "company", "country", "address1",
                     "address2", "city", "state", "postcode", "phone")
REF_PREFIX = "console-"


def new_ref() -> str:
    return f"{REF_PREFIX}{uuid.uuid4().hex[:16]}"


def _text(form: FormData, name: str, limit: int = 300) -> str:
    value = form.get(name)
    return value.strip()[:limit] if isinstance(value, str) else ""


def _texts(form: FormData, name: str, rows: int) -> list[str]:
    values = [v.strip()[:300] if isinstance(v, str) else "" for v in form.getlist(name)]
    return (values + [""] * rows)[:rows]


def read_form(form: FormData) -> dict[str, Any]:
    """The form's values as the page shows them again (EPP codes apart: see `epp_codes`)."""
    products = [{"product": p, "cycle": c or "monthly", "domain": d} for p, c, d in zip(
        _texts(form, "product", PRODUCT_ROWS), _texts(form, "cycle", PRODUCT_ROWS),
        _texts(form, "product_domain", PRODUCT_ROWS), strict=True)]
    domains = [{"domain": d, "action": a or "register", "years": y or "1"} for d, a, y in zip(
        _texts(form, "domain", DOMAIN_ROWS), _texts(form, "domain_action", DOMAIN_ROWS),
        _texts(form, "years", DOMAIN_ROWS), strict=True)]
    client_id = _text(form, "client_id")
    return {
        "ref": _text(form, "ref", 100) or new_ref(),
        "client_mode": "new" if _text(form, "client_mode") == "new" else "existing",
        "client_id": client_id if client_id.isdigit() and len(client_id) < 19 else "",
        "new": {name: _text(form, name) for name in NEW_CLIENT_FIELDS},
        "products": products, "domains": domains,
        "promo_code": _text(form, "promo_code", 50),
        "payment_method": _text(form, "payment_method", 50),
        "currency": _text(form, "currency", 3),
        "send_confirmation": form.get("send_confirmation") == "on",
        "generate_invoice": form.get("generate_invoice") == "on",
    }


def epp_codes(form: FormData) -> list[str]:
    return [v if isinstance(v, str) else "" for v in
            (form.getlist("epp_code") + [""] * DOMAIN_ROWS)[:DOMAIN_ROWS]]


class FormError(ValueError):
    """One readable line for the form."""


def order_body(values: dict[str, Any], codes: list[str]) -> dict[str, Any]:
    """The `order.place` body (shared/contracts.py PlaceOrder), checked here first: a mistake
    is said on the form, not by a dead letter."""
    if values["client_mode"] == "existing":
        if not values["client_id"]:
            raise FormError("Choose a client (search above), or create a new one.")
        client: dict[str, Any] = {"id": int(values["client_id"])}
    else:
        new = values["new"]
        if not new["email"]:
            raise FormError("A new client needs an email address.")
        client = {k: (v.upper() if k == "country" else v) or None for k, v in new.items()}
        client["first_name"], client["last_name"] = new["first_name"], new["last_name"]
    items: list[dict[str, Any]] = []
    for row in values["products"]:
        if row["product"]:
            items.append({"type": "product", "product": row["product"],
                          "billing_cycle": row["cycle"], "domain": row["domain"] or None})
        elif row["domain"]:
            raise FormError(f"Choose a product for {row['domain']}, or clear its domain.")
    for row, code in zip(values["domains"], codes, strict=True):
        if not row["domain"]:
            continue
        years = row["years"]
        if not years.isdigit():
            raise FormError(f"Domain {row['domain']}: years {years!r} is not a number.")
        items.append({"type": "domain", "domain": row["domain"], "action": row["action"],
                      "years": int(years), "epp_code": code.strip() or None})
    if not items:
        raise FormError("Add at least one product or domain.")
    body = {"order_ref": values["ref"], "client": client, "items": items,
            "currency": values["currency"] or None,
            "payment_method": values["payment_method"] or None,
            "promo_code": values["promo_code"] or None,
            "send_confirmation": values["send_confirmation"],
            "generate_invoice": values["generate_invoice"]}
    try:
        PlaceOrder.model_validate(body)
    except ValidationError as exc:
        # Field names and messages only (describe_validation_error): never an input value,
        # so never an EPP code.
        raise FormError(describe_validation_error(exc, prefix="")) from None
    return body


def _blank_form() -> dict[str, Any]:
    return {"ref": new_ref(), "client_mode": "existing", "client_id": "",
            "new": dict.fromkeys(NEW_CLIENT_FIELDS, ""),
            "products": [{"product": "", "cycle": "monthly", "domain": ""}] * PRODUCT_ROWS,
            "domains": [{"domain": "", "action": "register", "years": "1"}] * DOMAIN_ROWS,
            "promo_code": "", "payment_method": "", "currency": "",
            "send_confirmation": True, "generate_invoice": True}


async def _render(request: Request, ctx: Ctx, values: dict[str, Any], *, status_code: int = 200,
                  error: str | None = None) -> Response:
    query = str(request.query_params.get("q") or "").strip()[:200]
    async with ctx.state.pool.acquire() as conn:
        offer = await catalog.offer(conn)
        chosen = (await clients.one(conn, int(values["client_id"]))
                  if values["client_id"] else None)
        found = await clients.search(conn, query) if query else []
    if values["client_id"] and chosen is None and error is None:
        error, status_code = f"Client {values['client_id']} does not exist.", 404
    return ctx.render(request, "new_order.html", status_code=status_code, active="new",
                      v=values, offer=offer, chosen=chosen, found=found, q=query, error=error)


@page(act=True)
async def new_order_form(request: Request, ctx: Ctx) -> Response:
    values = _blank_form()
    client = str(request.query_params.get("client") or "")
    if client.isdigit() and len(client) < 19:
        values["client_id"] = client
    if request.query_params.get("new") == "1":
        values["client_mode"] = "new"
    return await _render(request, ctx, values)


@page(act=True)
async def client_search(request: Request, ctx: Ctx) -> Response:
    """The live search's results (htmx), each a link choosing the client."""
    query = str(request.query_params.get("q") or "").strip()[:200]
    async with ctx.state.pool.acquire() as conn:
        found = await clients.search(conn, query)
    return ctx.render(request, "_client_results.html", found=found, q=query)


@page(act=True)
async def place(request: Request, ctx: Ctx) -> Response:
    form = await request.form()
    values = read_form(form)
    try:
        body = order_body(values, epp_codes(form))
    except FormError as exc:
        return await _render(request, ctx, values, status_code=400, error=str(exc))
    assert ctx.operator is not None
    # Named as review commands name them: the placement history records who placed it.
    body["operator"] = ctx.operator.name
    timeout = ctx.state.settings.review_timeout
    try:
        reply = await ctx.state.publisher.place(body, wait_seconds=timeout)
    except Unavailable as exc:
        return await _render(request, ctx, values, status_code=503, error=str(exc))
    log.info("console order", extra={"order_ref": body["order_ref"], "operator": ctx.operator.name,
                                     "ok": reply.get("ok") if reply else None})
    if reply is None:
        # Not answered in time: placed later, it is found by its ref.
        async with ctx.state.pool.acquire() as conn:
            found = await conn.fetchval("SELECT id FROM orders WHERE order_ref = $1"
                                        " ORDER BY id DESC LIMIT 1", body["order_ref"])
        if found is None:
            return await _render(request, ctx, values, status_code=504, error=(
                f"No answer from placement within {timeout:g} s (is it running?). The order"
                f" {body['order_ref']} is queued: submit again to wait for it (it is placed"
                " once)."))
        return RedirectResponse(f"/orders/{found}?placed=1", status_code=303)
    if not reply.get("ok"):
        return await _render(request, ctx, values, status_code=422,
                             error=f"Refused: {reply.get('error') or 'no reason given'}")
    return RedirectResponse(f"/orders/{int(reply['order_id'])}?placed=1", status_code=303)


routes = [
    Route("/orders/new", new_order_form, methods=["GET"]),
    Route("/orders/new", place, methods=["POST"]),
    Route("/clients/search", client_search, methods=["GET"]),
]
