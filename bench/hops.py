"""Where an order's latency goes, hop by hop (issue 15, target 2: the tail of the sustained
flow), from the bench database's own timestamps and the bench's publish and receive times.

`install` adds, to the bench database only, a table `bench_trace` and triggers that stamp
`clock_timestamp()` (the moment, not the transaction's start) when an outbox row is written
and when the relay marks it published (since stop 28 in its claim, before the broker's
confirms: the relay spans below are then about 0), and when a job changes
status (claimed: `running`; `done`). With the columns the product writes anyway (`orders`,
`fraud_checks` `created_at`, `payments.received_at`: the consuming transaction's start; `outbox.
published_at`: the relay pass's start, when it claimed the row), each order's path splits into:

    screened: publish -> placement txn starts -> order.placed written -> relay claims it ->
              fraud txn starts -> order.screened written -> relay claims it -> bench hears it
    active:   payment published -> payment txn starts -> invoice.paid written (the end of
              the payment's batch transaction: its outbox rows are its last statement) ->
              job claimed -> job done -> service.created written -> relay claims it ->
              bench hears it

A hop ending at a transaction's start includes the broker, the consumer's prefetch queue and
the batcher's linger; one ending at a relay claim includes the writer's commit and the
relay's wake-up, linger and free slot; one ending at the bench includes the publish, its
confirm round and the broker. The triggers cost the server a little (one row per event and
job change); `--hops` turns them on, on both sides of a comparison.

`timeline` sets per second of the steady phase the orders published, their p99, and what
ran that second (relay passes, job claims), so that slow seconds can be matched with what
else happened (the sampler's backlog and checkpoint counts come from sustained.py)."""

from __future__ import annotations

from typing import Any

import asyncpg
from pipeline import latency_summary

TRACE_SQL = """
CREATE TABLE IF NOT EXISTS bench_trace (kind text NOT NULL, ref text, at timestamptz NOT NULL);
CREATE INDEX IF NOT EXISTS bench_trace_ref_idx ON bench_trace (ref, kind);
CREATE OR REPLACE FUNCTION bench_trace_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO bench_trace VALUES ('written:' || NEW.routing_key, NEW.body->>'order_ref',
                                        clock_timestamp());
    ELSIF OLD.published_at IS NULL AND NEW.published_at IS NOT NULL THEN
        INSERT INTO bench_trace VALUES ('marked:' || NEW.routing_key, NEW.body->>'order_ref',
                                        clock_timestamp());
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS bench_trace_outbox ON outbox;
CREATE TRIGGER bench_trace_outbox AFTER INSERT OR UPDATE OF published_at ON outbox
    FOR EACH ROW EXECUTE FUNCTION bench_trace_outbox();
CREATE OR REPLACE FUNCTION bench_trace_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        INSERT INTO bench_trace VALUES ('job:' || NEW.status, NEW.order_id::text, clock_timestamp());
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS bench_trace_jobs ON jobs;
CREATE TRIGGER bench_trace_jobs AFTER UPDATE OF status ON jobs
    FOR EACH ROW EXECUTE FUNCTION bench_trace_jobs();
"""

# Per order: each stamp as seconds since the epoch (the bench's clock is the server's).
STAMPS_SQL = """
WITH o AS (SELECT id, order_ref, created_at FROM orders WHERE order_ref = ANY($1::text[])),
ev AS (
    SELECT body->>'order_ref' AS ref, routing_key, min(created_at) AS created,
           min(published_at) AS claimed
    FROM outbox WHERE body->>'order_ref' = ANY($1::text[])
      AND routing_key IN ('order.placed', 'order.screened', 'service.created')
    GROUP BY 1, 2),
tr AS (SELECT ref, kind, min(at) AS at FROM bench_trace WHERE ref = ANY($1::text[]) GROUP BY 1, 2),
jt AS (SELECT t.ref::bigint AS order_id, t.kind, min(t.at) AS at FROM bench_trace t
       WHERE t.kind LIKE 'job:%' AND t.ref = ANY($2::text[]) GROUP BY 1, 2)
SELECT o.order_ref AS ref,
    extract(epoch FROM o.created_at) AS placement_txn,
    (SELECT extract(epoch FROM at) FROM tr WHERE tr.ref = o.order_ref
        AND kind = 'written:order.placed') AS placed_written,
    (SELECT extract(epoch FROM claimed) FROM ev WHERE ev.ref = o.order_ref
        AND routing_key = 'order.placed') AS placed_claimed,
    (SELECT extract(epoch FROM at) FROM tr WHERE tr.ref = o.order_ref
        AND kind = 'marked:order.placed') AS placed_marked,
    (SELECT extract(epoch FROM min(f.created_at)) FROM fraud_checks f WHERE f.order_id = o.id)
        AS fraud_txn,
    (SELECT extract(epoch FROM at) FROM tr WHERE tr.ref = o.order_ref
        AND kind = 'written:order.screened') AS screened_written,
    (SELECT extract(epoch FROM claimed) FROM ev WHERE ev.ref = o.order_ref
        AND routing_key = 'order.screened') AS screened_claimed,
    (SELECT extract(epoch FROM at) FROM tr WHERE tr.ref = o.order_ref
        AND kind = 'marked:order.screened') AS screened_marked,
    (SELECT extract(epoch FROM min(p.received_at)) FROM payments p WHERE p.order_ref = o.order_ref)
        AS payment_txn,
    (SELECT extract(epoch FROM at) FROM tr WHERE tr.ref = o.order_ref
        AND kind = 'written:invoice.paid') AS paid_written,
    (SELECT extract(epoch FROM at) FROM jt WHERE jt.order_id = o.id AND kind = 'job:running')
        AS job_claimed,
    (SELECT extract(epoch FROM at) FROM jt WHERE jt.order_id = o.id AND kind = 'job:done')
        AS job_done,
    (SELECT extract(epoch FROM at) FROM tr WHERE tr.ref = o.order_ref
        AND kind = 'written:service.created') AS active_written,
    (SELECT extract(epoch FROM claimed) FROM ev WHERE ev.ref = o.order_ref
        AND routing_key = 'service.created') AS active_claimed,
    (SELECT extract(epoch FROM at) FROM tr WHERE tr.ref = o.order_ref
        AND kind = 'marked:service.created') AS active_marked
FROM o
"""

# (hop name, from stamp, to stamp); "published", "screened_heard", "paid", "active_heard" are
# the bench's own.
SCREENED_HOPS = (
    ("publish -> placement txn", "published", "placement_txn"),
    ("placement txn -> order.placed written", "placement_txn", "placed_written"),
    ("written -> relay claims order.placed", "placed_written", "placed_claimed"),
    ("relay claim -> fraud txn", "placed_claimed", "fraud_txn"),
    ("fraud txn -> order.screened written", "fraud_txn", "screened_written"),
    ("written -> relay claims order.screened", "screened_written", "screened_claimed"),
    ("relay claim -> bench hears order.screened", "screened_claimed", "screened_heard"),
)
ACTIVE_HOPS = (
    ("payment -> payment txn", "paid", "payment_txn"),
    ("payment txn -> invoice.paid written", "payment_txn", "paid_written"),
    ("invoice.paid written -> job claimed", "paid_written", "job_claimed"),
    ("job claimed -> job done", "job_claimed", "job_done"),
    ("job done -> service.created written", "job_done", "active_written"),
    ("written -> relay claims service.created", "active_written", "active_claimed"),
    ("relay claim -> bench hears service.created", "active_claimed", "active_heard"),
)
# Relay passes' own span (claim to the mark after the confirms), for reference; about 0 since
# stop 28, when the relay claims and marks in one statement.
RELAY_SPANS = (
    ("relay claim -> marked (order.placed)", "placed_claimed", "placed_marked"),
    ("relay claim -> marked (order.screened)", "screened_claimed", "screened_marked"),
    ("relay claim -> marked (service.created)", "active_claimed", "active_marked"),
)


async def install(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(TRACE_SQL)
    finally:
        await conn.close()


async def stamps(database_url: str, bench: dict[str, dict[str, float]]) -> list[dict[str, float]]:
    """Each order's stamps: the database's and the bench's (`bench[ref]`: published,
    screened_heard, and for paid ones paid and active_heard)."""
    refs = list(bench)
    conn = await asyncpg.connect(database_url)
    try:
        ids = [str(r[0]) for r in await conn.fetch(
            "SELECT id FROM orders WHERE order_ref = ANY($1::text[])", refs)]
        rows = await conn.fetch(STAMPS_SQL, refs, ids)
    finally:
        await conn.close()
    out = []
    for row in rows:
        stamp = {k: float(v) for k, v in row.items() if k != "ref" and v is not None}
        out.append({"ref": row["ref"], **stamp, **bench[row["ref"]]})
    return out


def _ms(order: dict[str, float], start: str, end: str) -> float | None:
    if start in order and end in order:
        return (order[end] - order[start]) * 1000
    return None


def breakdown(orders: list[dict[str, Any]]) -> dict[str, Any]:
    """Per hop, p50/p99 over every order, and its mean over the slowest 1 % of each path
    (by the path's end-to-end time) against its mean over all: the hop whose share grows
    in the slowest orders is the one that carries the tail."""
    out: dict[str, Any] = {}
    for path, hops, (first, last) in (("screened", SCREENED_HOPS, ("published", "screened_heard")),
                                      ("active", ACTIVE_HOPS, ("paid", "active_heard"))):
        have = [o for o in orders if all(k in o for _, a, b in hops for k in (a, b))]
        if not have:
            continue
        have.sort(key=lambda o: o[last] - o[first])
        tail = have[-max(1, len(have) // 100):]
        rows = []
        for name, a, b in (*hops, *(RELAY_SPANS if path == "screened" else ())):
            values = [v for o in have if (v := _ms(o, a, b)) is not None]
            tail_values = [v for o in tail if (v := _ms(o, a, b)) is not None]
            if not values:
                continue
            rows.append({"hop": name, **latency_summary(values),
                         "mean": round(sum(values) / len(values), 1),
                         "tail_mean": round(sum(tail_values) / max(1, len(tail_values)), 1)})
        ends = [(o[last] - o[first]) * 1000 for o in have]
        out[path] = {"orders": len(have), "end_to_end": latency_summary(ends),
                     "tail_orders": len(tail), "hops": rows}
    return out


def timeline(orders: list[dict[str, Any]], started: float, claims: list[float],
             relay_passes: list[float], samples: list[dict[str, float]]) -> list[dict[str, Any]]:
    """Per second since `started`: orders published, their screened p99 and worst hop, job
    claims and relay passes that began in it, and the sampler's backlog then."""
    seconds: dict[int, dict[str, Any]] = {}

    def second(t: float) -> dict[str, Any]:
        return seconds.setdefault(int(t - started), {"orders": [], "claims": 0, "passes": 0})

    for o in orders:
        if "published" in o:
            second(o["published"])["orders"].append(o)
    for t in claims:
        second(t)["claims"] += 1
    for t in relay_passes:
        second(t)["passes"] += 1
    by_t = {int(s["t"]): s for s in samples}
    out = []
    for t in sorted(k for k in seconds if k >= 0):
        s = seconds[t]
        screened = [(o["screened_heard"] - o["published"]) * 1000 for o in s["orders"]
                    if "screened_heard" in o]
        worst: dict[str, float] = {}
        for o in s["orders"]:
            for name, a, b in SCREENED_HOPS:
                v = _ms(o, a, b)
                if v is not None and v > worst.get(name, -1.0):
                    worst[name] = v
        top = max(worst.items(), key=lambda kv: kv[1]) if worst else ("", 0.0)
        sample = by_t.get(t, {})
        out.append({"t": t, "orders": len(s["orders"]),
                    "screened_p99": latency_summary(screened)["p99"] if screened else None,
                    "worst_hop": top[0], "worst_hop_ms": round(top[1], 1),
                    "job_claims": s["claims"], "relay_passes": s["passes"],
                    "ready": sample.get("ready"), "events": sample.get("events"),
                    "mails": sample.get("mails"), "checkpoints": sample.get("checkpoints")})
    return out


async def passes_and_claims(database_url: str, since: float, until: float
                            ) -> tuple[list[float], list[float], dict[str, int]]:
    """Relay passes (distinct claim times of outbox rows) and job claims within the span,
    and counts per order path."""
    conn = await asyncpg.connect(database_url)
    try:
        passes = [float(r[0]) for r in await conn.fetch(
            "SELECT DISTINCT extract(epoch FROM published_at) FROM outbox"
            " WHERE published_at BETWEEN to_timestamp($1) AND to_timestamp($2)", since, until)]
        claims = [float(r[0]) for r in await conn.fetch(
            "SELECT extract(epoch FROM at) FROM bench_trace WHERE kind = 'job:running'"
            " AND at BETWEEN to_timestamp($1) AND to_timestamp($2)", since, until)]
        events = await conn.fetchval(
            "SELECT count(*) FROM outbox WHERE published_at BETWEEN to_timestamp($1)"
            " AND to_timestamp($2)", since, until)
    finally:
        await conn.close()
    return passes, claims, {"relay_passes": len(passes), "events": int(events or 0),
                            "job_claims": len(claims)}


async def batch_sizes(database_url: str, since: float, until: float,
                      consumer: str = "provisioning") -> dict[str, Any]:
    """Messages per transaction of a consumer in the span, from its inbox rows (a
    transaction's rows share `processed_at`, its start): over its transactions, and as each
    payment saw it (the size of the transaction its payment shared: a payment waits for every
    statement of its batch before the commit that lets its job be claimed)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT processed_at, count(*) AS n FROM inbox WHERE consumer = $1"
            " AND processed_at BETWEEN to_timestamp($2) AND to_timestamp($3) GROUP BY 1",
            consumer, since, until)
        per_payment = [int(r[0]) for r in await conn.fetch(
            "SELECT b.n FROM payments p JOIN (SELECT processed_at, count(*) AS n FROM inbox"
            "  WHERE consumer = $1 GROUP BY 1) b ON b.processed_at = p.received_at"
            " WHERE p.received_at BETWEEN to_timestamp($2) AND to_timestamp($3)",
            consumer, since, until)]
    finally:
        await conn.close()
    sizes = [int(r["n"]) for r in rows]
    if not sizes:
        return {}
    return {"transactions": len(sizes), "mean": round(sum(sizes) / len(sizes), 2),
            "per_transaction": latency_summary([float(n) for n in sizes]),
            "per_payment": latency_summary([float(n) for n in per_payment])
            if per_payment else {}}

