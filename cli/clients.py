"""`ordermill clients link/unlink`: which storefronts may use a client (docs/contract.md, section 8).

A storefront reuses a client (by email or by id) only if it created that client or an operator
linked it; these commands are the operator's link. The anonymous storefront (orders published
without a user_id) is named "".
"""

from __future__ import annotations

import asyncpg


class LinkError(Exception):
    """A client that does not exist, or a link that cannot be removed."""


async def link(conn: asyncpg.Connection, client_id: int, storefront: str, operator: str) -> bool:
    """Let `storefront` use the client. False when it already could: its creator always may
    (clients.storefront; no link row is written for it), a linked one has its row."""
    async with conn.transaction():
        creator = await conn.fetchrow("SELECT storefront FROM clients WHERE id = $1 FOR SHARE",
                                      client_id)
        if creator is None:
            raise LinkError(f"no client {client_id}")
        if creator["storefront"] == storefront:
            return False
        return await conn.fetchval(
            "INSERT INTO client_storefronts (storefront, client_id, linked_by) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING RETURNING true", storefront, client_id, operator) is True


async def unlink(conn: asyncpg.Connection, client_id: int, storefront: str) -> bool:
    """Stop `storefront` using the client (its orders stay). False when it could not already."""
    creator = await conn.fetchval("SELECT storefront FROM clients WHERE id = $1", client_id)
    if creator is None:
        raise LinkError(f"no client {client_id}")
    if creator == storefront:
        raise LinkError(f"client {client_id} was created by storefront {storefront!r}: it stays"
                        " linked to it")
    return await conn.fetchval(
        "DELETE FROM client_storefronts WHERE storefront = $1 AND client_id = $2 RETURNING true",
        storefront, client_id) is True
