"""A client: details, billing address, their orders, and "Add New Order" for them."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from console import clients
from console.web import Ctx, page


@page()
async def client(request: Request, ctx: Ctx) -> Response:
    client_id = request.path_params["client_id"]
    async with ctx.state.pool.acquire() as conn:
        data = await clients.page(conn, client_id)
    if data is None:
        return PlainTextResponse(f"Client {client_id} does not exist.", status_code=404)
    return ctx.render(request, "client.html", active="orders", c=data)


routes = [Route("/clients/{client_id:int}", client, methods=["GET"])]
