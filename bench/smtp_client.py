"""The mail sender's CPU a mail, on its own: what services/notify/sender.py does for each mail
of a pass (render() the mail, then aiosmtplib's sendmail over a kept connection), over
--connections connections at once to the bench's SMTP sink in a process of its own
(pipeline.py's MailSinkProcess, as bench/sustained.py's), no database.
Three mails an order (confirmation, invoice, welcome) to a recipient each order, as the
full flow sends them.

Reports, per round, this process's CPU a mail (user and system, os.times) and the mails a
second: the figure the notify,webhooks,alerts process spends on each mail besides its
claim, context query and marks.

Run: PYTHONPATH=$PWD .venv/bin/python bench/smtp_client.py [--mails 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from decimal import Decimal

import aiosmtplib
from pipeline import MailSinkProcess, _free_port

from cli.main import loop_factory
from services.notify.mail import message_id_for, render

CONTEXT = {
    "order": {"id": 1, "order_number": "123456", "order_ref": "ref-1", "total": Decimal("28.95"),
              "currency": "USD"},
    "client": {"first_name": "Anna", "last_name": "Lee", "email": "anna@shop.example"},
    "invoice": {"id": 1, "status": "Unpaid", "total": Decimal("28.95"), "currency": "USD"},
    "items": [{"label": "Starter - anna.example", "amount": Decimal("28.95"),
               "domain": "anna.example", "username": "anna1"}],
}
TEMPLATES = ("order_confirmation", "invoice_created", "hosting_welcome")


async def _connection(port: int, first: int, mails: int) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30,
                           local_hostname="bench.local")
    await smtp.connect()
    # The sender reads each mail's Message-ID from its row: worked out before the timing.
    ids = [message_id_for(f"bench-{n}", "shop.example") for n in range(first, first + mails)]
    for n, message_id in enumerate(ids, start=first):
        mail = render(TEMPLATES[n % 3], f"bench-{n // 3}@shop.example",
                      "Shop <billing@shop.example>", message_id, CONTEXT)
        await smtp.sendmail(mail.sender, [mail.recipient], mail.data,
                            mail_options=mail.mail_options)
    await smtp.quit()


async def main(opts: argparse.Namespace) -> None:
    port = _free_port()
    per = opts.mails // opts.connections
    with MailSinkProcess(port) as sink:
        await _connection(port, 10**9, 30)  # warm: the templates, the imports
        for r in range(opts.rounds):
            before, started = os.times(), time.perf_counter()
            await asyncio.gather(*(_connection(port, (r * opts.connections + c) * per, per)
                                   for c in range(opts.connections)))
            after, ended = os.times(), time.perf_counter()
            sent = per * opts.connections
            user, system = after.user - before.user, after.system - before.system
            print(f"round {r + 1}: {sent} mails, {1e6 * (user + system) / sent:.0f} us CPU a mail"
                  f" (user {1e6 * user / sent:.0f}, system {1e6 * system / sent:.0f}),"
                  f" {sent / (ended - started):.0f} mails/s")
    expected = 30 + opts.rounds * per * opts.connections  # the sink counts when stopped
    print(f"the sink received {sink.received:,} of {expected:,} mails sent")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=3000, help="mails a round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=4, help="SMTP connections at once")
    opts = parser.parse_args(argv)
    if opts.connections < 1 or opts.mails < opts.connections or opts.rounds < 1:
        parser.error("--connections and --rounds must be at least 1, --mails at least"
                     " --connections")
    return opts


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main(parse_args()))
