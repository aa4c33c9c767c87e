"""`ordermill webhooks`: endpoints for integrators (docs/contract.md, section 10).

Endpoints are configuration, written directly to the database as `ordermill catalog load`
writes the catalog. A signing secret is printed once, by `add` (when generated or given) and
`rotate`; no command shows it again (a lost secret is replaced with `rotate`). Every text from
outside (a URL, a receiver's answer) is printed escaped; `--json` is exact JSON."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import typer

from services.webhooks import endpoints as ops
from services.webhooks.addresses import Policy
from services.webhooks.sealing import Sealer, SealError
from shared.contracts import BIGINT_MAX
from shared.settings import Settings

app = typer.Typer(help="Outbound webhooks: endpoints, deliveries, replays.", no_args_is_help=True)
IdArg = typer.Argument(..., min=1, max=BIGINT_MAX, show_default=False)
JsonOpt = typer.Option(False, "--json", help="Print JSON only.")


def _run(fn: Any) -> Any:
    """`fn(conn, settings)` on a connection; a WebhookError or SealError is one line."""
    from cli.main import UserError, database, run_async, settings

    s = settings()

    async def go() -> Any:
        async with database(s) as conn:
            return await fn(conn, s)

    try:
        return run_async(go())
    except (ops.WebhookError, SealError) as exc:
        raise UserError(str(exc)) from None


def _sealer(s: Settings) -> Sealer:
    return Sealer.from_key(s.webhook_secret_key)


def _say(text: str) -> None:
    from cli.main import _say as say

    say(text)


def _secret_lines(secret: str, what: str) -> None:
    _say(f"{what}: {secret}")
    _say("shown once: keep it with the receiver; `ordermill webhooks rotate` replaces it")


@app.command("add")
def add(
    url: str = typer.Argument(..., help="https://... (http:// only to WEBHOOK_ALLOW_NETWORKS)"),
    events: str = typer.Option(..., "--events", help="Event types, comma-separated, or '*'."),
    secret: str = typer.Option(None, "--secret", help="whsec_... (default: generated)"),
    description: str = typer.Option(None, "--description", help="A note for operators."),
    as_json: bool = JsonOpt,
) -> None:
    """Add an endpoint; its signing secret is printed once."""
    from cli.main import emit_json

    async def go(conn: asyncpg.Connection, s: Settings) -> tuple[dict[str, Any], str]:
        return await ops.add(conn, url, ops.event_list(events), policy=Policy.of(
            s.webhook_allow_networks), sealer=_sealer(s), secret=secret, description=description)

    endpoint, shown = _run(go)
    if as_json:
        emit_json({**endpoint, "secret": shown})
        return
    _say(f"webhook endpoint {endpoint['id']} added: {endpoint['url']}"
         f" ({', '.join(endpoint['events'])})")
    _secret_lines(shown, "signing secret")


@app.command("list")
def list_(as_json: bool = JsonOpt) -> None:
    """Every endpoint: its events, status and deliveries (never its secret)."""
    from cli.main import emit_json, out, table

    found = _run(lambda conn, s: ops.endpoints(conn))
    if as_json:
        emit_json(found)
        return
    out.print(table("Webhook endpoints", ["id", "url", "events", "status", "waiting", "parked",
                                          "delivered", "rotating until"],
                    [[e["id"], e["url"], ",".join(e["events"]),
                      e["status"] + (f" ({e['status_reason']})" if e["status_reason"] else ""),
                      e["waiting"], e["parked"], e["delivered"], e["previous_secret_until"] or ""]
                     for e in found]))


@app.command("remove")
def remove(endpoint_id: int = IdArg) -> None:
    """Delete an endpoint with its deliveries and their log."""
    _run(lambda conn, s: ops.remove(conn, endpoint_id))
    _say(f"webhook endpoint {endpoint_id} removed")


@app.command("enable")
def enable(endpoint_id: int = IdArg) -> None:
    """Make a disabled (410 Gone) or failing endpoint active again."""
    _run(lambda conn, s: ops.enable(conn, endpoint_id))
    _say(f"webhook endpoint {endpoint_id} active")


@app.command("rotate")
def rotate(
    endpoint_id: int = IdArg,
    secret: str = typer.Option(None, "--secret", help="whsec_... (default: generated)"),
    as_json: bool = JsonOpt,
) -> None:
    """A new signing secret (printed once); the old one signs too until WEBHOOK_ROTATION_HOURS."""
    from cli.main import emit_json

    new, until = _run(lambda conn, s: ops.rotate(conn, endpoint_id, sealer=_sealer(s),
                                                  hours=s.webhook_rotation_hours, secret=secret))
    if as_json:
        emit_json({"id": endpoint_id, "secret": new, "previous_secret_until": until.isoformat()})
        return
    _secret_lines(new, f"endpoint {endpoint_id}'s new signing secret")
    _say(f"the previous secret signs too (a second signature) until {until:%Y-%m-%d %H:%M} UTC")


@app.command("test")
def test(
    endpoint_id: int = IdArg,
    wait: float = typer.Option(15.0, min=0, help="Seconds to wait for the first attempt."),
    as_json: bool = JsonOpt,
) -> None:
    """Send a webhook.test event (through the webhooks worker) and print its first attempt."""
    from cli.main import UserError, emit_json

    async def go(conn: asyncpg.Connection, s: Settings) -> tuple[int, dict[str, Any] | None]:
        delivery = await ops.send_test(conn, endpoint_id)
        deadline = time.monotonic() + wait
        for _ in range(int(wait / 0.2) + 2):  # polled: the sender may be another machine's
            attempt = await ops.first_attempt(conn, delivery)
            if attempt is not None or time.monotonic() >= deadline:
                return delivery, attempt
            await asyncio.sleep(0.2)
        return delivery, None

    delivery, attempt = _run(go)
    if as_json:
        emit_json({"delivery_id": delivery, "attempt": attempt})
        return
    if attempt is None:
        raise UserError(f"test delivery {delivery} queued, not attempted within {wait:g} s:"
                        " is the webhooks worker running (`ordermill run webhooks`)?")
    code = attempt["status_code"]
    _say(f"test delivery {delivery}: {attempt['outcome']}"
         + (f", HTTP {code}" if code is not None else "")
         + f" in {attempt['duration_ms']} ms"
         + (f"; {attempt['error']}" if attempt["error"] else ""))
    if attempt["response"]:
        _say(f"answer: {attempt['response'][:200]}")


@app.command("deliveries")
def deliveries(
    endpoint_id: int = IdArg,
    limit: int = typer.Option(20, min=1, max=1000, help="The newest N deliveries."),
    as_json: bool = JsonOpt,
) -> None:
    """The delivery log of an endpoint: each delivery, its attempts, the answers' first bytes."""
    from cli.main import emit_json, out, table

    found = _run(lambda conn, s: ops.deliveries(conn, endpoint_id, limit))
    if as_json:
        emit_json(found)
        return
    rows = []
    for d in found:
        last = d["log"][-1] if d["log"] else {}
        rows.append([d["id"], d["webhook_id"], d["event_type"], d["status"], d["attempts"],
                     last.get("status_code") or "", f"{last['duration_ms']} ms" if last else "",
                     (last.get("error") or last.get("response") or "")[:120]])
    out.print(table(f"Deliveries to endpoint {endpoint_id}",
                    ["id", "webhook-id", "event", "status", "attempts", "code", "took",
                     "last error / answer"], rows))


@app.command("replay")
def replay(
    delivery_id: int = typer.Argument(None, min=1, max=BIGINT_MAX, show_default=False,
                                      help="A delivery to send again."),
    endpoint: int = typer.Option(None, "--endpoint", min=1, max=BIGINT_MAX,
                                 help="Send every parked delivery of this endpoint again."),
) -> None:
    """Send a delivery (or an endpoint's parked ones) again, with the same webhook-id."""
    from cli.main import UserError

    if (delivery_id is None) == (endpoint is None):
        raise UserError("name a DELIVERY_ID or --endpoint ID (one of them)")
    if delivery_id is not None:
        webhook_id = _run(lambda conn, s: ops.replay(conn, delivery_id))
        _say(f"delivery {delivery_id} ({webhook_id}) queued again")
        return
    count = _run(lambda conn, s: ops.replay_parked(conn, endpoint))
    _say(f"{count} parked delivery(ies) of endpoint {endpoint} queued again")

