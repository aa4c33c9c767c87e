"""`ordermill show` and `ordermill failures` in an 80-column terminal: no line wider than
the terminal, no column name cut to "stat…", every value whole (a table that cannot fit is
printed as records: cli/tables.py). The orders come from the broker-free harness; the CLI
only reads the database."""

from __future__ import annotations

from test_cli import cli

from conftest import order_body
from services.fraud.worker import worker as fraud_worker
from services.placement.worker import worker as placement_worker
from shared.runtime.testing import InMemoryFlow

LONG_ERROR = ("WHM createacct failed: (XID 9x2k) The system could not create the account"
              " because the disk quota of the reseller is exhausted")


def assert_narrow(text: str, width: int = 80) -> None:
    for line in text.splitlines():
        assert len(line) <= width, f"{len(line)} columns: {line!r}"
    assert "…" not in text, text


async def test_show_and_failures_fit_80_columns(flow: InMemoryFlow) -> None:
    s = flow.settings
    flow.add(placement_worker(s), fraud_worker(s))
    ref = "narrow-terminal-order-with-a-long-ref"
    await flow.send("order.place", order_body(ref))
    await flow.run()
    order = await flow.pool.fetchrow("SELECT * FROM orders WHERE order_ref = $1", ref)
    service = await flow.pool.fetchval("SELECT id FROM services WHERE order_id = $1", order["id"])
    await flow.pool.execute(
        "INSERT INTO jobs (order_id, service_id, kind, lane, status, attempts, last_error)"
        " VALUES ($1, $2, 'create', 'cpanel:1', 'parked', 6, $3)", order["id"], service,
        LONG_ERROR)
    await flow.pool.execute(
        "INSERT INTO payments (gateway, transaction_id, amount, raw_amount, currency, order_ref,"
        " status, reason, message_id) VALUES ('stripe', 'ch_3PZnarrowterminal', 12.95, '12.95',"
        " 'USD', 'shop-missing-1', 'unapplied', 'order not placed yet: shop-missing-1', 'm1')")

    code, shown, err = await cli(s, "show", str(order["id"]), COLUMNS="80")
    assert code == 0, err
    assert_narrow(shown)
    for whole in ("cycle/action", "last error", "attempts", "starter", f"{ref}.example",
                  f"{ref}.com", "Pending", "monthly", "create parked", "disk quota"):
        assert whole in shown, whole
    assert " ".join(LONG_ERROR.split()) in " ".join(
        line.strip() for line in shown.splitlines())  # wrapped, not cut

    code, failures, err = await cli(s, "failures", COLUMNS="80")
    assert code == 0, err
    assert_narrow(failures)
    for whole in ("ch_3PZnarrowterminal", "order not placed yet: shop-missing-1", ref,
                  "attempts"):
        assert whole in " ".join(failures.split()) or whole in failures, whole

    # A wide terminal still gets the tables.
    code, wide, _ = await cli(s, "show", str(order["id"]), COLUMNS="200")
    assert "┃ id" in wide or "│ id" in wide or "id ┃" in wide
