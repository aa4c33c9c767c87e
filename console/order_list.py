"""The console's order list (WHMCS's List Pending Orders) at a million orders: keyset pages in
the list's order, placed then id, each read from where its range starts on an index of that
order (migrations 0030, 0033, 0040), and a count exact up to LIST_COUNT_CAP ("1,000+" beyond
it, and only when more than that many truly match) — or, with a product, up to what its
budget can read (below).

A product filter has two ways to walk (issue 13's review: a product launched last month,
filtered over ten years, walked every older order probing for it — slow — and counted "0+"):

- the *orders side*: the orders of the range on the list's index, each probed for the
  product (a key of services_product_created_idx: product, placed time, order): quick when
  the range is small, or when the product is common among its first orders;
- the *product side*: the product's services in the same order (services_product_created_idx,
  migration 0033: a service is written with its order, in one statement, so its created_at is
  its order's), each order fetched by id and checked against the other filters: quick when
  the product has few orders in the range, or wherever in time they are, when most of them
  pass the other filters.

order_list counts both sides' rows in the range first, on their indexes alone (up to
SMALL_SIDE + 1 each, about a millisecond):

- one side has at most SMALL_SIDE: it walks, at most SMALL_SIDE probes, and its count is
  exact;
- else a short pilot walk of each side (PILOT probes) says which finds matches sooner, and
  that side pages (a common product with a common status: either finds them fast; a product
  whose orders are all recent: its own side);
- unless both pilots found few (fewer than one in ten): then both sides' keys (placed time,
  id), read on their indexes alone in the list's order, are merged, with no probe (a product
  launched lately and the Cancelled orders since 2019, 12,000 and 60,000 rows with 769 in
  common: the product side probed all 12,000 orders, 42,700 buffers; the merge reads 800).
  PostgreSQL would hash one side whole instead, so the merge is asked for (_merged).

The count (issue 13, a first visit whose pages are not in PostgreSQL's shared buffers: each
buffer touched may be a read): counting to 1,001 by a probe per row touched up to 16,000
buffers (a common product with a rare status: 4,000 probes), so a product filter's count
has a budget, and says "at least N" (`partial`) — as many as it found — when the budget runs out
before its range ends:

- both sides' keys merged (MERGE), from where both have some, at most COUNT_KEYS keys of each
  (a few hundred index leaves; no probe): whenever both pilots found some match;
- else (one side's matches lie far apart, as every older order's for a product launched
  lately, or a side is small) the page's side walked, at most COUNT_WALK rows probed.

An operator needs to know how many pages there are about, and that there are more, not the
exact thousandth: "at least 206" at most costs a few hundred pages on a first visit, where "1,000+"
cost thousands. A page's count, first or later, is never fewer than the rows it shows.

A walked count whose sides are both large first merges both sides' last keys, backwards from
the range's end (_tail_count): a product launched lately has its orders there, and 1,001 matches
found there say "1,000+" for a few dozen buffers instead of COUNT_WALK probes.

The exact number is still the operator's (exact_count): the list shows "at least N" at once
and fetches the plain COUNT by itself (console/routes/orders.py, GET /orders/count), stopped
by the server after EXACT_COUNT_SECONDS."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import asyncpg

from console.queries import _FROM, _ROW, PAGE_SIZE, _order, capped_count
from shared.states import OrderStatus

# The list's "status" choices: the review queue (Pending, screening finished) is the default.
REVIEW, QUEUED, ALL = "review", "screening", "all"
STATUS_CHOICES = [REVIEW, QUEUED, *(s.value for s in OrderStatus), ALL]
SCREENING_CHOICES = ["passed", "review", "failed", "skipped", "error", "queued"]

# The list's count stops lower than the dashboard's ("1,000+"): a filter on a column its index
# does not hold (a screening with a status, a product) costs a lookup for each row counted.
LIST_COUNT_CAP = 1_000
# A side of a product filter with at most this many rows in the range walks them all if need
# be: at most this many probes (three or four buffers each), and the count is exact.
SMALL_SIDE = 1_000
# Both sides larger: each walks this many rows first, and the one that found more matches
# pages and counts (orders side on a tie).
PILOT = 200

# A product filter's count, when both sides are larger than SMALL_SIDE, merges both sides'
# keys, at most this many of each (about 180 leaves of orders_status_created_idx and 135 of
# services_product_created_idx), so a first visit, its pages not in shared buffers, reads a
# few hundred pages, not the thousands a probe per row touched (issue 13: 186-291 ms cold);
# and its CPU stays under a probe count's (a merge of 2 x 40,000 keys took as long as 4,000
# probes, 10-20 ms at load 3; 2 x 10,000: 4-8 ms).
COUNT_KEYS = 20_000
# Or it walks the page's side, probing each row (three or four buffers), at most this many
# (more than LIST_COUNT_CAP: a side whose rows nearly all match still says "1,000+").
COUNT_WALK = 1_200

# A walked count first merges both sides' last keys, at most this many of each (about 25
# leaves of each index): found 1,001 matches there, it says "1,000+" without its walk.
TAIL_KEYS = 4_000

ORDERS_SIDE, PRODUCT_SIDE, BOTH_SIDES = "orders", "product", "both"
MERGE, WALK = "merge", "walk"  # how a product filter is counted (_Plan)


@dataclass
class OrderFilters:
    """The list's filters, as the query string gives them (every one optional)."""

    status: str = REVIEW
    screening: str = ""
    flagged: str = ""  # "1": only orders whose screening errored or scored over the threshold
    client: str = ""  # a client id or email
    product: str = ""  # a product slug
    since: str = ""  # dates, YYYY-MM-DD (UTC)
    until: str = ""
    q: str = ""  # order number or id, ref, email or domain

    @classmethod
    def of(cls, params: Any) -> OrderFilters:
        values = {f.name: str(params.get(f.name) or "").strip()[:200] for f in fields(cls)}
        made = cls(**values)
        if made.status not in STATUS_CHOICES:
            made.status = REVIEW
        if made.screening not in SCREENING_CHOICES:
            made.screening = ""
        return made

    def query(self, **extra: Any) -> dict[str, str]:
        """As query parameters (the ones set), for links that keep the filters."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}
        out.update({k: str(v) for k, v in extra.items() if v is not None})
        return out


class FilterError(ValueError):
    pass


def _day(value: str, name: str) -> datetime | None:
    if not value:
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise FilterError(f"{name} {value!r} is not a date (YYYY-MM-DD)") from None
    if day.year > 9998:  # the day after it (a range's end) must be a date too
        raise FilterError(f"{name} {value!r} is too far ahead (before 9999-01-01)")
    return datetime.combine(day, time(), UTC)


class _Args:
    """A statement's positional arguments, numbered as they are added."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


@dataclass(frozen=True)
class _Range:
    """Where a page reads: the dates, and the page's edge (an order's placed time and id) with
    the direction from it (">" the next page, "<" the previous, read backwards)."""

    since: datetime | None = None
    until: datetime | None = None  # exclusive
    edge: tuple[datetime, int] | None = None
    sign: str = ">"

    def whole(self) -> _Range:
        return _Range(self.since, self.until)

    @property
    def direction(self) -> str:
        return "ASC" if self.sign == ">" else "DESC"

    def conds(self, arg: _Args, at: str, key: str) -> list[str]:
        """On a (placed time, order id) pair of columns: o's, or a service's (the same)."""
        out = []
        if self.since:
            out.append(f"{at} >= {arg(self.since)}")
        if self.until:
            out.append(f"{at} < {arg(self.until)}")
        if self.edge:
            out.append(f"({at}, {key}) {self.sign} ({arg(self.edge[0])}, {arg(self.edge[1])})")
        return out


def _order_conds(f: OrderFilters, arg: _Args) -> list[str]:
    """The filters on an order itself (its dates and product apart); each can use an index
    (migration 0030: a range of an index in the list's order, created_at then id)."""
    conds = ["o.deleted_at IS NULL"]
    if f.status == REVIEW:
        conds += ["o.status = 'Pending'", "o.screening <> 'queued'"]
    elif f.status == QUEUED:
        conds += ["o.status = 'Pending'", "o.screening = 'queued'"]
    elif f.status != ALL:
        conds.append(f"o.status = {arg(f.status)}")
    if f.screening:
        conds.append(f"o.screening = {arg(f.screening)}")
    if f.flagged:
        # Screening errored, or scored over the threshold: the fraud service fails an order
        # whose latest score is over its threshold (services/fraud/handlers.py), so that is
        # screening 'failed', read on orders_flagged_status_idx (its predicate, word for
        # word) rather than probing every order's latest check.
        conds.append("o.screening IN ('error', 'failed')")
    if f.client:
        if f.client.isascii() and f.client.isdigit() and len(f.client) < 19:  # not '²'
            conds.append(f"o.client_id = {arg(int(f.client))}")
        else:
            conds.append(f"lower(c.email) = lower({arg(f.client)})")
    if f.q:
        q = f.q
        if re.fullmatch(r"\d{1,18}", q):
            p = arg(int(q))
            conds.append(f"(o.order_number = {p} OR o.id = {p} OR o.order_ref = {arg(q)})")
        elif "@" in q:
            conds.append(f"lower(c.email) = lower({arg(q)})")
        else:
            p = arg(q)
            # One set of ids from three index lookups (an OR of the three would scan orders).
            conds.append(
                f"o.id IN (SELECT id FROM orders WHERE order_ref = {p}"
                f" UNION SELECT order_id FROM services WHERE lower(domain) = lower({p})"
                f" UNION SELECT order_id FROM domains WHERE lower(domain) = lower({p}))")
    return conds


def _clients(conds: list[str]) -> str:
    """The clients join, only where a filter reads the client: each row costs a probe."""
    return " JOIN clients c ON c.id = o.client_id" if any("c.email" in c for c in conds) else ""


def _orders_walk(f: OrderFilters, r: _Range, arg: _Args) -> list[str]:
    """The orders side's conditions: the range's orders on the list's index, in its order
    (o.created_at, o.id)."""
    return _order_conds(f, arg) + r.conds(arg, "o.created_at", "o.id")


def _has_product(arg: _Args, product_id: int, *, probe: bool = True) -> str:
    """The orders side's probe, per order: one key of services_product_created_idx (product,
    the order's placed time, id: a service is written with its order, migration 0033), so no
    index of its own is kept for it (migration 0036). OFFSET 0 keeps it a probe: as a plain
    EXISTS the planner may merge the list with every service of the product, 90 ms at 1M —
    which is what the exact count of a large product wants (`probe=False`)."""
    return (f"EXISTS (SELECT 1 FROM services s WHERE s.product_id = {arg(product_id)}"
            " AND s.created_at = o.created_at AND s.order_id = o.id"
            + (" OFFSET 0)" if probe else ")"))


def _range_of(f: OrderFilters) -> _Range:
    """The filters' dates as a range of placed times (the `to` day included), validated."""
    since, until = _day(f.since, "from"), _day(f.until, "to")
    return _Range(since, until + timedelta(days=1) if until else None)


def _from(start: tuple[datetime, int] | None, arg: _Args, at: str, key: str) -> list[str]:
    """A (placed time, order id) pair of columns from `start` on, if given."""
    return [] if start is None else [f"({at}, {key}) >= ({arg(start[0])}, {arg(start[1])})"]


def _services_walk(r: _Range, arg: _Args, product_id: int, limit: int | None = None, *,
                   start: tuple[datetime, int] | None = None) -> str:
    """The product side's walk: its services in the range in the list's order (p.created_at,
    p.order_id: a service's created_at is its order's; services_product_created_idx), one row
    per order (DISTINCT: an order may hold the product twice); from `start` if given."""
    walk = [f"s.product_id = {arg(product_id)}", *r.conds(arg, "s.created_at", "s.order_id"),
            *_from(start, arg, "s.created_at", "s.order_id")]
    d = r.direction
    return (f"(SELECT DISTINCT s.created_at, s.order_id FROM services s"
            f" WHERE {' AND '.join(walk)} ORDER BY s.created_at {d}, s.order_id {d}"
            f"{f' LIMIT {limit}' if limit else ''}) p")


def _order_probe(f: OrderFilters, arg: _Args, columns: str) -> str:
    """The product side's probe, per service: its order by id (orders_pkey), checked against
    the other filters."""
    conds = _order_conds(f, arg)
    return (f"SELECT {columns} FROM orders o{_clients(conds)}"
            f" WHERE o.id = p.order_id AND {' AND '.join(conds)}")


def _product_side(f: OrderFilters, r: _Range, arg: _Args, product_id: int,
                  columns: str = "o.*", limit: int | None = None) -> str:
    """FROM: the product side's walk (its first `limit` rows), each order fetched as it goes
    (a LATERAL probe: OFFSET 0 keeps the planner from hashing every order of the filter
    instead)."""
    walk = _services_walk(r, arg, product_id, limit)
    return f" FROM {walk} JOIN LATERAL ({_order_probe(f, arg, columns)} OFFSET 0) o ON true"


def _both_sides(f: OrderFilters, r: _Range, arg: _Args, product_id: int,
                start: tuple[datetime, int] | None = None) -> str:
    """FROM: the keys (placed time, id) of the range's orders that have the product, both
    sides' keys joined in the list's order (each read on its index alone; merged: _merged),
    from `start` on (_jump) if given."""
    orders = _orders_walk(f, r, arg)
    d = r.direction
    return (f" FROM (SELECT o.created_at, o.id FROM orders o{_clients(orders)}"
            f" WHERE {' AND '.join(orders + _from(start, arg, 'o.created_at', 'o.id'))}"
            f" ORDER BY o.created_at {d}, o.id {d}) k"
            f" JOIN {_services_walk(r, arg, product_id, start=start)}"
            " ON p.created_at = k.created_at AND p.order_id = k.id")


async def _jump(conn: asyncpg.Connection, f: OrderFilters, r: _Range,
                product_id: int) -> tuple[datetime, int] | None:
    """Where a forward merge of both sides' keys in `r` can start: the later of the two sides'
    first keys (before it, one side has nothing to match), found by one descent of each index;
    None when a side has no key in `r` (nothing matches). A merge reads both sides in step
    from where it starts: Cancelled with a product launched lately read every Cancelled key
    since 2019 (413 pages on a first visit) to reach the product's keys of the last 60 days."""
    arg = _Args()
    o_from, s_from = _sides_in_order(f, r, arg, product_id)
    return _later_first(*await conn.fetchrow(
        f"SELECT (SELECT ROW(o.created_at, o.id) {o_from} LIMIT 1),"
        f" (SELECT ROW(s.created_at, s.order_id) {s_from} LIMIT 1)", *arg.values))


def _sides_in_order(f: OrderFilters, r: _Range, arg: _Args, product_id: int) -> tuple[str, str]:
    """Each side's rows in `r` in the list's order, read on its index alone (FROM ... ORDER BY):
    the orders of the filter, and the product's services."""
    orders = _orders_walk(f, r, arg)
    services = [f"s.product_id = {arg(product_id)}", *r.conds(arg, "s.created_at", "s.order_id")]
    return (f"FROM orders o{_clients(orders)} WHERE {' AND '.join(orders)}"
            " ORDER BY o.created_at, o.id",
            f"FROM services s WHERE {' AND '.join(services)}"
            " ORDER BY s.product_id, s.created_at, s.order_id")


def _later_first(first_order: Any, first_product: Any) -> tuple[datetime, int] | None:
    """The later of the two sides' first keys; None when a side has none (nothing matches)."""
    if first_order is None or first_product is None:
        return None
    return max(tuple(first_order), tuple(first_product))


@asynccontextmanager
async def _merged(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """A transaction whose statements join by merging (both sides are read in the join's
    order on their indexes): PostgreSQL's estimate of a filter with a product is far off
    (it multiplies the two shares), and it would read one side whole into a hash table or
    probe the other side row by row."""
    async with conn.transaction():
        # And each side read in that order on its index, from where it starts: a count's sides
        # have a LIMIT of COUNT_KEYS, which the planner expects to read whole, and would fetch
        # them all (a bitmap scan) to sort them, where the merge stops at LIST_COUNT_CAP + 1.
        await conn.execute("SET LOCAL enable_hashjoin = off; SET LOCAL enable_nestloop = off;"
                           " SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off;"
                           " SET LOCAL max_parallel_workers_per_gather = 0")
        yield


async def _sizes(conn: asyncpg.Connection, f: OrderFilters, r: _Range, product_id: int,
                 cap: int) -> tuple[int, int, tuple[datetime, int] | None]:
    """Each side's rows in the range, counted up to cap + 1 on its index alone; and where the
    later of the two sides' first keys (placed time, id) stands: a merged count starts there
    (before it, one side has nothing to match)."""
    arg = _Args()
    o_from, s_from = _sides_in_order(f, r, arg, product_id)
    n_orders, n_product, first_order, first_product = await conn.fetchrow(
        f"SELECT (SELECT count(*) FROM (SELECT 1 {o_from} LIMIT {cap + 1}) x),"
        f" (SELECT count(*) FROM (SELECT 1 {s_from} LIMIT {cap + 1}) y),"
        f" (SELECT ROW(o.created_at, o.id) {o_from} LIMIT 1),"
        f" (SELECT ROW(s.created_at, s.order_id) {s_from} LIMIT 1)", *arg.values)
    return n_orders, n_product, _later_first(first_order, first_product)


@dataclass(frozen=True)
class _Plan:
    """How a product filter is read: the side its pages walk, how its count is read (MERGE:
    both sides' keys from `start`; WALK: the page's side, probing each row)."""

    side: str
    count: str
    start: tuple[datetime, int] | None = None
    # A merged count's matches are dense enough that it will likely find LIST_COUNT_CAP + 1
    # within its budget (the pilots' rates say so): it stops there.
    dense: bool = False
    # A walked count whose sides are both large (a pilot found no match at the range's start:
    # a product launched lately): first both sides' last keys are merged, backwards from the
    # range's end (_tail_count), where such a product's orders are.
    tail: bool = False


async def _side(conn: asyncpg.Connection, f: OrderFilters, r: _Range, product_id: int) -> _Plan:
    """How a product filter is read (the module's docstring): the smaller side walks; else the
    side whose pilot found more matches, unless both found few (fewer than one in ten rows)
    and both sides are middling: then their keys are intersected. The count merges both
    sides' keys, unless a pilot found no match at all (a side whose matches lie far apart, as
    every older order's for a product launched lately): then it walks the page's side."""
    r = r.whole()
    n_orders, n_product, start = await _sizes(conn, f, r, product_id, SMALL_SIDE)
    if min(n_orders, n_product) <= SMALL_SIDE:
        return _Plan(ORDERS_SIDE if n_orders <= n_product else PRODUCT_SIDE, WALK)
    arg = _Args()
    orders = _orders_walk(f, r, arg)
    found_orders, found_product = await conn.fetchrow(  # matches among each's first PILOT
        f"SELECT (SELECT count(*) FILTER (WHERE {_has_product(arg, product_id)})"
        f" FROM (SELECT o.id, o.created_at FROM orders o{_clients(orders)} WHERE {' AND '.join(orders)}"
        f" ORDER BY o.created_at, o.id LIMIT {PILOT}) o),"
        f" (SELECT count(*) FILTER (WHERE EXISTS ({_order_probe(f, arg, '1')}))"
        f" FROM {_services_walk(r, arg, product_id, PILOT)})", *arg.values)
    if max(found_orders, found_product) * 10 < PILOT:
        side = BOTH_SIDES
    else:
        side = PRODUCT_SIDE if found_product > found_orders else ORDERS_SIDE
    if side == BOTH_SIDES or min(found_orders, found_product) > 0:
        needed = (LIST_COUNT_CAP + 1) * PILOT  # keys of a side to find that many, at its rate
        dense = needed <= COUNT_KEYS * min(found_orders, found_product)
        return _Plan(side, MERGE, start, dense)
    return _Plan(side, WALK, tail=True)


def _empty(after: int | None, before: int | None) -> dict[str, Any]:
    return {"orders": [], "count": (0, False), "partial": False, "more_after": before is not None,
            "more_before": after is not None, "first_id": None, "last_id": None}


async def order_list(conn: asyncpg.Connection, f: OrderFilters, *, after: int | None = None,
                     before: int | None = None, limit: int = PAGE_SIZE) -> dict[str, Any]:
    """A page of orders oldest first (placed, then id): after an order (the next page), before
    one (the previous), or the first. `more_after`/`more_before` say whether there are pages
    either side. A page reads its rows from where its range starts, never the orders before
    it; `count` is (n, capped)."""
    product_id = None
    if f.product:
        product_id = await conn.fetchval("SELECT id FROM products WHERE slug = $1", f.product)
        if product_id is None:  # no such product: no order has it
            return _empty(after, before)
    r = _range_of(f)
    anchor_id = after if after is not None else before
    if anchor_id is not None:
        # The page's edge, named by its order's id in the link: where that order stands.
        anchor = await conn.fetchrow("SELECT created_at, id FROM orders WHERE id = $1",
                                     anchor_id)
        if anchor is not None:
            r = _Range(r.since, r.until, (anchor["created_at"], anchor["id"]),
                       ">" if after is not None else "<")
        else:  # no such order (an id typed into the address): the first page
            after = before = None
    plan = None if product_id is None else await _side(conn, f, r, product_id)
    side = ORDERS_SIDE if plan is None else plan.side
    d = r.direction
    arg = _Args()
    count = None
    if side == BOTH_SIDES:
        assert plan is not None and product_id is not None
        ids: list[int] | None = None
        found: list[int] = []
        merge_from = r  # where the page's merge reads
        if r.edge is None and not plan.dense:
            # A first page: the count's one pass over both sides' keys finds its ids too (a
            # merge for the page would read them up to its 51st match, all over again).
            count, found, reached = await _merged_count(conn, f, r, product_id, plan.start,
                                                        False, with_ids=True)
            if len(found) > limit or not count[1]:
                ids = found[:limit + 1]
            elif reached is not None:
                # Its budget ran out before them: every match placed before `reached` is in
                # `found`; the page's merge goes on from there (those at `reached` itself may
                # be found again: kept once).
                merge_from = _Range(reached, r.until)
        if ids is None:  # the page's ids, merged
            start = None
            if d == "ASC":  # a first page merging its whole range: the plan found it already
                start = (plan.start if merge_from is r and r.edge is None
                         else await _jump(conn, f, merge_from, product_id))
            if d == "ASC" and start is None:
                more_ids: list[int] = []
            else:
                async with _merged(conn):
                    more_ids = [row["id"] for row in await conn.fetch(
                        f"SELECT k.id{_both_sides(f, merge_from, arg, product_id, start)}"
                        f" ORDER BY k.created_at {d}, k.id {d} LIMIT {limit + 1}", *arg.values)]
            ids = list(dict.fromkeys(found + more_ids))[:limit + 1]
        # Then their rows, by id.
        arg = _Args()
        page_sql = (f"SELECT {_ROW}{_FROM} WHERE o.id = ANY({arg(ids)}::bigint[])"
                    f" ORDER BY o.created_at {d}, o.id {d}")
    elif side == PRODUCT_SIDE:
        assert product_id is not None
        page_sql = (f"SELECT {_ROW}{_product_side(f, r, arg, product_id)}"
                    " JOIN clients c ON c.id = o.client_id LEFT JOIN invoices i ON i.order_id = o.id"
                    f" ORDER BY p.created_at {d}, p.order_id {d} LIMIT {limit + 1}")
    else:
        conds = _orders_walk(f, r, arg)
        if product_id is not None:
            conds.append(_has_product(arg, product_id))
        page_sql = (f"SELECT {_ROW}{_FROM} WHERE {' AND '.join(conds)}"
                    f" ORDER BY o.created_at {d}, o.id {d} LIMIT {limit + 1}")
    rows = await conn.fetch(page_sql, *arg.values)
    more = len(rows) > limit
    rows = rows[:limit]
    if d == "DESC":
        rows = list(reversed(rows))
    orders = [_order(row) for row in rows]
    if plan is None:
        count = await _count(conn, f, r.whole())
    elif count is None:
        assert product_id is not None
        count = await _product_count(conn, f, r.whole(), product_id, plan)
    if (len(orders), more) > count:
        # A count that stopped short (_product_count): never fewer than the page shows, the
        # first or a later one (each counts the whole range with the same budget).
        count = (len(orders), more or count[1])
    first_id, last_id = (orders[0]["id"], orders[-1]["id"]) if orders else (None, None)
    return {
        "orders": orders, "count": count,
        # Counting stopped on its budget, not at LIST_COUNT_CAP: "at least n", not "n+" (a
        # count capped at the cap has found more than it says; this one stopped looking).
        "partial": count[1] and count[0] < LIST_COUNT_CAP,
        "more_after": more if d == "ASC" else before is not None,
        "more_before": (after is not None) if d == "ASC" else more,
        "first_id": first_id, "last_id": last_id,
    }


async def _count(conn: asyncpg.Connection, f: OrderFilters, r: _Range) -> tuple[int, bool]:
    """The range's matches without a product, up to LIST_COUNT_CAP + 1 of them on the list's
    index (capped only when more than the cap truly match): one range of an index, in order."""
    arg = _Args()
    conds = _orders_walk(f, r, arg)
    return await capped_count(conn, f"SELECT 1 FROM orders o{_clients(conds)}"
                              f" WHERE {' AND '.join(conds)}", *arg.values, cap=LIST_COUNT_CAP,
                              order_by="o.created_at, o.id")


async def _product_count(conn: asyncpg.Connection, f: OrderFilters, r: _Range, product_id: int,
                         plan: _Plan) -> tuple[int, bool]:
    """The range's orders with the product: exact up to LIST_COUNT_CAP, else n with "more" — n the
    cap, or the matches found before the count's budget ran out (COUNT_KEYS keys of each side
    merged, or COUNT_WALK rows of the page's side probed), as many as there are at least."""
    if plan.count == MERGE:
        return (await _merged_count(conn, f, r, product_id, plan.start, plan.dense))[0]
    if plan.tail and await _tail_count(conn, f, r, product_id) > LIST_COUNT_CAP:
        return LIST_COUNT_CAP, True
    return await _walked_count(conn, f, r, product_id, plan.side)


def _keys(f: OrderFilters, r: _Range, arg: _Args, product_id: int,
          start: tuple[datetime, int] | None, limit: int, d: str = "ASC") -> tuple[str, str]:
    """Both sides' keys (placed time, id) in the range from `start`, in the list's order, at
    most `limit` of each, read on their indexes alone: (the orders', the product's). The
    product's are one per order (DISTINCT, streamed off the index in its order): an order
    holding the product twice would be matched twice, and spend the budgets twice."""
    orders = _orders_walk(f, r, arg)
    services = [f"s.product_id = {arg(product_id)}", *r.conds(arg, "s.created_at", "s.order_id")]
    if start is not None:
        at, key = arg(start[0]), arg(start[1])
        orders.append(f"(o.created_at, o.id) >= ({at}, {key})")
        services.append(f"(s.created_at, s.order_id) >= ({at}, {key})")
    return (f"SELECT o.created_at, o.id FROM orders o{_clients(orders)}"
            f" WHERE {' AND '.join(orders)} ORDER BY o.created_at {d}, o.id {d} LIMIT {limit}",
            f"SELECT DISTINCT s.created_at, s.order_id FROM services s WHERE"
            f" {' AND '.join(services)} ORDER BY s.created_at {d}, s.order_id {d} LIMIT {limit}")


async def _merged_count(conn: asyncpg.Connection, f: OrderFilters, r: _Range, product_id: int,
                        start: tuple[datetime, int] | None, dense: bool, *,
                        with_ids: bool = False,
                        ) -> tuple[tuple[int, bool], list[int], datetime | None]:
    """Both sides' keys merged, from where both have some, at most COUNT_KEYS of each: no
    probe per row (each probe is a descent of an index, three or four buffers; a merge reads
    a leaf of 150-250 keys as one). A common product with a rare status (Fraud and business
    since 2021 at 1M: 1,463 match) probed about 4,000 orders, 12,000 buffers, to count 1,001;
    merged, it reads at most about 320 leaves and says "at least N" when its keys ran out first.

    Dense matches: an inner merge that stops at LIST_COUNT_CAP + 1 (Active with a common
    product: 50 leaves). Else one pass of a full merge, which says at once how many matched and
    whether a side had more keys than its budget (an inner merge, then the sides counted
    again, read them twice: a side whose heap pages are not all visible, the newest orders'
    until autovacuum has been, is fetched from the heap key by key). `with_ids` (a full merge
    only): the matches' ids too, in the list's order (a first page's), and, when a side ran
    out of its budget, the placed time its keys were read up to (the earlier of the two when
    both did): every match placed before it is among the ids (a first page's merge goes on
    from there)."""
    arg = _Args()
    if not dense:
        orders, product = _keys(f, r, arg, product_id, start, COUNT_KEYS + 1)
        matched = "FILTER (WHERE p.order_id IS NOT NULL AND k.id IS NOT NULL)"
        ids = (f"array_agg(k.id ORDER BY k.created_at, k.id) {matched}" if with_ids
               else "NULL::bigint[]")
        async with _merged(conn):
            n, n_orders, n_product, last_order, last_product, found = await conn.fetchrow(
                f"SELECT count(DISTINCT k.id) {matched},"
                f" count(k.id), count(p.order_id), max(k.created_at), max(p.created_at), {ids}"
                f" FROM ({orders}) k FULL JOIN"
                f" ({product}) p ON p.created_at = k.created_at AND p.order_id = k.id",
                *arg.values)
        cut = _stopped(n_orders, last_order, n_product, last_product)
        reached = min((last for n_side, last in ((n_orders, last_order),
                                                 (n_product, last_product))
                       if n_side > COUNT_KEYS), default=None)
        # An order holding the product twice is matched twice: once is enough.
        return ((min(n, LIST_COUNT_CAP), n > LIST_COUNT_CAP or cut),
                list(dict.fromkeys(found or [])), reached)
    orders, product = _keys(f, r, arg, product_id, start, COUNT_KEYS)
    async with _merged(conn):
        joined, n = await conn.fetchrow(
            f"SELECT count(*), count(DISTINCT id) FROM (SELECT k.id FROM ({orders}) k"
            f" JOIN ({product}) p ON p.created_at = k.created_at AND p.order_id = k.id"
            f" LIMIT {LIST_COUNT_CAP + 1}) x", *arg.values)
        if joined > LIST_COUNT_CAP:
            return (min(n, LIST_COUNT_CAP), True), [], None
        # Fewer than the pilots promised: exact unless a side ran out of its budget where the
        # other still had keys (the keys just read: in shared buffers now).
        arg = _Args()
        orders, product = _keys(f, r, arg, product_id, start, COUNT_KEYS + 1)
        sides = await conn.fetchrow(
            f"SELECT * FROM (SELECT count(*), max(created_at) FROM ({orders}) k) o,"
            f" (SELECT count(*), max(created_at) FROM ({product}) p) p", *arg.values)
    return (n, _stopped(*sides)), [], None


def _stopped(n_orders: int, last_order: datetime | None, n_product: int,
             last_product: datetime | None) -> bool:
    """Whether a merge of both sides' keys (each read up to COUNT_KEYS + 1 from the same start,
    in the list's order: n keys, the last placed at `last`) stopped before its range ended: a
    side had more keys than its budget, and the other side has keys from where the cut side's
    reading stopped (so matches may lie beyond). A side that ended before the other was cut
    has no key beyond, and the count is exact (it said "at least" for those too). The placed
    times alone decide: on a tie (the same microsecond) it says it stopped, which is safe."""
    cut_orders, cut_product = n_orders > COUNT_KEYS, n_product > COUNT_KEYS
    if cut_orders and cut_product:
        return True
    if cut_orders:
        return last_product is not None and last_order is not None and last_product >= last_order
    if cut_product:
        return last_order is not None and last_product is not None and last_order >= last_product
    return False


async def _tail_count(conn: asyncpg.Connection, f: OrderFilters, r: _Range,
                      product_id: int) -> int:
    """The matches among both sides' last TAIL_KEYS keys of the range, merged backwards from
    its end with no probe, up to LIST_COUNT_CAP + 1 (then more than the cap truly match,
    wherever the rest are). A product launched lately, filtered over ten years: its pilot
    from the range's start found nothing (its orders of five years ago), and its count walked
    COUNT_WALK rows probing each (4,000-4,400 buffers at 1M); its newest keys and the
    range's newest orders hold 1,001 matches within a few index leaves (a few dozen buffers).
    Fewer found: the walk counts, as before (these keys read were the price)."""
    arg = _Args()
    orders, product = _keys(f, r, arg, product_id, None, TAIL_KEYS, "DESC")
    async with _merged(conn):
        return await conn.fetchval(
            f"SELECT count(DISTINCT id) FROM (SELECT k.id FROM ({orders}) k"
            f" JOIN ({product}) p ON p.created_at = k.created_at AND p.order_id = k.id"
            f" LIMIT {LIST_COUNT_CAP + 1}) x", *arg.values)


async def _walked_count(conn: asyncpg.Connection, f: OrderFilters, r: _Range, product_id: int,
                        side: str) -> tuple[int, bool]:
    """The page's side walked, at most COUNT_WALK of its rows, each probed (the other side's
    matches lie far apart, or one side is small: SMALL_SIDE < COUNT_WALK, so that count is
    exact), until LIST_COUNT_CAP + 1 match."""
    arg = _Args()
    if side == ORDERS_SIDE:
        orders = _orders_walk(f, r, arg)
        walk = (f"SELECT o.id, o.created_at FROM orders o{_clients(orders)}"
                f" WHERE {' AND '.join(orders)} ORDER BY o.created_at, o.id")
        found = (f"SELECT 1 FROM ({walk} LIMIT {COUNT_WALK}) o"
                 f" WHERE {_has_product(arg, product_id)} LIMIT {LIST_COUNT_CAP + 1}")
        walked = f"SELECT 1 FROM ({walk} LIMIT {COUNT_WALK + 1}) o"
    else:
        found = (f"SELECT 1{_product_side(f, r, arg, product_id, '1', COUNT_WALK)}"
                 f" LIMIT {LIST_COUNT_CAP + 1}")
        walked = f"SELECT 1 FROM {_services_walk(r, arg, product_id, COUNT_WALK + 1)}"
    n, rows = await conn.fetchrow(f"SELECT (SELECT count(*) FROM ({found}) x),"
                                  f" (SELECT count(*) FROM ({walked}) y)", *arg.values)
    return min(n, LIST_COUNT_CAP), n > LIST_COUNT_CAP or rows > COUNT_WALK


# The exact count an operator is shown after a budgeted one stopped early (or asks for beyond
# "1,000+"): the plain COUNT, fetched by the page after it is shown (GET /orders/count), and
# stopped by the server after this long, when it says the bound instead.
EXACT_COUNT_SECONDS = 2.5


class CountStopped(Exception):
    """The exact count ran past EXACT_COUNT_SECONDS (statement_timeout) and was cancelled."""


async def exact_count(conn: asyncpg.Connection, f: OrderFilters,
                      seconds: float | None = None) -> int:
    """Every order matching the filters, counted, with no cap and no budget: the plain query
    (the planner's choice: a hash of the product's services, or the range's orders probed),
    in a read-only transaction whose statement_timeout is `seconds` (EXACT_COUNT_SECONDS);
    CountStopped past it. The same filters as order_list, validated the same way
    (FilterError)."""
    r = _range_of(f)
    product_id = None
    if f.product:
        product_id = await conn.fetchval("SELECT id FROM products WHERE slug = $1", f.product)
        if product_id is None:
            return 0
    arg = _Args()
    conds = _orders_walk(f, r, arg)
    if product_id is not None:  # the planner free to hash the product's services instead
        conds.append(_has_product(arg, product_id, probe=False))
    limit_ms = max(1, round(1000 * (EXACT_COUNT_SECONDS if seconds is None else seconds)))
    try:
        async with conn.transaction(readonly=True):
            await conn.execute(f"SET LOCAL statement_timeout = {limit_ms}")
            return await conn.fetchval(f"SELECT count(*) FROM orders o{_clients(conds)}"
                                       f" WHERE {' AND '.join(conds)}", *arg.values)
    except asyncpg.QueryCanceledError:
        raise CountStopped from None


async def list_count(conn: asyncpg.Connection, f: OrderFilters) -> tuple[tuple[int, bool], bool]:
    """The first page's count as the list shows it ((n, more), partial: budgeted, and never
    fewer than the page's rows): what the exact count falls back to when it is stopped."""
    first = await order_list(conn, f)
    return first["count"], first["partial"]
