"""Seed a database with a large, realistic order history, quickly: set-based SQL
(`INSERT ... SELECT ... FROM generate_series`), one statement per table, no round trip per
row. Used by bench/console_pages.py (the console's page times at a million orders) and meant for
issue 15's bench/scale.py.

    PYTHONPATH=. .venv/bin/python bench/seed.py postgresql://postgres@127.0.0.1/om_big \\
        [--orders 1000000] [--clients 300000]

The database must be migrated with the sample catalog loaded (catalog.example.toml), and
empty of orders. What it makes, spread evenly over YEARS years up to now:

- CLIENTS clients (names, companies for one in five, addresses, countries);
- ORDERS orders, each with one hosting service and, every other order, a .com domain; an
  invoice with its lines; a payment for each paid invoice; a fraud check; history (placed,
  screened, and the operator's decision);
- the newest PENDING orders Pending for review (one in 40 of them flagged: screening error),
  one order in 97 Fraud and one in 13 Cancelled, the rest Active;
- about PARKED parked setups (on recent Active orders) with their error, a setup job done
  for one order in ten, and
  UNAPPLIED unapplied payments with their reason;
- each client linked to the storefront that created it (as placement links them);
- the mails housekeeping keeps: an order confirmation for each order of the last MAIL_DAYS
  days, sent, but PARKED_MAILS of them parked with their error;
- a product launched lately (`launch`, not in the catalog file): three orders in four of the
  last LAUNCHED_DAYS days have it instead of their hosting product (about 12,000 at 1M), and
  LAUNCH_EARLY orders five years ago had it (a trial): the console's product filter over all
  time for a product whose orders are all recent (issue 13's review).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True)
class Shape:
    orders: int = 1_000_000
    clients: int = 300_000
    years: int = 10
    pending: int = 3_000
    parked: int = 500
    unapplied: int = 2_000
    mail_days: int = 90  # mails are kept this long (EMAIL_RETENTION_DAYS' default)
    parked_mails: int = 50
    launched_days: int = 60
    launch_early: int = 50


FIRST = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jen", "Kai", "Lea",
         "Max", "Nora", "Omar", "Pia", "Quin", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wes", "Xia")
LAST = ("Smith", "Jones", "Lee", "Brown", "Garcia", "Müller", "Rossi", "Dubois", "Kowalski",
        "Nguyen", "Silva", "Khan", "Novak", "Jensen", "Murphy", "Tanaka", "Ivanova", "Costa",
        "Haas", "Berg", "Quinn", "Okafor", "Sato", "Larsen", "Moreau", "Fischer", "Ward")


def _array(values: tuple[str, ...]) -> str:
    return "(ARRAY[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "])"


# Each order's facts, derived from its number i (1..N): the same in every statement.
# status: the newest `pending` Pending; then one in 97 Fraud, one in 13 Cancelled; else Active.
def _steps(s: Shape) -> list[tuple[str, str]]:
    n, c, p = s.orders, s.clients, s.pending
    status = (f"CASE WHEN i > {n - p} THEN 'Pending' WHEN i % 97 = 0 THEN 'Fraud'"
              " WHEN i % 13 = 0 THEN 'Cancelled' ELSE 'Active' END")
    at = f"now() - make_interval(secs => ({n} - i)::float8 * {s.years * 365 * 86400 / n:.6f})"
    client = f"1 + (i::bigint * 7919) % {c}"
    series = f"generate_series(1, {n}) i"
    mails_from = n - min(n, n * s.mail_days // (s.years * 365)) + 1  # the last MAIL_DAYS' orders
    every = max(1, (n - mails_from + 1) // max(1, s.parked_mails))  # one mail in `every` parked
    launched_from = n - n * s.launched_days // (s.years * 365) + 1
    half = n // 2  # five years ago
    return [
        ("clients", f"""
INSERT INTO clients (id, email, first_name, last_name, company, country, address1, city,
    postcode, phone, storefront, created_at)
SELECT i, lower(f || '.' || l) || i || '@example.com', f, l,
  CASE WHEN i % 5 = 0 THEN l || ' ' || (ARRAY['Hosting', 'Media', 'Labs', 'Ltd', 'GmbH'])[1 + i % 5] END,
  (ARRAY['GB', 'US', 'DE', 'FR', 'NL', 'ES', 'PL', 'SE'])[1 + i % 8], i || ' High Street',
  (ARRAY['Leeds', 'Austin', 'Berlin', 'Lyon', 'Utrecht', 'Sevilla', 'Gdansk', 'Malmo'])[1 + i % 8],
  'PC ' || i % 9999, '+44 20 7946 ' || lpad((i % 10000)::text, 4, '0'), 'shop',
  now() - make_interval(secs => ({c} - i)::float8 * {s.years * 365 * 86400 / c:.6f})
FROM generate_series(1, {c}) i,
  LATERAL (SELECT {_array(FIRST)}[1 + i % {len(FIRST)}] AS f,
                  {_array(LAST)}[1 + (i / {len(FIRST)}) % {len(LAST)}] AS l) names"""),
        # No client_storefronts rows: a client is its creator's by clients.storefront, and
        # placement writes no link for it (the table holds operators' links).
        ("orders", f"""
INSERT INTO orders (id, order_ref, order_number, client_id, status, screening, currency,
    payment_method, ip_address, send_confirmation, generate_invoice, total, placed_by,
    storefront, created_at, updated_at, screening_driven_at, accept_options)
SELECT i, 'shop-' || i, 100000000 + i * 7, {client}, st,
  CASE WHEN st = 'Fraud' THEN 'failed' WHEN st = 'Pending' AND i % 40 = 0 THEN 'error'
       ELSE 'passed' END,
  'USD', 'stripe', ('10.' || (i >> 16) % 256 || '.' || (i >> 8) % 256 || '.' || i % 256)::inet,
  true, true, CASE WHEN i % 2 = 0 THEN 28.95 ELSE 4.95 END, 'shop', 'shop', t, t, t,
  CASE WHEN st = 'Active' THEN '{{"run_module_create": true}}'::jsonb END
FROM {series}, LATERAL (SELECT {status} AS st, {at} AS t) x"""),
        ("services", f"""
INSERT INTO services (id, order_id, product_id, billing_cycle, domain, status, amount, created_at,
    username, live)
SELECT i, i, (ARRAY(SELECT id FROM products ORDER BY id))[1 + i % 4],
  (ARRAY['monthly', 'annually'])[1 + i % 2], 'site' || i || '.example',
  CASE o.status WHEN 'Cancelled' THEN 'Cancelled' WHEN 'Fraud' THEN 'Fraud'
       ELSE o.status END, 4.95, o.created_at, 'site' || i, o.status = 'Active'
FROM {series} JOIN orders o ON o.id = i"""),
        ("domains", f"""
INSERT INTO domains (id, order_id, domain, tld, action, years, status, amount, created_at,
    registered_at)
SELECT i / 2, i, 'site' || i || '.com', 'com', 'register', 2,
  CASE o.status WHEN 'Active' THEN 'Active' WHEN 'Pending' THEN 'Pending' ELSE o.status END,
  24.00, o.created_at, CASE WHEN o.status = 'Active' THEN o.created_at END
FROM generate_series(2, {n}, 2) i JOIN orders o ON o.id = i"""),
        ("invoices", """
INSERT INTO invoices (id, order_id, client_id, status, currency, subtotal, total, created_at,
    paid_at, amount_paid)
SELECT o.id, o.id, o.client_id,
  CASE o.status WHEN 'Active' THEN 'Paid' WHEN 'Pending' THEN 'Unpaid' ELSE 'Cancelled' END,
  'USD', o.total, o.total, o.created_at,
  CASE WHEN o.status = 'Active' THEN o.created_at + interval '5 minutes' END,
  CASE WHEN o.status = 'Active' THEN o.total ELSE 0 END
FROM orders o"""),
        ("invoice lines", f"""
INSERT INTO invoice_items (invoice_id, kind, service_id, domain_id, description, amount)
SELECT i, 'service', i, NULL, 'Hosting site' || i || '.example (monthly)', 4.95 FROM {series}
UNION ALL
SELECT i, 'domain', NULL, i / 2, 'Domain registration site' || i || '.com (2 years)', 24.00
FROM generate_series(2, {n}, 2) i"""),
        ("payments", """
INSERT INTO payments (gateway, transaction_id, amount, raw_amount, currency, invoice_id,
    requested_invoice_id, order_ref, publisher, status, message_id, received_at, applied_at)
SELECT 'stripe', 'ch_' || o.id, o.total, o.total::text, 'USD', o.id, o.id, o.order_ref,
  'gateway', 'applied', 'seed-pay-' || o.id, o.created_at + interval '5 minutes',
  o.created_at + interval '5 minutes'
FROM orders o WHERE o.status = 'Active'"""),
        ("unapplied payments", f"""
INSERT INTO payments (gateway, transaction_id, amount, raw_amount, currency, order_ref,
    publisher, status, reason, waiting_for, trusted, message_id, received_at)
SELECT 'stripe', 'ch_lost_' || i, 12.95, '12.95', 'USD', 'shop-missing-' || i, 'gateway',
  'unapplied', CASE WHEN i % 3 = 0 THEN 'order ' || i || ' is Cancelled'
                    ELSE 'order not placed yet: shop-missing-' || i END,
  CASE WHEN i % 3 = 0 THEN 'review' ELSE 'order' END, true, 'seed-lost-' || i,
  now() - make_interval(mins => i)
FROM generate_series(1, {s.unapplied}) i"""),
        ("fraud checks", """
INSERT INTO fraud_checks (order_id, provider, result, score, threshold, reasons, raw, created_at)
SELECT o.id, 'rules', CASE o.screening WHEN 'queued' THEN 'skipped' ELSE o.screening END,
  CASE WHEN o.status = 'Fraud' THEN 60 ELSE (o.id % 17)::numeric END, 20,
  CASE WHEN o.status = 'Fraud' THEN
    '[{"code": "banned_ip", "points": 60, "description": "IP address is banned"}]'::jsonb
  ELSE '[]'::jsonb END, '{"provider": "rules"}'::jsonb, o.created_at + interval '1 second'
FROM orders o"""),
        ("history", """
INSERT INTO order_history (order_id, at, actor, action, from_status, to_status, detail)
SELECT o.id, o.created_at, 'shop', 'placed', NULL, 'Pending', '{}'::jsonb FROM orders o
UNION ALL
SELECT o.id, o.created_at + interval '1 second', 'fraud', 'screening', 'Pending',
  CASE WHEN o.status = 'Fraud' THEN 'Fraud' ELSE 'Pending' END, '{}'::jsonb FROM orders o
UNION ALL
SELECT o.id, o.created_at + interval '1 hour',
  (ARRAY['alice', 'bob', 'carol'])[1 + o.id % 3],
  CASE o.status WHEN 'Active' THEN 'accept' ELSE 'cancel' END, 'Pending', o.status, '{}'::jsonb
FROM orders o WHERE o.status IN ('Active', 'Cancelled')"""),
        ("jobs", f"""
INSERT INTO jobs (order_id, service_id, kind, status, attempts, last_error, lane, created_at,
    updated_at)
SELECT i, i, 'create', 'done', 1, NULL, 'cpanel:1', o.created_at, o.created_at
FROM generate_series(10, {n - p}, 10) i JOIN orders o ON o.id = i WHERE o.status = 'Active'
UNION ALL
SELECT i, i, 'create', 'parked', 6,
  'WHM createacct failed: (XID ' || i || ') The system could not create the account: disk quota',
  'cpanel:1', o.created_at, now() - make_interval(mins => i % 600)
FROM generate_series({n - p - 10 * s.parked + 5}, {n - p}, 10) i JOIN orders o ON o.id = i
WHERE o.status = 'Active'"""),
        ("mails", f"""
INSERT INTO emails (dedupe_key, template, recipient, order_id, message_id, status, attempts,
    last_error, next_attempt_at, created_at, sent_at)
SELECT 'order_confirmation:' || i, 'order_confirmation', c.email, i, '<seed-' || i || '@shop>',
  CASE WHEN i % {every} = 0 THEN 'parked' ELSE 'sent' END, 1,
  CASE WHEN i % {every} = 0 THEN '552 mailbox full' END, o.created_at, o.created_at,
  CASE WHEN i % {every} <> 0 THEN o.created_at + interval '2 seconds' END
FROM generate_series({mails_from}, {n}) i JOIN orders o ON o.id = i
  JOIN clients c ON c.id = o.client_id"""),
        ("a product launched lately", launch_sql(s, launched_from, half)),
    ]


def launch_sql(s: Shape, launched_from: int, early_from: int) -> str:
    """The `launch` product and its services: most of the last days' orders, a few early."""
    return f"""
INSERT INTO products (slug, name, type, module, auto_setup)
VALUES ('launch', 'Launch Hosting', 'hosting', 'autorelease', 'on_payment')
ON CONFLICT (slug) DO NOTHING;
UPDATE services SET product_id = (SELECT id FROM products WHERE slug = 'launch')
WHERE (order_id >= {launched_from} AND order_id % 4 <> 3)
   OR order_id IN (SELECT generate_series({early_from}, {early_from + 10 * (s.launch_early - 1)}, 10))"""


SEQUENCES = {"clients": "clients_id_seq", "orders": "orders_id_seq",
             "services": "services_id_seq", "domains": "domains_id_seq",
             "invoices": "invoices_id_seq"}


async def seed(conn: asyncpg.Connection, shape: Shape = Shape(), *,
               progress: Callable[[str], None] = print) -> dict[str, float]:
    """Fill the (migrated, catalogued, orderless) database; the seconds each step took."""
    if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM orders)"):
        raise ValueError("the database already has orders: seed an empty one")
    await conn.execute("SET synchronous_commit = off")
    await conn.execute("SET maintenance_work_mem = '256MB'")
    took: dict[str, float] = {}
    started = time.monotonic()
    for name, sql in _steps(shape):
        t0 = time.monotonic()
        status = await conn.execute(sql)
        took[name] = time.monotonic() - t0
        progress(f"  {name}: {int(status.split()[-1]):,} rows in {took[name]:.1f} s")
    for table, sequence in SEQUENCES.items():
        await conn.execute(f"SELECT setval('{sequence}', (SELECT max(id) FROM {table}))")
    t0 = time.monotonic()
    # As autovacuum leaves a database that has lived: statistics, and the visibility map
    # set, so index-only scans need not visit the heap.
    await conn.execute("VACUUM ANALYZE")
    # And the pages written out: the history's gigabytes would otherwise still be flushed by
    # the checkpointer in the minutes after, under whatever is measured next.
    await conn.execute("CHECKPOINT")
    took["analyze"] = time.monotonic() - t0
    took["total"] = time.monotonic() - started
    progress(f"  vacuum analyze in {took['analyze']:.1f} s; seeded in {took['total']:.0f} s")
    return took


async def _main(url: str, shape: Shape) -> None:
    conn = await asyncpg.connect(url)
    try:
        await seed(conn, shape)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("database_url")
    parser.add_argument("--orders", type=int, default=Shape.orders)
    parser.add_argument("--clients", type=int, default=Shape.clients)
    parser.add_argument("--years", type=int, default=Shape.years)
    parser.add_argument("--pending", type=int, default=Shape.pending)
    args = parser.parse_args()
    asyncio.run(_main(args.database_url, Shape(orders=args.orders, clients=args.clients,
                                               years=args.years, pending=args.pending)))


if __name__ == "__main__":
    main()
